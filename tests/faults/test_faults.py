"""
Fault injection on real processes: a real master, three app minions and a
load-balancer minion; real nginx as the load balancer (the setup of
tests/integration/test_rollout.py). Each test injects one fault into a
rollout and judges the outcome on the nodes: ``readlink`` of each node's
``current``, the nginx upstream file, and requests served through nginx.
Measured times are printed for docs/faults.md.
"""

import os
import shlex
import subprocess
import textwrap
import time

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import make_file_root, project_config, start_cluster
from tests.faults.injection import BusWatcher, Gates, HealthGate, kill_tree
from tests.integration.nginx_lb import (
    UpstreamWatcher,
    running_nginx,
    set_breaks,
    start_app_server,
    through_nginx,
    upstream_down,
)

APPS = ("f3-web1", "f3-web2", "f3-web3")
LB = "f3-lb"
PROJECTS = ("lbfail", "wavebad", "opdown", "readback", "gone")
# One project per kill -9 cell (and the hanging check): every cell starts from a fresh history.
RUNNER_PHASES = ("install", "drain", "activate", "verify", "undrain", "rollback")
# The phases where a kill -9 of a minion or of the master is not in a test of its own below:
# (phase, the minion that works at that phase).
MINION_PHASES = (("install", "f3-web1"), ("verify", "f3-web1"), ("undrain", LB), ("rollback", "f3-web2"))
MASTER_PHASES = ("install", "drain", "verify", "undrain", "rollback")
KILLED = tuple(f"kr{phase}" for phase in RUNNER_PHASES) + (
    tuple(f"kmi{phase}" for phase, _ in MINION_PHASES) + tuple(f"kma{phase}" for phase in MASTER_PHASES)
) + ("krfinish", "kropdown", "kminion", "klb", "kmaster", "hang", "klbundrain")

PILLAR = textwrap.dedent(
    """\
    {% import_json 'breaks.json' as breaks %}
    {% set node = grains['id'] %}
    release:
    {% for project in PROJECTS %}
      {{ project }}:
        deploy_to: {{ nodes_root }}/{{ node }}/{{ project }}
        user: {{ app_user }}
        {# a node listed in breaks.json gets public/ replaced by an empty shared dir: its health check 404s #}
        shared: [storage, logs{% if node in breaks.get(project, []) %}, public{% endif %}]
        {% if project == 'readback' and node == 'f3-web2' %}
        {# the stack reload fails whenever current is a 1.1.0 release: after the symlink moved #}
        stack:
          kind: command
          run_as: root
          reload: 'case "$(readlink {{ nodes_root }}/{{ node }}/readback/current)" in *1.1.0*) exit 3;; esac'
        {% elif project.startswith('k') %}
        {# the test can hold this node's stack reload at its gate #}
        stack:
          kind: command
          run_as: root
          reload: 'GATES/gate reload-{{ project }}-{{ node }}'
        {% endif %}
    {% endfor %}
    """
)


@pytest.fixture(scope="module")
def app_ports():
    return {minion: get_unused_localhost_port() for minion in APPS}


@pytest.fixture(scope="module")
def nginx(app_ports):
    with running_nginx([app_ports[m] for m in APPS]) as info:
        yield info


def environment(nginx, **extra):
    env = {
        "target": "f3-web*", "batch": 1,
        "health": {"url": "http://{host}/{project}/health", "expect": "release", "timeout_s": 2,
                   "retries": 2, "interval_s": 0.2},
        "lb": {"minion": LB, "kind": "nginx", "upstream_file": nginx["upstream"], "backend": "{host}",
               "test_cmd": nginx["test_cmd"], "reload_cmd": nginx["reload_cmd"]},
        "host_grain": "app_addr",
        "auto_rollback": True,
    }
    env.update(extra)
    return env


WAVES = [
    {"name": "pre", "target": "f3-web1"},
    {"name": "rest", "target": "f3-web2,f3-web3", "tgt_type": "list", "batch": 1},
]


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    return Gates(str(tmp_path_factory.mktemp("f3gates")))


@pytest.fixture(scope="module")
def health_gate(app_ports):
    gate = HealthGate(app_ports)
    yield gate
    gate.close()


