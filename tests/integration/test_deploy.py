"""
End to end on the shared cluster (master "master", minions web1..web3): the
runner deploys git refs, refuses bad input before touching any node, and says
exactly what failed in its return, its events and its exit code.
"""

import json
import os
import pwd
import tarfile
import time
import uuid

import pytest

import release_contract as contract

MINIONS = ("web1", "web2", "web3")


# ---------------------------------------------------------------- helpers


def deploy(cluster, project, env, ref, *extra):
    """Run a deploy; returns (process result, runner return, time it started)."""
    started = time.time()
    result, ret = cluster.run("release.deploy", project, f"env={env}", f"ref={ref}", *extra)
    return result, ret, started


def phase_events(event_listener, cluster, project, env, after):
    """``{(minion, phase): data}`` of the node phase events fired since ``after``."""
    found = {}
    pattern = (cluster.master.id, f"release/{project}/{env}/*/*")
    for event in event_listener.get_events([pattern], after_time=after):
        _, _, _, minion, phase = event.tag.split("/")
        # A minion's event.send reaches the master bus wrapped: {'id', 'data': {...}}.
        data = event.data["data"] if isinstance(event.data.get("data"), dict) else event.data
        found[(minion, phase)] = {k: v for k, v in data.items() if not k.startswith("_")}
    return found


def wait_phase_events(event_listener, cluster, project, env, after, expected):
    patterns = [(cluster.master.id, f"release/{project}/{env}/{m}/{p}") for m, p in expected]
    matched = event_listener.wait_for_events(patterns, timeout=30, after_time=after)
    assert matched.found_all_events, f"missing events: {matched.missed}"
    return phase_events(event_listener, cluster, project, env, after)


def snapshot(root):
    """Every path under ``root`` with what it is (and where links point)."""
    seen = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            seen.append((path, os.readlink(path) if os.path.islink(path) else os.path.isdir(path)))
    return sorted(seen)


