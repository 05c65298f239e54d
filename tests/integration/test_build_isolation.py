"""
Hostile input from git, through a real master (its own, "isomaster", with
one minion): a crafted commit that escapes tar extraction, a build that goes
after the master's secrets, and a branch and a tag with the same name. Judged
on disk: canaries, secret files, the node's deploy_to and its manifest.
"""

import json
import os
import subprocess
import textwrap

import pytest

import release_contract as contract
from tests import gitcraft as craft
from tests.conftest import AppRepo, git, make_app_repo, make_file_root, project_config, start_cluster

MINION = "iso1"
SECRET_MARK = "iso-secret-"
PROJECTS = ("rainbow", "hostile", "plainbuild", "crafted", "clash")

PILLAR = textwrap.dedent(
    """\
    release:
    {% for project in ['rainbow', 'hostile', 'plainbuild', 'crafted', 'clash'] %}
      {{ project }}:
        deploy_to: {{ nodes_root }}/iso1/{{ project }}
        user: {{ app_user }}
        keep_releases: 5
    {% endfor %}
    """
)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("iso-git")
    app = make_app_repo(str(root / "rainbow"))
    clash = make_app_repo(str(root / "clash"))
    git(clash.path, "checkout", "-q", "-b", "v1.1.0", "release/2.0")  # a branch named like the tag
    git(clash.path, "checkout", "-q", "master")
    crafted = str(root / "crafted.git")
    subprocess.run(["git", "init", "-q", "--bare", crafted], check=True)
    return {"rainbow": app.path, "clash": clash.path, "crafted": crafted}


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("iso-canary")
    (folder / "flag").write_text("original")
    return folder


@pytest.fixture(scope="module")
def iso(salt_factories, tmp_path_factory, repos, canary):
    nodes_root = str(tmp_path_factory.mktemp("iso-nodes"))
    file_root = make_file_root(str(tmp_path_factory.mktemp("iso-files") / "base"))
    state_dir = str(tmp_path_factory.mktemp("iso-state"))
    dest = os.path.join(state_dir, "builds", "x" * 32)  # the length and depth of a real build tree
    tree = craft.cve_2025_4517_tree(repos["crafted"], dest, canary)
    craft.git(repos["crafted"], "update-ref", "refs/heads/evil", craft.commit(repos["crafted"], tree))

    def project(repo, **extra):
        return project_config(repo, environments={"one": {"target": MINION}}, **extra)

    config = {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": state_dir,
        "projects": {
            "rainbow": project(repos["rainbow"]),
            "hostile": project(repos["rainbow"], build=["sh probe.sh"], checks=[]),
            "plainbuild": project(repos["rainbow"], build=["sh probe.sh"], checks=[], build_sandbox="none"),
            "crafted": project(repos["crafted"], build=[], checks=[]),
            "clash": project(repos["clash"]),
        },
    }
    with start_cluster(salt_factories, "isomaster", file_root, config, PILLAR, nodes_root,
                       minion_ids=(MINION,)) as cluster:
        yield cluster


def deploy(iso, project, ref, *extra):
    return iso.run("release.deploy", project, "env=one", f"ref={ref}", *extra)


def node_tree(iso, project):
    return os.path.join(iso.nodes_root, MINION, project)


def test_a_crafted_commit_writes_nothing_outside_and_touches_no_node(iso, canary):
    result, ret = deploy(iso, "crafted", "evil")
    assert result.returncode != 0 and ret["retcode"] == 1
    assert ret["failed_step"] == "build" and "refused export" in ret["error"], ret
    assert (canary / "flag").read_text() == "original"
    assert sorted(os.listdir(canary)) == ["flag"]
    assert os.listdir(os.path.join(iso.release_config["state_dir"], "builds")) == []
    assert not os.path.exists(node_tree(iso, "crafted"))