def gated_environment(nginx, gates, health_gate, project):
    """Its health checks and LB checks pass through gates the test holds; a short call timeout."""
    env = environment(nginx, timeout_s=15)
    env["health"] = dict(env["health"], url=health_gate.url)
    env["lb"] = dict(env["lb"], test_cmd=gates.command(f"lb-{project}", nginx["test_cmd"]))
    return env


@pytest.fixture(scope="module")
def faults(salt_factories, app_repo, tmp_path_factory, app_ports, nginx, gates, health_gate):
    nodes_root = tmp_path_factory.mktemp("f3nodes")
    file_root = make_file_root(str(tmp_path_factory.mktemp("f3files") / "base"))
    environments = {p: environment(nginx) for p in PROJECTS}
    environments.update({p: gated_environment(nginx, gates, health_gate, p) for p in KILLED})
    # Waves with their own batches; the environment's batch is left at its default of 100%.
    environments["wavebad"] = {k: v for k, v in environment(nginx, waves=WAVES).items() if k not in ("batch", "target")}
    release_config = {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("f3state")),
        "projects": {
            p: project_config(app_repo.path, build=[], checks=[], environments={"pro": environments[p]})
            for p in PROJECTS + KILLED
        },
    }
    grains = {m: {"app_addr": f"127.0.0.1:{app_ports[m]}"} for m in APPS}
    grains[LB] = {"role": "lb"}
    pillar = PILLAR.replace("PROJECTS", repr(list(PROJECTS + KILLED))).replace("GATES", gates.dir)
    with start_cluster(salt_factories, "f3", file_root, release_config, pillar, str(nodes_root),
                       minion_ids=(LB,) + APPS, grains=grains, pillar_files={"breaks.json": "{}"}) as cluster:
        servers = [start_app_server(os.path.join(str(nodes_root), m), app_ports[m]) for m in APPS]
        cluster.upstream_file = nginx["upstream"]
        yield cluster
        for server in servers:
            server.shutdown()


# ---------------------------------------------------------------- reading the nodes


def current(cluster, minion, project):
    """The release a node's ``current`` points at, read off its filesystem."""
    return os.path.basename(os.readlink(os.path.join(cluster.deploy_to(minion, project), "current")))


def currents(cluster, project):
    return {m: current(cluster, m, project) for m in APPS}


def backend(app_ports, minion):
    return f"127.0.0.1:{app_ports[minion]}"


def served_through_nginx(nginx, project, count=9):
    """{backend: set of releases it served} over ``count`` requests through nginx, all of them 200."""
    answers = through_nginx(nginx["port"], project, count)
    assert all(status == 200 for status, _, _ in answers), answers
    seen = {}
    for _, release, upstream in answers:
        seen.setdefault(upstream, set()).add(release)
    return seen


def deploy(cluster, project, ref, *extra):
    return cluster.run("release.deploy", project, "env=pro", f"ref={ref}", *extra)


def first_release(cluster, project):
    """Every node on v1.0.0, nothing drained: the start of each fault."""
    # The cells share one nginx: a backend an earlier cell left out would be blamed on this one.
    assert upstream_down(cluster.upstream_file) == set(), "an earlier cell left a backend out of nginx"
    result, ret = deploy(cluster, project, "v1.0.0")
    errors = {m: n.get("error") for m, n in ret["nodes"].items()}
    assert result.returncode == 0 and ret["result"], (ret.get("error"), errors)
    assert set(currents(cluster, project).values()) == {ret["release"]}
    return ret["release"]


def by_hand(nginx, edit):
    """What an operator does: edit the upstream file, then reload nginx."""
    with open(nginx["upstream"], encoding="utf-8") as handle:
        text = handle.read()
    with open(nginx["upstream"], "w", encoding="utf-8") as handle:
        handle.write(edit(text))
    subprocess.run(shlex.split(nginx["reload_cmd"]), check=True)
    time.sleep(0.5)  # nginx's new workers take over


# ---------------------------------------------------------------- faults


