"""
Highstate with the README's own shapes: an environment written with
``waves:`` and no ``state_dir`` in the master config (the default
``<cachedir>/release``), a health check per node. Master "m8" with minions
m8-web1..2 (m8-web3 joins after the deploys), each served by a small app
server from its own ``current``: ``state.apply release`` gives a node that
never had the project, a node that drifted and a minion added later the
published release, configured, switched, health-checked, and reports it.
``diff=True`` is a dry run that none of this sees.
"""

import json
import os
import subprocess
import time

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import REPO_ROOT, start_cluster
from tests.integration.nginx_lb import served, start_app_server

MINIONS = ("m8-web1", "m8-web2")
LATE = "m8-web3"
PILLAR = """\
release:
  rainbow:
    deploy_to: {{ nodes_root }}/m8/{{ grains['id'] }}/rainbow
    user: {{ app_user }}
    shared: [storage]
    files:
      config/node.txt: {contents: "rendered for highstate"}
"""


@pytest.fixture(scope="module")
def ports():
    return {m: get_unused_localhost_port() for m in (*MINIONS, LATE)}


@pytest.fixture(scope="module")
def m8(salt_factories, app_repo, nodes_root, tmp_path_factory, ports):
    root = tmp_path_factory.mktemp("m8_file_root")
    for folder in ("_modules", "_runners", "_utils", "_states", "_pillar"):
        os.symlink(os.path.join(REPO_ROOT, folder), root / folder)
    os.symlink(os.path.join(REPO_ROOT, "salt", "release"), root / "release")
    (root / "releases").mkdir()
    release = {  # no state_dir, no artifact_root: both from their defaults
        "projects": {"rainbow": {
            "repo": app_repo.path, "build": ["make dist"],
            "environments": {"pro": {
                "waves": [{"name": "first", "target": "m8-web1"}, {"name": "rest", "target": "m8-web*", "batch": 1}],
                "health": {"url": "http://{host}/rainbow/health", "timeout_s": 5, "retries": 3, "interval_s": 0.5},
                "host_grain": "web_addr",
            }},
        }},
    }
    overrides = {"ext_pillar": [{"release_fleet": {}}]}
    grains = {m: {"web_addr": f"127.0.0.1:{port}"} for m, port in ports.items()}
    servers = [start_app_server(os.path.join(nodes_root, "m8", m), port) for m, port in ports.items()]
    try:
        with start_cluster(salt_factories, "m8", str(root), release, PILLAR, nodes_root,
                           minion_ids=MINIONS, master_overrides=overrides, grains=grains) as cluster:
            cluster.grains = grains
            yield cluster
    finally:
        for server in servers:
            server.shutdown()


