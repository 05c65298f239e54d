"""
Highstate with the README's own shapes: an environment written with
``waves:`` and no ``state_dir`` in the master config (the default
``<cachedir>/release``). Master "m8" with minions m8-web1..2: after a good
deploy, a node that never had the project gets the published release from the
``release_fleet`` ext_pillar by ``state.apply release``.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT, start_cluster

MINIONS = ("m8-web1", "m8-web2")
PILLAR = """\
release:
  rainbow:
    deploy_to: {{ nodes_root }}/m8/{{ grains['id'] }}/rainbow
    user: {{ app_user }}
    shared: [storage]
"""


@pytest.fixture(scope="module")
def m8(salt_factories, app_repo, nodes_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("m8_file_root")
    for folder in ("_modules", "_runners", "_utils", "_states", "_pillar"):
        os.symlink(os.path.join(REPO_ROOT, folder), root / folder)
    os.symlink(os.path.join(REPO_ROOT, "salt", "release"), root / "release")
    (root / "releases").mkdir()
    release = {  # no state_dir, no artifact_root: both from their defaults
        "projects": {"rainbow": {
            "repo": app_repo.path, "build": ["make dist"],
            "environments": {"pro": {"waves": [
                {"name": "first", "target": "m8-web1"},
                {"name": "rest", "target": "m8-web*", "batch": 1},
            ]}},
        }},
    }
    overrides = {"ext_pillar": [{"release_fleet": {}}]}
    with start_cluster(salt_factories, "m8", str(root), release, PILLAR, nodes_root,
                       minion_ids=MINIONS, master_overrides=overrides) as cluster:
        yield cluster


def current(cluster, minion):
    link = os.path.join(cluster.nodes_root, "m8", minion, "rainbow", "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def test_a_new_node_gets_the_published_release_of_a_waves_environment(m8):
    result, ret = m8.run("release.deploy", "rainbow", "env=pro", "ref=master")
    assert result.returncode == 0 and ret["result"], ret
    release = ret["release"]
    assert [current(m8, m) for m in MINIONS] == [release] * 2
    state_dir = os.path.join(m8.master.config["cachedir"], "release")
    assert os.path.isfile(os.path.join(state_dir, "fleet", "rainbow", "pro.json"))
    first_root = m8.master.config["file_roots"]["base"][0]
    assert os.path.isfile(os.path.join(first_root, "releases", "rainbow", f"{release}.tar.gz"))

    # Fresh from the ext_pillar (the CLI masks pillar values; the state below reads them).
    pillar = m8.salt_cli.run("pillar.items", minion_tgt="m8-web2").data
    assert set(pillar["release_fleet"]["rainbow"]) == {"env", "release", "source", "source_hash"}, pillar

    node = os.path.join(m8.nodes_root, "m8", "m8-web2")
    subprocess.run(["rm", "-rf", node], check=True)  # a node that never had the project
    applied = m8.salt_cli.run("state.apply", "release", minion_tgt="m8-web2")
    state = next(iter(applied.data.values()))
    assert applied.returncode == 0 and state["result"] is True, applied
    assert state["changes"] == {"old": None, "new": release}, state
    assert current(m8, "m8-web2") == release
    with open(os.path.join(node, "rainbow", "meta", release, "RELEASE.json"), encoding="utf-8") as handle:
        assert json.load(handle)["name"] == release