def test_lb_reload_failure_during_drain_switches_no_node(faults, app_ports, nginx):
    old = first_release(faults, "lbfail")
    # The reload cannot reach nginx (its pid file is gone): `nginx -t` passes, `nginx -s reload` fails.
    os.rename(nginx["pid_file"], nginx["pid_file"] + ".away")
    try:
        started = time.monotonic()
        result, ret = deploy(faults, "lbfail", "v1.1.0")
        took = time.monotonic() - started
    finally:
        os.rename(nginx["pid_file"] + ".away", nginx["pid_file"])
    print(f"LB reload failure during drain: consistent after {took:.1f} s")
    assert result.returncode != 0 and ret["result"] is False
    assert "nginx reload failed" in ret["nodes"]["f3-web1"]["error"]
    assert currents(faults, "lbfail") == {m: old for m in APPS}, "no node switched"
    assert upstream_down(nginx["upstream"]) == set(), "the file says what nginx serves: all in service"
    seen = served_through_nginx(nginx, "lbfail")
    assert set(seen) == {backend(app_ports, m) for m in APPS}
    assert set().union(*seen.values()) == {old}


def test_health_failure_in_a_wave_rolls_back_in_batches_keeping_capacity(faults, app_ports, nginx):
    old = first_release(faults, "wavebad")
    set_breaks(faults, "f3-*", {"wavebad": ["f3-web3"]})
    try:
        with UpstreamWatcher(nginx["upstream"]) as watcher:
            started = time.monotonic()
            result, ret = deploy(faults, "wavebad", "v1.1.0")
            took = time.monotonic() - started
    finally:
        set_breaks(faults, "f3-*", {})
    print(f"health failure on f3-web3 in wave rest: consistent after {took:.1f} s; "
          f"fewest backends in service at once: {watcher.min_up}")
    assert result.returncode != 0 and "wave rest" in ret["error"]
    assert currents(faults, "wavebad") == {m: old for m in APPS}, "every node back on the old release"
    # Batch 1 in every wave: the rollback, like the rollout, never has more than one node out.
    assert watcher.min_up >= len(APPS) - 1
    assert watcher.seen_down == {backend(app_ports, m) for m in APPS}
    # The failed node passed its check on the release it runs again before going back in.
    assert upstream_down(nginx["upstream"]) == set()
    assert set().union(*served_through_nginx(nginx, "wavebad").values()) == {old}
    assert all(ret["nodes"][m]["release"] == old for m in APPS), ret["nodes"]


def test_operator_down_stays_down_after_a_deploy(faults, app_ports, nginx):
    first_release(faults, "opdown")
    kept_out = backend(app_ports, "f3-web2")
    by_hand(nginx, lambda text: text.replace(f"server {kept_out};", f"server {kept_out} down;"))
    try:
        result, ret = deploy(faults, "opdown", "v1.1.0")
        assert result.returncode == 0 and ret["result"], ret
        assert currents(faults, "opdown") == {m: ret["release"] for m in APPS}
        assert upstream_down(nginx["upstream"]) == {kept_out}, "the operator's down is not undone"
        seen = served_through_nginx(nginx, "opdown")
        assert kept_out not in seen and set(seen) == {backend(app_ports, m) for m in ("f3-web1", "f3-web3")}
        assert set().union(*seen.values()) == {ret["release"]}
    finally:
        by_hand(nginx, lambda text: text.replace(f"server {kept_out} down;", f"server {kept_out};"))


def test_reload_failure_after_the_switch_is_read_back(faults, app_ports, nginx):
    old = first_release(faults, "readback")
    started = time.monotonic()
    result, ret = deploy(faults, "readback", "v1.1.0")
    print(f"stack reload failure after the switch on f3-web2: consistent after {time.monotonic() - started:.1f} s")
    assert result.returncode != 0 and ret["result"] is False
    node = ret["nodes"]["f3-web2"]
    # Whatever the node did after its reload failed, the return says what it runs now.
    assert node["release"] == current(faults, "f3-web2", "readback"), node
    assert currents(faults, "readback") == {m: old for m in APPS}
    assert upstream_down(nginx["upstream"]) == set()
    assert set().union(*served_through_nginx(nginx, "readback").values()) == {old}
    phases = history_phases(faults, "readback", "f3-web2")
    assert "readback" in phases, phases
    # The node itself switched back and reloaded its old release (switch + reload as one unit).
    _, rows = faults.run("release.history", "readback", "env=pro", "limit=1", "phases=True")
    errors = [p["error"] or "" for p in rows["runs"][0]["phases"]
              if p["minion"] == "f3-web2" and p["phase"] == "activate"]
    assert any(f"switched back to {old} and reloaded: ok" in e for e in errors), errors


