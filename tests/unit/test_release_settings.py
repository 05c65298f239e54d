"""The master's release: settings (_utils/release_settings.py), for every shape README shows."""

import pytest

import release_settings as settings

OPTS = {"cachedir": "/var/cache/salt/master", "file_roots": {"base": ["/srv/salt", "/srv/other"]}}
README = {  # README "Configuration", as written there
    "artifact_root": "/srv/salt/releases",
    "state_dir": "/var/cache/salt/master/release",
    "projects": {"rainbow": {
        "repo": "https://git.example.com/rainbow.git", "build": ["make dist"], "checks": ["make test"],
        "keep_releases": 5,
        "environments": {
            "test": {"target": "G@env:test", "tgt_type": "compound", "batch": "100%"},
            "pro": {
                "waves": [
                    {"name": "pre", "target": "web-pre1"},
                    {"name": "gray-north", "target": "G@region:north", "tgt_type": "compound", "batch": 1,
                     "bake_s": 30},
                    {"name": "rest", "target": "G@role:web", "tgt_type": "compound", "batch": "25%",
                     "max_failures": 1},
                ],
                "health": {"url": "http://{host}:8080/health", "expect": "release", "timeout_s": 10, "retries": 5},
                "lb": {"minion": "lb1", "kind": "nginx", "upstream_file": "/etc/nginx/conf.d/rainbow.upstream",
                       "backend": "{host}:8080"},
                "host_grain": "fqdn_ip4[0]", "auto_rollback": True,
            },
        },
    }},
}


def master(release):
    return settings.master(dict(OPTS, release=release))


def test_defaults_fill_what_readme_says():
    conf = master({"projects": {"app": {"repo": "/git/app"}}})
    assert conf["state_dir"] == "/var/cache/salt/master/release"
    assert conf["artifact_root"] == "/srv/salt/releases"
    assert conf["store"] == "sqlite" and conf["errors"] == {}
    app = conf["projects"]["app"]
    assert (app["timeout_s"], app["install_timeout_s"], app["build_timeout_s"], app["lock_ttl_s"]) == (
        60, 300, 1800, 6 * 3600)
    assert app["environments"] == {}


def test_no_base_file_root_leaves_the_artifact_root_unset():
    conf = settings.master({"cachedir": "/c", "release": {}})
    assert conf["artifact_root"] is None and conf["state_dir"] == "/c/release" and conf["projects"] == {}


def test_readme_config_as_written():
    conf = master(README)
    assert conf["errors"] == {} and conf["state_dir"] == README["state_dir"]
    rainbow = conf["projects"]["rainbow"]
    assert rainbow["keep_releases"] == 5 and rainbow["build"] == ["make dist"]
    test = rainbow["environments"]["test"]
    assert test["waves"] == [{"name": "all", "target": "G@env:test", "tgt_type": "compound", "batch": "100%",
                              "bake_s": 0, "max_failures": 0}]
    pro = rainbow["environments"]["pro"]
    assert [w["name"] for w in pro["waves"]] == ["pre", "gray-north", "rest"]
    assert pro["waves"][0] == {"name": "pre", "target": "web-pre1", "tgt_type": "glob", "batch": "100%",
                               "bake_s": 0, "max_failures": 0}
    assert pro["waves"][1]["bake_s"] == 30 and pro["waves"][2]["max_failures"] == 1
    assert pro["lb"]["minion"] == "lb1" and pro["auto_rollback"] is True  # the rest is kept


def test_one_target_and_one_wave_are_the_same_plan():
    single = master({"projects": {"a": {"repo": "r", "environments": {
        "e": {"target": "web*", "batch": 2}}}}})["projects"]["a"]["environments"]["e"]["waves"]
    waved = master({"projects": {"a": {"repo": "r", "environments": {
        "e": {"waves": [{"name": "all", "target": "web*", "batch": 2}]}}}}})["projects"]["a"]["environments"]["e"]
    assert single == waved["waves"]


def test_project_timeouts_fall_back_to_the_masters():
    conf = master({"timeout_s": 20, "projects": {"a": {"repo": "r", "install_timeout_s": 99}}})
    assert conf["projects"]["a"]["timeout_s"] == 20 and conf["projects"]["a"]["install_timeout_s"] == 99


@pytest.mark.parametrize(("project", "error"), [
    ({"environments": {}}, "release:projects:bad: 'repo' is missing"),
    ({"repo": "r", "environments": {"pro": {"waves": [{"target": "a"}, {"name": "x"}]}}},
     "release:projects:bad:environments:pro:waves[1]: 'target' is missing"),
    ({"repo": "r", "environments": {"pro": {}}}, "release:projects:bad:environments:pro: 'target' is missing"),
    ({"repo": "r", "environments": {"pro": {"target": "a", "waves": [{"target": "b"}]}}},
     "release:projects:bad:environments:pro: give 'target' or 'waves', not both"),
    ({"repo": "r", "environments": {"pro": {"waves": []}}},
     "release:projects:bad:environments:pro:waves: must be a non-empty list"),
    ({"repo": "r", "environments": {"pro": {"target": "a", "batch": "half"}}},
     "release:projects:bad:environments:pro:batch: must be N or 'N%', not 'half'"),
    ({"repo": "r", "environments": {"pro": {"waves": [{"target": "a", "max_failures": "x"}]}}},
     "release:projects:bad:environments:pro:waves[0]:max_failures: must be N or 'N%'"),
    ({"repo": "r", "environments": {"pro": {"waves": [{"target": "a", "bake_s": "soon"}]}}},
     "release:projects:bad:environments:pro:waves[0]:bake_s: must be a number of seconds"),
    ({"repo": "r", "timeout_s": 0}, "release:projects:bad:timeout_s: must be more than 0"),
    ({"repo": "r", "build": "make"}, "release:projects:bad: 'build' must be a list of commands"),
    ({"repo": "r", "environments": ["pro"]}, "release:projects:bad:environments: must be a mapping"),
    ({"repo": "r", "environments": {"pro": "web*"}}, "release:projects:bad:environments:pro: must be a mapping"),
    ("just a string", "release:projects:bad: must be a mapping, not str"),
])
def test_a_bad_project_is_named_and_left_out_alone(project, error):
    conf = master({"projects": {"bad": project, "good": {"repo": "r"}}})
    assert conf["errors"]["bad"].startswith(error), conf["errors"]
    assert list(conf["projects"]) == ["good"]


def test_a_bad_master_timeout_raises_with_its_key():
    with pytest.raises(settings.SettingsError, match="release:lock_ttl_s: must be a number of seconds"):
        master({"lock_ttl_s": "forever"})
