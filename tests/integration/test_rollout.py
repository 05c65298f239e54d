"""
The safe rollout on real processes: a real master, a load-balancer minion and
four app minions; real nginx (Debian's) as the load balancer, run as www-data
on a high loopback port; each app node served by a small HTTP server that
answers from its deploy_to/current (the stack handlers have their own tests).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import make_file_root, project_config, start_cluster
from tests.integration.nginx_lb import Load, UpstreamWatcher, running_nginx, served, set_breaks, start_app_server

APPS = ("m4-web1", "m4-web2", "m4-web3", "m4-web4")
LB = "m4-lb"
SALT_RUN = os.path.join(os.path.dirname(sys.executable), "salt-run")

PILLAR = textwrap.dedent(
    """\
    {% import_json 'breaks.json' as breaks %}
    {% set node = grains['id'] %}
    release:
    {% for project in ['rainbow', 'graybad', 'budget', 'stagebad', 'slow'] %}
      {{ project }}:
        {% if project == 'stagebad' and node == 'm4-web3' %}
        deploy_to: {{ nodes_root }}/blocker/{{ project }}
        {% else %}
        deploy_to: {{ nodes_root }}/{{ node }}/{{ project }}
        {% endif %}
        user: {{ app_user }}
        {# a node listed in breaks.json gets public/ replaced by an empty shared dir: its health check 404s #}
        shared: [storage, logs{% if node in breaks.get(project, []) %}, public{% endif %}]
    {% endfor %}
    """
)


# ---------------------------------------------------------------- nginx


@pytest.fixture(scope="module")
def nginx(app_ports):
    with running_nginx([app_ports[m] for m in APPS]) as info:
        yield info


@pytest.fixture(scope="module")
def app_ports():
    return {minion: get_unused_localhost_port() for minion in APPS}


# ---------------------------------------------------------------- cluster


def environment(app_ports, nginx=None, **extra):
    env = {
        "waves": [
            {"name": "pre", "target": "m4-web1"},
            {"name": "gray-north", "target": "G@region:north", "tgt_type": "compound", "batch": 1},
            {"name": "rest", "target": "G@role:web", "tgt_type": "compound", "batch": 1},
        ],
        "health": {"url": "http://{host}/{project}/health", "expect": "release", "timeout_s": 2,
                   "retries": 2, "interval_s": 0.2},
        "host_grain": "app_addr",
        "auto_rollback": True,
    }
    if nginx:
        env["lb"] = {"minion": LB, "kind": "nginx", "upstream_file": nginx["upstream"], "backend": "{host}",
                     "test_cmd": nginx["test_cmd"], "reload_cmd": nginx["reload_cmd"]}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def rollout_cluster(salt_factories, app_repo, tmp_path_factory, app_ports, nginx):
    nodes_root = tmp_path_factory.mktemp("m4nodes")
    (nodes_root / "blocker").write_text("a file where a directory should be\n")
    flags = tmp_path_factory.mktemp("m4flags")
    file_root = make_file_root(str(tmp_path_factory.mktemp("m4files") / "base"))
    budget_env = {
        "waves": [{"name": "all", "target": "G@role:web", "tgt_type": "compound", "batch": 1,
                   "max_failures": 1}],
        "health": environment(app_ports)["health"], "host_grain": "app_addr", "auto_rollback": True,
    }
    release_config = {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("m4state")),
        "projects": {
            "rainbow": project_config(app_repo.path, environments={"pro": environment(app_ports, nginx)}),
            "graybad": project_config(app_repo.path, environments={"pro": environment(app_ports)}),
            "budget": project_config(app_repo.path, environments={"four": budget_env}),
            "stagebad": project_config(app_repo.path, environments={"pro": environment(app_ports)}),
            "slow": project_config(
                app_repo.path, build=[f"test -f {flags}/fast || sleep 25"], checks=[],
                build_user="root", build_sandbox="none",  # the build reads a flag under the test's private tmp
                environments={"one": {"target": "m4-web1"}},
            ),
        },
    }
    grains = {m: {"app_addr": f"127.0.0.1:{app_ports[m]}", "region": "south"} for m in APPS}
    grains["m4-web2"]["region"] = "north"
    grains[LB] = {"role": "lb"}
    with start_cluster(salt_factories, "m4", file_root, release_config, PILLAR, str(nodes_root),
                       minion_ids=(LB,) + APPS, grains=grains, pillar_files={"breaks.json": "{}"}) as cluster:
        cluster.flags = flags
        servers = [start_app_server(os.path.join(str(nodes_root), m), app_ports[m]) for m in APPS]
        yield cluster
        for server in servers:
            server.shutdown()


def deploy(cluster, project, env, ref, *extra):
    result, ret = cluster.run("release.deploy", project, f"env={env}", f"ref={ref}", *extra)
    return result, ret


# ---------------------------------------------------------------- tests


def test_rolling_deploy_through_nginx_loses_no_request(rollout_cluster, app_ports, nginx, event_listener):
    _, first = deploy(rollout_cluster, "rainbow", "pro", "v1.0.0")
    assert first["result"], first
    start = time.time()
    with UpstreamWatcher(nginx["upstream"]) as watcher, Load(nginx["port"]) as load:
        time.sleep(1)
        result, second = deploy(rollout_cluster, "rainbow", "pro", "v1.1.0")
        time.sleep(1)
    assert result.returncode == 0 and second["result"], second
    assert len(load.results) > 100
    failures = [r for r in load.results if r[0] != 200]
    print(f"rolling deploy under load: {len(load.results)} requests through nginx, {len(failures)} failed")
    assert failures == [], failures[:5]
    releases = [r[1] for r in load.results]
    assert releases[0] == first["release"] and releases[-1] == second["release"]
    # Every app node was seen drained while it switched, and all are back in at the end.
    assert watcher.seen_down == {f"127.0.0.1:{app_ports[m]}" for m in APPS}
    with open(nginx["upstream"], encoding="utf-8") as handle:
        assert "down" not in handle.read()
    # Waves in order: pre, then gray-north, then the rest; each node drained before it switched.
    events = sorted(event_listener.get_events([("m4", "release/rainbow/pro/*")], after_time=start),
                    key=lambda e: e.stamp)
    order = [(e.tag.split("/")[3], e.tag.split("/")[4]) for e in events if e.tag.split("/")[3] in APPS]
    activations = [minion for minion, phase in order if phase == "activate"]
    assert activations[:2] == ["m4-web1", "m4-web2"] and set(activations[2:]) == {"m4-web3", "m4-web4"}
    for minion in APPS:
        phases = [phase for m, phase in order if m == minion and phase in ("drain", "activate", "verify", "undrain")]
        assert phases == ["drain", "activate", "verify", "undrain"], (minion, phases)


def test_gray_wave_failure_stops_rollout_and_rolls_back(rollout_cluster, app_ports):
    _, first = deploy(rollout_cluster, "graybad", "pro", "v1.0.0")
    assert first["result"], first
    set_breaks(rollout_cluster, "m4-*", {"graybad": ["m4-web2"]})
    try:
        result, ret = deploy(rollout_cluster, "graybad", "pro", "v1.1.0")
    finally:
        set_breaks(rollout_cluster, "m4-*", {})
    assert result.returncode != 0 and ret["result"] is False
    assert "gray-north" in ret["error"]
    nodes = ret["nodes"]
    assert nodes["m4-web1"]["rolled_back"] and nodes["m4-web2"]["rolled_back"]
    assert "not switched" in nodes["m4-web3"]["error"] and "not switched" in nodes["m4-web4"]["error"]
    for minion in APPS:
        assert served(app_ports, minion, "graybad") == first["release"], minion
        assert nodes[minion]["release"] == first["release"]


@pytest.mark.parametrize("broken, continues", [(["m4-web2"], True), (["m4-web2", "m4-web3"], False)])
def test_failure_budget_of_one_in_a_wave_of_four(rollout_cluster, app_ports, broken, continues):
    _, first = deploy(rollout_cluster, "budget", "four", "v1.0.0")
    assert first["result"], first
    set_breaks(rollout_cluster, "m4-*", {"budget": broken})
    try:
        result, ret = deploy(rollout_cluster, "budget", "four", "v1.1.0")
    finally:
        set_breaks(rollout_cluster, "m4-*", {})
    assert result.returncode != 0  # a failed node always shows in the exit code
    assert ret["completed"] is continues
    now = {m: served(app_ports, m, "budget") for m in APPS}
    for minion in broken:
        assert now[minion] == first["release"], "a failed node goes back to its release"
    healthy = [m for m in APPS if m not in broken]
    if continues:
        assert all(now[m] == ret["release"] for m in healthy), now
    else:
        assert all(now[m] == first["release"] for m in APPS), now
        assert "not switched" in ret["nodes"]["m4-web4"]["error"]


def test_staging_failure_switches_no_node(rollout_cluster):
    result, ret = deploy(rollout_cluster, "stagebad", "pro", "v1.0.0")
    assert result.returncode != 0 and ret["failed_step"] == "install"
    assert "m4-web3" in ret["error"] and "no node was switched" in ret["error"]
    for minion in APPS:
        assert not os.path.lexists(os.path.join(rollout_cluster.deploy_to(minion, "stagebad"), "current"))


def test_plan_changes_nothing(rollout_cluster, nginx):
    artifacts = os.path.join(rollout_cluster.release_config["artifact_root"], "rainbow")
    before = sorted(os.listdir(artifacts))
    currents = {m: os.readlink(os.path.join(rollout_cluster.deploy_to(m), "current")) for m in APPS}
    result, plan = deploy(rollout_cluster, "rainbow", "pro", "release/2.0", "test=True")
    assert result.returncode == 0 and plan["test"] is True
    assert [w["name"] for w in plan["waves"]] == ["pre", "gray-north", "rest"]
    assert plan["waves"][2]["batches"] == [["m4-web3"], ["m4-web4"]]
    assert plan["nodes"]["m4-web1"]["current"] == os.path.basename(currents["m4-web1"])
    assert "_release-2.0_" in plan["release"] and "drained" in plan["load_balancer"]
    assert sorted(os.listdir(artifacts)) == before
    assert {m: os.readlink(os.path.join(rollout_cluster.deploy_to(m), "current")) for m in APPS} == currents
    assert not os.listdir(os.path.join(rollout_cluster.release_config["state_dir"], "locks")) or not any(
        f.endswith(".lock") for f in os.listdir(os.path.join(rollout_cluster.release_config["state_dir"], "locks"))
    )


def salt_run_process(cluster, *args):
    return subprocess.Popen(
        [SALT_RUN, "-c", str(cluster.master.config_dir), *args, "--out=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def test_twenty_concurrent_deploys_exactly_one_runs(rollout_cluster):
    os.makedirs(rollout_cluster.flags, exist_ok=True)
    procs = [salt_run_process(rollout_cluster, "release.deploy", "slow", "env=one", "ref=master")
             for _ in range(20)]
    outputs = [(p.wait(timeout=240), p.communicate()[0]) for p in procs]
    winners = [out for code, out in outputs if code == 0]
    losers = [out for code, out in outputs if code != 0]
    assert len(winners) == 1, [o[-300:] for _, o in outputs]
    assert all("locked by" in out for out in losers)


def test_killed_deploy_leaves_a_lock_that_unlock_breaks(rollout_cluster, event_listener):
    lock = os.path.join(rollout_cluster.release_config["state_dir"], "locks", "slow.one.lock")
    proc = salt_run_process(rollout_cluster, "release.deploy", "slow", "env=one", "ref=master")
    deadline = time.monotonic() + 60
    while not os.path.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.exists(lock)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(lock), "SIGKILL leaves the lock behind"
    # A live deploy elsewhere would refuse; this one is dead, so unlock breaks it.
    start = time.time()
    result, ret = rollout_cluster.run("release.unlock", "slow", "env=one")
    assert result.returncode == 0 and ret["result"], ret
    assert not os.path.exists(lock)
    broken = event_listener.wait_for_events([("m4", "release/slow/one/lock/broken")], timeout=30, after_time=start)
    assert broken.found_all_events
    assert "token" not in next(iter(broken.matches)).data["broken"]
    open(os.path.join(rollout_cluster.flags, "fast"), "w").close()
    try:
        result, ret = deploy(rollout_cluster, "slow", "one", "master")
    finally:
        os.unlink(os.path.join(rollout_cluster.flags, "fast"))
    assert result.returncode == 0 and ret["result"], ret


def test_unlock_refuses_a_live_holder_and_stale_fence_is_refused(rollout_cluster):
    proc = salt_run_process(rollout_cluster, "release.deploy", "slow", "env=one", "ref=master")
    lock = os.path.join(rollout_cluster.release_config["state_dir"], "locks", "slow.one.lock")
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(lock) and time.monotonic() < deadline:
            time.sleep(0.2)
        result, ret = rollout_cluster.run("release.unlock", "slow", "env=one")
        assert result.returncode != 0 and "may be alive" in ret["error"]
        assert os.path.exists(lock)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rollout_cluster.run("release.unlock", "slow", "env=one", "force=True")
    current = os.path.basename(os.readlink(os.path.join(rollout_cluster.deploy_to("m4-web1", "slow"), "current")))
    refused = rollout_cluster.salt_cli.run("release.activate", "slow", current, "fence=1", minion_tgt="m4-web1")
    assert refused.returncode != 0 and "stale deploy refused" in str(refused.stdout) + str(refused.data)