def history_phases(cluster, project, minion):
    _, rows = cluster.run("release.history", project, "env=pro", "limit=1", "phases=True")
    return [p["phase"] for p in rows["runs"][0]["phases"] if p["minion"] == minion]


def test_stopped_minion_fails_fast_and_is_named(faults, app_ports, nginx):
    old = first_release(faults, "gone")
    result, second = deploy(faults, "gone", "v1.1.0")
    assert result.returncode == 0 and second["result"], second
    stopped = faults.minions[APPS.index("f3-web3") + 1]
    with stopped.stopped():
        started = time.monotonic()
        result, ret = deploy(faults, "gone", "release/2.0")
        deploy_s = time.monotonic() - started
        assert result.returncode != 0 and "f3-web3" in ret["error"], ret
        assert "did not answer a presence probe" in ret["nodes"]["f3-web3"]["error"]
        assert currents(faults, "gone") == {m: second["release"] for m in APPS}, "no node touched"
        started = time.monotonic()
        result, back = faults.run("release.rollback", "gone", "env=pro", "emergency=True")
        rollback_s = time.monotonic() - started
    print(f"stopped minion: deploy refused in {deploy_s:.1f} s (runner {ret['duration_s']} s), emergency "
          f"rollback in {rollback_s:.1f} s (runner {back['duration_s']} s, switch {back.get('switch_s')} s)")
    assert result.returncode != 0 and "f3-web3" in back["error"], back
    assert "did not answer a presence probe" in back["nodes"]["f3-web3"]["error"]
    assert back["nodes"]["f3-web3"]["release"] is None, "unreadable: reported unknown, not assumed"
    assert deploy_s < 30 and rollback_s < 30
    assert current(faults, "f3-web1", "gone") == old and current(faults, "f3-web2", "gone") == old
    assert current(faults, "f3-web3", "gone") == second["release"]
    assert {back["nodes"][m]["release"] for m in ("f3-web1", "f3-web2")} == {old}
    assert set().union(*served_through_nginx(nginx, "gone").values()) <= {old, second["release"]}


# ---------------------------------------------------------------- kill -9 at a phase, then one operator command


class Started:
    """``salt-run`` started in the background, in its own session, so the test can kill -9 it."""

    def __init__(self, cluster, fun, *args):
        argv = cluster.salt_run_cli.cmdline(fun, *args, "--out=json")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # noqa: S603
                                     start_new_session=True, text=True)

    def kill(self):
        assert self.proc.poll() is None, f"the runner ended before the kill: {self.proc.stdout.read()}"
        kill_tree(self.proc.pid)
        self.proc.wait(10)

    def wait(self, timeout_s=120):
        out, _ = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out


def hold(cluster, gates, health_gate, project, phase):
    """
    Arm the gate where ``phase`` of ``project``'s next deploy (batch 1, f3-web1
    first) will block; returns (wait until it is reached, open it).
    """
    if phase == "install":  # the install call, as the master publishes it to the nodes
        watcher = BusWatcher(cluster.master.config, "salt/job/", "/new", fun="release.install")
        return watcher.wait, watcher.close
    if phase in ("drain", "undrain"):  # the LB's config check: 1st call drains f3-web1, 2nd puts it back
        name = f"lb-{project}"
        gates.arm(name, skip=0 if phase == "drain" else 1)
        return lambda: gates.wait_reached(name), lambda: gates.open(name)
    if phase == "verify":
        health_gate.arm("f3-web1", project, "hang")
        return lambda: health_gate.wait_reached("f3-web1", project), health_gate.open
    if phase == "activate":  # the stack reload, after the symlink moved
        name = f"reload-{project}-f3-web1"
        gates.arm(name)
        return lambda: gates.wait_reached(name), lambda: gates.open(name)
    assert phase == "rollback"  # f3-web2 fails its check; its rollback's reload (its 2nd) blocks
    name = f"reload-{project}-f3-web2"
    health_gate.arm("f3-web2", project, "fail")
    gates.arm(name, skip=1)

    def opened():
        gates.open(name)
        health_gate.open()

    return lambda: gates.wait_reached(name), opened