def current_of(cluster, minion, project="rainbow"):
    link = os.path.join(cluster.deploy_to(minion, project), "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def assert_deployed(cluster, result, ret, ref):
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert ret["result"] is True and ret["retcode"] == 0, ret
    assert sorted(ret["nodes"]) == list(MINIONS)
    for minion, node in ret["nodes"].items():
        assert node["result"] is True and node["error"] is None, node
        assert node["release"] == ret["release"]
        assert current_of(cluster, minion) == ret["release"]
    assert ret["ref"] == ref
    return contract.parse_release_name(ret["release"])


# ---------------------------------------------------------------- deploys


@pytest.fixture(scope="module")
def tag_deploy(cluster, event_listener):
    result, ret, started = deploy(cluster, "rainbow", "test", "v1.0.0", "author=Jane Doe")
    return result, ret, started


def test_deploy_a_tag(cluster, app_repo, tag_deploy):
    result, ret, _ = tag_deploy
    fields = assert_deployed(cluster, result, ret, "v1.0.0")
    assert fields["project"] == "rainbow" and fields["env"] == "test"
    assert fields["version"] == "v1.0.0" and fields["branch"] == "v1.0.0"
    assert fields["author"] == "Jane-Doe"
    assert ret["commit"] == app_repo.head("v1.0.0")
    assert ret["project"] == "rainbow" and ret["env"] == "test"
    assert isinstance(ret["duration_s"], float)
    assert all(node["previous"] is None for node in ret["nodes"].values())
    # The live progress lines salt-run printed while the deploy ran.
    for number, minion in enumerate(MINIONS, 1):
        assert f"[{number}/3] {minion} activated {ret['release']} in " in result.stdout


def test_name_and_manifest_follow_the_rules(cluster, app_repo, tag_deploy):
    _, ret, _ = tag_deploy
    name = ret["release"]
    assert contract.NAME_PATTERN.match(name) and ":" not in name
    stamp = contract.parse_release_name(name)["timestamp"]
    assert abs(time.mktime(time.strptime(stamp, contract.TIMESTAMP_FORMAT)) - time.mktime(time.gmtime())) < 600
    staged = os.path.join(cluster.release_config["artifact_root"], "rainbow", f"{name}.tar.gz")
    with tarfile.open(staged) as tar:
        manifest = json.load(tar.extractfile(contract.MANIFEST_NAME))
        files = [m for m in tar.getmembers() if not m.isdir() and m.name != contract.MANIFEST_NAME]
        assert not any(m.name.split("/")[0] == ".git" for m in tar.getmembers())
    assert contract.validate_manifest(manifest, name) == []
    assert manifest["file_count"] == len(files)
    assert manifest["commit"] == app_repo.head("v1.0.0")
    assert (manifest["project"], manifest["env"], manifest["ref"]) == ("rainbow", "test", "v1.0.0")
    assert (manifest["version"], manifest["branch"], manifest["author"]) == ("v1.0.0", "v1.0.0", "Jane Doe")
    assert manifest["full_ref"] == "refs/tags/v1.0.0"
    # Each node holds the same manifest, and the built tree (make dist ran on the master).
    for minion in MINIONS:
        release_dir = os.path.join(cluster.deploy_to(minion), "releases", name)
        with open(os.path.join(cluster.deploy_to(minion), "meta", name, contract.MANIFEST_NAME)) as handle:
            assert json.load(handle) == manifest
        assert not os.path.lexists(os.path.join(release_dir, contract.MANIFEST_NAME))
        assert os.path.isfile(os.path.join(release_dir, "BUILD"))


def test_node_phase_events(cluster, event_listener, tag_deploy):
    _, ret, started = tag_deploy
    expected = [(m, p) for m in MINIONS for p in ("install", "activate")]
    events = wait_phase_events(event_listener, cluster, "rainbow", "test", started, expected)
    for key in expected:
        data = events[key]
        assert {"release", "result", "duration_s", "error"} <= set(data), data
        assert data["release"] == ret["release"] and data["result"] is True
        assert data["error"] is None and data["duration_s"] >= 0


def test_code_is_not_writable_by_the_app_user_and_shared_is(cluster, tag_deploy):
    _, ret, _ = tag_deploy
    app = pwd.getpwnam("www-data")
    for minion in MINIONS:
        root = cluster.deploy_to(minion)
        release_dir = os.path.join(root, "releases", ret["release"])
        for folder, dirs, files in os.walk(release_dir):
            assert ".git" not in dirs
            for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
                st = os.lstat(path)
                if os.path.islink(path):
                    continue
                assert st.st_uid != app.pw_uid and st.st_mode & 0o022 == 0, (path, oct(st.st_mode))
        for rel in ("storage", "logs"):
            link = os.path.join(release_dir, rel)
            assert os.path.islink(link)
            assert os.path.realpath(link) == os.path.realpath(os.path.join(root, "shared", rel))
            assert os.stat(link).st_uid == app.pw_uid


def test_deploy_a_branch(cluster, app_repo):
    before = current_of(cluster, "web1")
    result, ret, _ = deploy(cluster, "rainbow", "test", "release/2.0")
    fields = assert_deployed(cluster, result, ret, "release/2.0")
    assert fields["branch"] == "release-2.0"
    assert ret["commit"] == app_repo.head("release/2.0")
    assert fields["version"].startswith("v1.1.0-1-g") and ret["commit"].startswith(fields["version"][10:])
    assert all(node["previous"] == before for node in ret["nodes"].values())
    release_dir = os.path.join(cluster.deploy_to("web2"), "current")
    with open(os.path.join(release_dir, "VERSION")) as handle:
        assert handle.read() == "2.0.0-dev\n"


def test_deploy_a_bare_commit(cluster, app_repo):
    commit = app_repo.head("v1.1.0^{commit}")  # v1.1.0 is annotated: its own id is a tag object
    result, ret, _ = deploy(cluster, "rainbow", "test", commit)
    fields = assert_deployed(cluster, result, ret, commit)
    assert fields["branch"] == "detached" and fields["version"] == "v1.1.0"
    assert ret["commit"] == commit


def test_redeploy_the_same_ref(cluster):
    first_result, first, _ = deploy(cluster, "rainbow", "test", "v1.0.0")
    assert_deployed(cluster, first_result, first, "v1.0.0")
    time.sleep(1)  # names carry the build second
    result, again, _ = deploy(cluster, "rainbow", "test", "v1.0.0")
    assert_deployed(cluster, result, again, "v1.0.0")
    assert again["release"] != first["release"]
    assert all(node["previous"] == first["release"] for node in again["nodes"].values())
    releases = os.listdir(os.path.join(cluster.deploy_to("web1"), "releases"))
    assert {first["release"], again["release"]} <= set(releases)


@pytest.mark.parametrize("ref", ["--upload-pack=touch${IFS}/tmp/{marker}", "-x", "a..b"])
def test_refused_refs_touch_no_node(cluster, ref):
    marker = f"/tmp/sr-pwned-{uuid.uuid4().hex}"
    ref = ref.replace("/tmp/{marker}", marker)
    before = snapshot(cluster.nodes_root)
    result, ret, _ = deploy(cluster, "rainbow", "test", ref)
    assert result.returncode != 0
    assert ret["result"] is False and ret["retcode"] == 1
    assert ret["failed_step"] == "fetch" and "refused ref" in ret["error"], ret
    assert ret["nodes"] == {}
    assert snapshot(cluster.nodes_root) == before
    assert not os.path.exists(marker)


def test_a_failing_check_touches_no_node(cluster):
    result, ret, _ = deploy(cluster, "badcheck", "test", "v1.0.0")
    assert result.returncode != 0 and ret["retcode"] == 1
    assert ret["result"] is False and ret["failed_step"] == "check"
    assert "exited 3" in ret["error"]
    assert "quality gate says no" in ret["output"]["checks"]
    assert ret["nodes"] == {}
    for minion in MINIONS:
        assert not os.path.exists(cluster.deploy_to(minion, "badcheck"))


def test_one_unwritable_node_fails_and_no_node_switches(cluster, event_listener):
    result, ret, started = deploy(cluster, "brittle", "test", "v1.0.0")
    assert result.returncode != 0 and ret["retcode"] == 1
    assert ret["result"] is False and ret["failed_step"] == "install"
    assert ret["error"] == "install failed on web3: no node was switched"
    web3 = ret["nodes"]["web3"]
    assert web3["result"] is False and "blocker" in web3["error"], web3
    for minion in ("web1", "web2"):
        assert ret["nodes"][minion]["result"] is True and ret["nodes"][minion]["phase"] == "install"
    for minion in MINIONS:
        assert current_of(cluster, minion, "brittle") is None
    expected = [(m, "install") for m in MINIONS]
    events = wait_phase_events(event_listener, cluster, "brittle", "test", started, expected)
    assert events[("web3", "install")]["result"] is False
    assert "blocker" in events[("web3", "install")]["error"]
    assert events[("web1", "install")]["result"] is True
    assert not any(phase == "activate" for _, phase in events)


def test_a_target_matching_nothing_fails(cluster):
    result, ret, _ = deploy(cluster, "rainbow", "nowhere", "v1.0.0")
    assert result.returncode != 0 and ret["retcode"] == 1
    assert ret["failed_step"] == "plan" and "matched no minion" in ret["error"]


def test_unknown_project_and_env_are_refused(cluster):
    result, ret, _ = deploy(cluster, "nosuch", "test", "v1.0.0")
    assert result.returncode != 0 and "unknown project 'nosuch'" in ret["error"]
    result, ret, _ = deploy(cluster, "rainbow", "nosuch", "v1.0.0")
    assert result.returncode != 0 and "no environment 'nosuch'" in ret["error"]


def test_release_list_works_masterless_from_the_node_cache(cluster, tag_deploy):
    minion = cluster.minions[0]
    listed = minion.salt_call_cli(timeout=60).run("--local", "release.list", "rainbow")
    assert listed.returncode == 0, listed
    assert listed.data["current"] == current_of(cluster, minion.id)
    assert tag_deploy[1]["release"] in listed.data["releases"]
    names = listed.data["releases"]
    assert names == sorted(names, key=contract.release_sort_key)