def _secrets(iso):
    """The master's secret files: its config, its private key, the history, another project's mirror."""
    state_dir = iso.release_config["state_dir"]
    return {
        "config": iso.master.config["conf_file"],
        "pki": os.path.join(iso.master.config["pki_dir"], "master.pem"),
        "history": os.path.join(state_dir, "history.db"),
        "mirror": os.path.join(state_dir, "git", "rainbow.git", "config"),
    }


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def _probe(secrets, outside):
    """A build script that tries each read and write and notes the outcome in PROBE (shipped to the node)."""
    lines = ["#!/bin/sh", ": > PROBE"]
    for name, path in sorted(secrets.items()):
        lines.append(f"if cat '{path}' >> LEAK 2>/dev/null; then echo 'READ {name}'; "
                     f"else echo 'DENIED {name}'; fi >> PROBE")
    for name, path in sorted(outside.items()):
        lines.append(f"if echo pwned > '{path}' 2>/dev/null; then echo 'WROTE {name}'; "
                     f"else echo 'DENIED {name}'; fi >> PROBE")
    lines.append("id -un >> PROBE")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def probed(iso, repos):
    """Deploy rainbow (so a mirror and history exist), then the probing build under each sandbox mode."""
    assert deploy(iso, "rainbow", "v1.0.0")[0].returncode == 0
    secrets = _secrets(iso)
    assert all(os.path.isfile(path) for path in secrets.values()), secrets
    state_dir = iso.release_config["state_dir"]
    outside = {"state_dir": os.path.join(state_dir, "pwned"),
               "builds": os.path.join(state_dir, "builds", "pwned"),
               "artifact_root": os.path.join(iso.release_config["artifact_root"], "pwned"),
               "history": secrets["history"]}
    before = {path: _read(path) for path in secrets.values()}
    AppRepo(repos["rainbow"]).commit("probe", {"probe.sh": _probe(secrets, outside)})
    runs = {project: deploy(iso, project, "master") for project in ("hostile", "plainbuild")}
    return runs, secrets, outside, before


@pytest.mark.parametrize("project", ["hostile", "plainbuild"])
def test_a_build_cannot_read_secrets_or_write_outside_its_tree(iso, probed, project):
    runs, secrets, outside, before = probed
    result, ret = runs[project]
    assert result.returncode == 0, ret
    current = os.path.join(node_tree(iso, project), "current")
    with open(os.path.join(current, "PROBE")) as handle:
        probe = handle.read().splitlines()
    assert sorted(probe[:-1]) == sorted(f"DENIED {name}" for name in list(secrets) + list(outside)), probe
    assert probe[-1] == "salt-release-build"
    leak = os.path.join(current, "LEAK")
    assert not os.path.exists(leak) or os.path.getsize(leak) == 0
    for path, content in before.items():
        if path == secrets["history"]:  # the deploys themselves write it: only no trace of the build's write
            assert b"pwned" not in _read(path)
        else:
            assert _read(path) == content, path
    assert not any(os.path.exists(path) for name, path in outside.items() if name != "history")


# ---------------------------------------------------------------- exact refs


def _manifest(iso, project):
    running = os.path.basename(os.readlink(os.path.join(node_tree(iso, project), "current")))
    with open(os.path.join(node_tree(iso, project), "meta", running, contract.MANIFEST_NAME)) as handle:
        return json.load(handle)


def test_a_name_that_is_both_branch_and_tag_is_refused_naming_both(iso):
    result, ret = deploy(iso, "clash", "v1.1.0")
    assert result.returncode != 0 and ret["failed_step"] == "fetch"
    assert "refs/heads/v1.1.0" in ret["error"] and "refs/tags/v1.1.0" in ret["error"], ret
    assert not os.path.exists(node_tree(iso, "clash"))


@pytest.mark.parametrize("ref, kind", [("refs/tags/v1.1.0", "tag"), ("refs/heads/v1.1.0", "branch")])
def test_a_full_ref_deploys_its_own_commit(iso, repos, ref, kind):
    expected = git(repos["clash"], "rev-parse", f"{ref}^{{commit}}")
    result, ret = deploy(iso, "clash", ref)
    assert result.returncode == 0, ret
    manifest = _manifest(iso, "clash")
    assert manifest["commit"] == expected and manifest["full_ref"] == ref
    assert manifest["branch"] == "v1.1.0"
    with open(os.path.join(node_tree(iso, "clash"), "current", "VERSION")) as handle:
        assert handle.read() == ("1.1.0\n" if kind == "tag" else "2.0.0-dev\n")