def wait_idle(cluster, timeout_s=60):
    """Until no minion runs a job (the dead runner's calls finish on the nodes by themselves)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = cluster.salt_cli.run("saltutil.running", minion_tgt="*")
        if result.returncode == 0 and not any(result.data.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs still running: {result.stdout}")


def assert_consistent(cluster, nginx, app_ports, project, expected, ret, watcher, down=()):
    """The invariant, read off the nodes and nginx; then the report must say the same."""
    assert currents(cluster, project) == expected, "readlink of every node's current"
    assert upstream_down(nginx["upstream"]) == set(down), "nginx serves every node the run took out again"
    seen = served_through_nginx(nginx, project, count=12)
    assert set(seen) == {backend(app_ports, m) for m in APPS if backend(app_ports, m) not in down}
    assert set().union(*seen.values()) <= set(expected.values())
    assert watcher.min_up >= len(APPS) - 1 - len(down), "at least N - batch in service throughout"
    if ret.get("nodes"):
        assert {m: n["release"] for m, n in ret["nodes"].items()} == {m: expected[m] for m in ret["nodes"]}, ret
    _, status = cluster.run("release.status", project, "env=pro")
    assert {m: n["current"] for m, n in status["nodes"].items()} == expected, status
    _, history = cluster.run("release.history", project, "env=pro", "limit=5")
    assert all(row["result"] is not None for row in history["runs"]), "no run left open"


def lock_free(cluster, project):
    return not os.path.exists(os.path.join(cluster.release_config["state_dir"], "locks", f"{project}.pro.lock"))




def recover_timed(cluster, project, mode="rollback"):
    """The one operator command: (process result, its return, seconds it took)."""
    started = time.monotonic()
    result, ret = cluster.run("release.recover", project, "env=pro", f"mode={mode}")
    return result, ret, time.monotonic() - started


def kill_runner_then_recover(cluster, nginx, gates, health_gate, project, phase, mode):
    """
    Deploy v1.1.0, kill -9 the runner at ``phase``, let the nodes finish what
    it had asked of them, then the one operator command: ``release.recover``.
    """
    reached, opened = hold(cluster, gates, health_gate, project, phase)
    with UpstreamWatcher(nginx["upstream"]) as watcher:
        runner = Started(cluster, "release.deploy", project, "env=pro", "ref=v1.1.0")
        reached()
        runner.kill()
        killed_at = time.monotonic()
        opened()
        wait_idle(cluster)
        started = time.monotonic()
        result, ret = cluster.run("release.recover", project, "env=pro", f"mode={mode}")
    print(f"runner killed at {phase}: recover ({mode}) took {time.monotonic() - started:.1f} s; "
          f"{time.monotonic() - killed_at:.1f} s from the kill; fewest in service: {watcher.min_up}")
    return result, ret, watcher


@pytest.mark.parametrize("phase", RUNNER_PHASES)
def test_runner_killed_at_a_phase_then_recover_rolls_back(faults, app_ports, nginx, gates, health_gate, phase):
    project = f"kr{phase}"
    old = first_release(faults, project)
    result, ret, watcher = kill_runner_then_recover(faults, nginx, gates, health_gate, project, phase, "rollback")
    assert result.returncode == 0 and ret["result"], ret
    assert lock_free(faults, project), "the dead runner's lock was taken over and released"
    assert_consistent(faults, nginx, app_ports, project, {m: old for m in APPS}, ret, watcher)
    if phase == "install":
        assert "before its first switch" in ret["comment"], ret
    else:
        assert ret["recovered_run"] and ret["mode"] == "rollback", ret


def test_runner_killed_at_verify_then_recover_finishes(faults, app_ports, nginx, gates, health_gate):
    project = "krfinish"
    first_release(faults, project)
    result, ret, watcher = kill_runner_then_recover(faults, nginx, gates, health_gate, project, "verify", "finish")
    assert result.returncode == 0 and ret["result"], ret
    new = current(faults, "f3-web1", project)
    assert "1.1.0" in new
    assert_consistent(faults, nginx, app_ports, project, {m: new for m in APPS}, ret, watcher)


def test_recover_leaves_an_operators_down_alone(faults, app_ports, nginx, gates, health_gate):
    """Hostile: settle used to put back every drained node; only what the dead run drained goes back."""
    project = "kropdown"
    old = first_release(faults, project)
    kept_out = backend(app_ports, "f3-web3")
    by_hand(nginx, lambda text: text.replace(f"server {kept_out};", f"server {kept_out} down;"))
    try:
        result, ret, watcher = kill_runner_then_recover(faults, nginx, gates, health_gate, project, "verify",
                                                        "rollback")
        assert result.returncode == 0 and ret["result"], ret
        assert_consistent(faults, nginx, app_ports, project, {m: old for m in APPS}, ret, watcher,
                          down={kept_out})
        assert ret["left_down"] == ["f3-web3"], ret
    finally:
        by_hand(nginx, lambda text: text.replace(f"server {kept_out} down;", f"server {kept_out};"))


def test_minion_killed_during_its_reload(faults, app_ports, nginx, gates, health_gate):
    project = "kminion"
    old = first_release(faults, project)
    minion = faults.minions[APPS.index("f3-web1") + 1]
    reached, opened = hold(faults, gates, health_gate, project, "activate")
    with UpstreamWatcher(nginx["upstream"]) as watcher:
        started = time.monotonic()
        runner = Started(faults, "release.deploy", project, "env=pro", "ref=v1.1.0")
        reached()
        kill_tree(minion.pid)
        opened()  # the reload, in its own session, finishes: the node is on the new release
        minion.terminate()
        minion.start(start_timeout=120)
        code, out = runner.wait()
        took = time.monotonic() - started
    print(f"minion killed during its reload: deploy ended (exit {code}) after {took:.1f} s; "
          f"fewest in service: {watcher.min_up}")
    assert code != 0, out
    _, history = faults.run("release.history", project, "env=pro", "limit=1")
    assert not history["runs"][0]["result"]
    assert_consistent(faults, nginx, app_ports, project, {m: old for m in APPS}, {}, watcher)


def test_lb_minion_killed_mid_drain_then_recover(faults, app_ports, nginx, gates, health_gate):
    """
    Hostile: kill -9 of the load-balancer minion between writing the upstream
    file and reloading nginx (its ``test_cmd`` held) left the file saying
    ``down`` while nginx still served the node, and nothing put it back.
    """
    project = "klb"
    old = first_release(faults, project)
    lb = faults.minions[0]
    reached, _ = hold(faults, gates, health_gate, project, "drain")
    with UpstreamWatcher(nginx["upstream"]) as watcher:
        runner = Started(faults, "release.deploy", project, "env=pro", "ref=v1.1.0")
        reached()
        assert upstream_down(nginx["upstream"]) == {backend(app_ports, "f3-web1")}, "written, not yet reloaded"
        kill_tree(lb.pid)
        killed_at = time.monotonic()
        gates.disarm(f"lb-{project}")
        lb.terminate()
        lb.start(start_timeout=120)
        code, out = runner.wait()
        wait_idle(faults)
        result, ret, took = recover_timed(faults, project)
    print(f"LB minion killed mid-drain: the deploy ended (exit {code}); recover took {took:.1f} s, "
          f"{time.monotonic() - killed_at:.1f} s from the kill; fewest in service: {watcher.min_up}")
    assert code != 0, out  # the drain never answered: the run failed at its first batch
    assert result.returncode == 0 and ret["result"], ret
    assert ret["lb_undone"] == f"drain of {backend(app_ports, 'f3-web1')}", "recover says what it undid"
    assert lock_free(faults, project)
    assert_consistent(faults, nginx, app_ports, project, {m: old for m in APPS}, ret, watcher)
    # The file says what nginx serves: the next reload (anyone's) changes nothing.
    subprocess.run(shlex.split(nginx["reload_cmd"]), check=True)
    time.sleep(0.5)
    assert set(served_through_nginx(nginx, project)) == {backend(app_ports, m) for m in APPS}
    owners = faults.salt_cli.run("release_lb.drained_by", nginx["upstream"], minion_tgt=LB)
    assert owners.returncode == 0 and owners.data == {}, "no record of a drain that did not happen"
    _, history = faults.run("release.history", project, "env=pro", "limit=5", "phases=True")
    dead = next(row for row in history["runs"] if row["kind"] == "deploy")
    assert dead["result"] is not None and not dead["result"], dead
    assert not [p for p in dead["phases"] if p["phase"] == "activate"], "no node switched"


def test_master_killed_during_a_reload_then_recover(faults, app_ports, nginx, gates, health_gate):
    project = "kmaster"
    old = first_release(faults, project)
    reached, opened = hold(faults, gates, health_gate, project, "activate")
    with UpstreamWatcher(nginx["upstream"]) as watcher:
        runner = Started(faults, "release.deploy", project, "env=pro", "ref=v1.1.0")
        reached()
        kill_tree(faults.master.pid)
        killed_at = time.monotonic()
        opened()
        faults.master.terminate()
        faults.master.start(start_timeout=120)
        code, out = runner.wait(timeout_s=180)
        print(f"master killed during a reload: the runner ended (exit {code}) {time.monotonic() - killed_at:.1f} s "
              f"after the kill: {out[-600:]}")
        wait_answering(faults)
        wait_idle(faults)
        result, ret, took = recover_timed(faults, project)
    print(f"master killed during a reload: recover took {took:.1f} s, {time.monotonic() - killed_at:.1f} s "
          f"from the kill; fewest in service: {watcher.min_up}")
    assert result.returncode == 0 and ret["result"], ret
    assert lock_free(faults, project)
    assert_consistent(faults, nginx, app_ports, project, {m: old for m in APPS}, ret, watcher)


def wait_answering(cluster, timeout_s=90):
    """Until every minion answers the restarted master."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = cluster.salt_cli.run("test.ping", minion_tgt="*", _timeout=5)
        if result.returncode == 0 and len(result.data or {}) == len(cluster.minions):
            return
        time.sleep(1)
    raise AssertionError("minions did not come back to the restarted master")