def current(cluster, minion):
    link = os.path.join(cluster.nodes_root, "m8", minion, "rainbow", "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def apply(cluster, minion, *args):
    """``state.apply release`` on one minion: (process result, {state id: state return})."""
    applied = cluster.salt_cli.run("state.apply", "release", *args, minion_tgt=minion)
    states = {ret["__id__"]: ret for ret in (applied.data or {}).values()} if isinstance(applied.data, dict) else {}
    return applied, states


def deployed(cluster, ref):
    result, ret = cluster.run("release.deploy", "rainbow", "env=pro", f"ref={ref}")
    assert result.returncode == 0 and ret["result"], ret
    return ret["release"]


def test_a_new_node_gets_the_published_release_of_a_waves_environment(m8, ports):
    release = deployed(m8, "master")
    assert [current(m8, m) for m in MINIONS] == [release] * 2
    state_dir = os.path.join(m8.master.config["cachedir"], "release")
    assert os.path.isfile(os.path.join(state_dir, "fleet", "rainbow", "pro.json"))
    first_root = m8.master.config["file_roots"]["base"][0]
    assert os.path.isfile(os.path.join(first_root, "releases", "rainbow", f"{release}.tar.gz"))

    # Fresh from the ext_pillar (the CLI masks pillar values; the state below reads them).
    pillar = m8.salt_cli.run("pillar.items", minion_tgt="m8-web2").data
    assert set(pillar["release_fleet"]["rainbow"]) == {"env", "release", "source", "source_hash", "health",
                                                       "host_grain"}, pillar

    node = os.path.join(m8.nodes_root, "m8", "m8-web2")
    subprocess.run(["rm", "-rf", node], check=True)  # a node that never had the project
    assert served(ports, "m8-web2", "rainbow") is None
    applied, states = apply(m8, "m8-web2")
    state = states["release-rainbow"]
    assert applied.returncode == 0 and state["result"] is True, state
    assert state["changes"] == {"old": None, "new": release}, state
    assert "health check http://127.0.0.1:" in state["comment"] and f"current reads back {release}" in state["comment"]
    assert states["release-rainbow-pruned"]["result"] is True, states
    assert current(m8, "m8-web2") == release
    assert served(ports, "m8-web2", "rainbow") == release
    with open(os.path.join(node, "rainbow", "meta", release, "RELEASE.json"), encoding="utf-8") as handle:
        assert json.load(handle)["name"] == release
    with open(os.path.join(node, "rainbow", "current", "config", "node.txt"), encoding="utf-8") as handle:
        assert handle.read() == "rendered for highstate"
    listed = m8.salt_cli.run("release.list", "rainbow", minion_tgt="m8-web2").data
    assert listed["current"] == release, listed


def _artifacts(m8):
    folder = os.path.join(m8.master.config["file_roots"]["base"][0], "releases", "rainbow")
    return sorted(os.listdir(folder))


def _staged(m8, minion):
    staging = os.path.join(m8.nodes_root, "m8", minion, "rainbow", ".staging")
    return sorted(os.listdir(staging)) if os.path.isdir(staging) else []


def test_a_dry_run_records_no_deploy_publishes_nothing_and_leaves_nothing_staged(m8):
    _, stats_before = m8.run("release.stats", "rainbow")
    fleet = os.path.join(m8.master.config["cachedir"], "release", "fleet", "rainbow", "pro.json")
    with open(fleet, encoding="utf-8") as handle:
        published_before = handle.read()
    artifacts_before = _artifacts(m8)
    # What a runner killed mid-build leaves: its build folder, unlocked since it died.
    builds = os.path.join(m8.master.config["cachedir"], "release", "builds")
    stale = os.path.join(builds, "0" * 32)
    os.makedirs(os.path.join(stale, "tree", "public"))
    old = time.time() - 3600
    os.utime(stale, (old, old))

    result, ret = m8.run("release.deploy", "rainbow", "env=pro", "ref=v1.0.0", "diff=True")
    assert result.returncode == 0 and ret["result"] is True and ret["dry_run"] is True, ret
    for minion in MINIONS:
        node = ret["nodes"][minion]
        assert set(node) == {"result", "files"}, node
        assert set(node["files"]) == {"config/node.txt"} and len(node["files"]["config/node.txt"]["sha256"]) == 64

    _, stats_after = m8.run("release.stats", "rainbow")
    assert stats_after["deploys"] == stats_before["deploys"], (stats_before, stats_after)
    with open(fleet, encoding="utf-8") as handle:
        assert handle.read() == published_before
    assert _artifacts(m8) == artifacts_before
    assert [_staged(m8, m) for m in MINIONS] == [[], []]
    assert os.listdir(builds) == []  # the dead run's build and this run's own
    _, history = m8.run("release.history", "rainbow", "limit=1")
    assert history["runs"][0]["kind"] == "plan", history
    for minion in MINIONS:
        applied, states = apply(m8, minion, "test=True")
        state = states["release-rainbow"]
        assert state["result"] is True and state["changes"] == {} and "already runs" in state["comment"], state


def test_a_drifted_node_is_brought_back(m8, ports):
    first = current(m8, "m8-web1")
    release = deployed(m8, "v1.1.0")
    link = os.path.join(m8.nodes_root, "m8", "m8-web1", "rainbow", "current")
    os.unlink(link)
    os.symlink(os.path.join("releases", first), link)  # switched by hand
    assert served(ports, "m8-web1", "rainbow") == first

    applied, states = apply(m8, "m8-web1", "test=True")
    state = states["release-rainbow"]
    assert state["result"] is None and state["changes"] == {"old": first, "new": release}, state
    assert f"{release} is installed" in state["comment"] and "check http://127.0.0.1:" in state["comment"], state
    assert current(m8, "m8-web1") == first

    applied, states = apply(m8, "m8-web1")
    state = states["release-rainbow"]
    assert applied.returncode == 0 and state["result"] is True, state
    assert state["changes"] == {"old": first, "new": release} and "passed" in state["comment"], state
    assert current(m8, "m8-web1") == release
    assert served(ports, "m8-web1", "rainbow") == release


def test_a_minion_added_after_the_deploy_gets_the_release_by_highstate(m8, ports):
    release = current(m8, "m8-web1")
    minion = m8.master.salt_minion_daemon(LATE, overrides={"grains": dict(m8.grains[LATE], env="test", role="web")})
    with minion.started(start_timeout=120):
        synced = m8.salt_cli.run("saltutil.sync_all", minion_tgt=LATE)
        assert synced.returncode == 0, synced
        applied, states = apply(m8, LATE)
        state = states["release-rainbow"]
        assert applied.returncode == 0 and state["result"] is True, state
        assert state["changes"] == {"old": None, "new": release}, state
        assert current(m8, LATE) == release
        assert served(ports, LATE, "rainbow") == release