def test_a_hanging_health_check_times_out_and_fails(faults, app_ports, nginx, health_gate):
    project = "hang"
    old = first_release(faults, project)
    health_gate.arm("f3-web2", project, "hang", unless_release=old)  # it answers on the old release again
    try:
        with UpstreamWatcher(nginx["upstream"]) as watcher:
            started = time.monotonic()
            result, ret = deploy(faults, project, "v1.1.0")
            took = time.monotonic() - started
    finally:
        health_gate.open()
    _, rows = faults.run("release.history", project, "env=pro", "limit=1", "phases=True")
    verify = [p for p in rows["runs"][0]["phases"] if p["minion"] == "f3-web2" and p["phase"] == "verify"]
    print(f"hanging health check on f3-web2: its check failed after {verify[0]['duration_s']:.1f} s; "
          f"consistent after {took:.1f} s")
    assert result.returncode != 0 and ret["result"] is False
    assert not verify[0]["result"], verify
    health = faults.release_config["projects"][project]["environments"]["pro"]["health"]
    # retries x timeout, the pauses between, and a little for the machine
    assert verify[0]["duration_s"] <= health["retries"] * (health["timeout_s"] + health["interval_s"]) + 2
    assert_consistent(faults, nginx, app_ports, project, {m: old for m in APPS}, ret, watcher)


# ---------------------------------------------------------------- kill -9 of a minion or the master at the other phases


def restart(daemon):
    """A daemon killed with kill -9 comes back, as systemd's ``Restart=`` brings it back."""
    daemon.terminate()
    daemon.start(start_timeout=120)


def daemon_of(cluster, who):
    return cluster.master if who == "master" else cluster.minions[((LB,) + APPS).index(who)]


def kill_at_phase_then_recover(cluster, nginx, gates, health_gate, project, phase, who):
    """
    Deploy v1.1.0; at ``phase`` kill -9 ``who`` (a minion id or "master"), let
    the held phase go on, restart the daemon, wait for the run's end, then the
    one operator command: ``release.recover mode=rollback``.
    """
    reached, opened = hold(cluster, gates, health_gate, project, phase)
    daemon = daemon_of(cluster, who)
    with UpstreamWatcher(nginx["upstream"]) as watcher:
        runner = Started(cluster, "release.deploy", project, "env=pro", "ref=v1.1.0")
        reached()
        kill_tree(daemon.pid)
        killed_at = time.monotonic()
        if phase in ("drain", "undrain"):
            gates.disarm(f"lb-{project}")  # a call the LB minion makes again is not held
        opened()  # after disarming: disarm would take the opening away from a gate still held
        restart(daemon)
        code, out = runner.wait(timeout_s=240)
        ended_s = time.monotonic() - killed_at
        wait_answering(cluster)
        wait_idle(cluster)
        result, ret, took = recover_timed(cluster, project)
    print(f"{who} killed at {phase}: the deploy ended (exit {code}) {ended_s:.1f} s after the kill; recover took "
          f"{took:.1f} s, {time.monotonic() - killed_at:.1f} s from the kill; fewest in service: {watcher.min_up}")
    return code, out, result, ret, watcher


def the_deploy(cluster, project):
    """The fault's run, as its history row says now."""
    _, history = cluster.run("release.history", project, "env=pro", "limit=5")
    return next(row for row in history["runs"] if row["kind"] == "deploy")


@pytest.mark.parametrize(("phase", "who"), [(phase, who) for phase, who in MINION_PHASES] +
                         [(phase, "master") for phase in MASTER_PHASES])
def test_a_daemon_killed_at_a_phase_then_recover(faults, app_ports, nginx, gates, health_gate, phase, who):
    project = ("kma" if who == "master" else "kmi") + phase
    old = first_release(faults, project)
    code, out, result, ret, watcher = kill_at_phase_then_recover(
        faults, nginx, gates, health_gate, project, phase, who)
    assert result.returncode == 0 and ret["result"], ret
    assert lock_free(faults, project)
    run = the_deploy(faults, project)
    print(f"  the deploy's error: {run['error']}; recover: {ret.get('comment') or ret.get('recovered_run')}")
    assert (code == 0) == bool(run["result"]), (code, run, out[-2000:])
    # A run that ended well took every node to the new release; any other end is the old one everywhere.
    expected = run["release"] if run["result"] else old
    if phase == "rollback":
        assert not run["result"], "f3-web2 failed its check: the run cannot have succeeded"
    assert_consistent(faults, nginx, app_ports, project, {m: expected for m in APPS}, ret, watcher)


def test_lb_check_failure_when_putting_a_node_back(faults, app_ports, nginx, gates, health_gate):
    """
    Hostile: the LB's config check fails once, on the undrain of the first
    node (on the new release, healthy). The run ignored a failed undrain: the
    node stayed out and the next batch took another one out with it.
    """
    project = "klbundrain"
    first_release(faults, project)
    gates.arm(f"lb-{project}", skip=1, how="fail")
    with UpstreamWatcher(nginx["upstream"]) as watcher:
        started = time.monotonic()
        result, ret = deploy(faults, project, "v1.1.0")
        took = time.monotonic() - started
    print(f"LB check failure at undrain: consistent after {took:.1f} s (exit {result.returncode}); "
          f"fewest in service: {watcher.min_up}")
    assert os.path.exists(os.path.join(gates.dir, f"lb-{project}.reached")), "the check did fail once"
    # Asked once more, the load balancer puts the node back; the rollout goes on.
    assert result.returncode == 0 and ret["result"], ret
    assert_consistent(faults, nginx, app_ports, project, {m: ret["release"] for m in APPS}, ret, watcher)
