"""
Rollback, retention, history, statistics and the report on a real master
("m6") and three real minions; each node's health is served over HTTP from
its deploy_to/current, so a normal rollback is health-checked like a deploy.
The report is opened in Debian's headless Chromium.

The last test stops the master: keep it last.
"""

import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import make_file_root, project_config, start_cluster
from tests.integration import artifacts
from tests.integration.nginx_lb import served, start_app_server

NODES = ("m6-web1", "m6-web2", "m6-web3")
PROJECTS = ("rainbow", "emerg", "trim", "auto", "counted", "local", "staged", "twoenv", "nodeerr")
PILLAR = textwrap.dedent(
    """\
    {% set node = grains['id'] %}
    release:
    {% for project in ['rainbow', 'emerg', 'trim', 'auto', 'counted', 'local', 'staged', 'twoenv', 'nodeerr'] %}
      {{ project }}:
        deploy_to: {{ nodes_root }}/{{ node }}/{{ project }}
        user: {{ app_user }}
        shared: [storage, logs]
        keep_releases: 5
    {% endfor %}
    """
)
A, B, C = "v1.0.0", "v1.1.0", "release/2.0"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def ports():
    return {minion: get_unused_localhost_port() for minion in NODES}


@pytest.fixture(scope="module")
def m6(salt_factories, app_repo, tmp_path_factory, ports):
    nodes_root = tmp_path_factory.mktemp("m6nodes")
    file_root = make_file_root(str(tmp_path_factory.mktemp("m6files") / "base"))
    every = {
        "target": "m6-web*", "batch": 1, "auto_rollback": True, "host_grain": "app_addr",
        "health": {"url": "http://{host}/{project}/health", "expect": "release", "timeout_s": 2,
                   "retries": 2, "interval_s": 0.2},
    }
    one = {"target": "m6-web1"}
    release_config = {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("m6state")),
        "projects": {
            "rainbow": project_config(app_repo.path, environments={"pro": every}),
            "emerg": project_config(app_repo.path, environments={"pro": every}),
            "trim": project_config(app_repo.path, environments={"one": one}),
            "auto": project_config(app_repo.path, keep_releases=2, environments={"one": one}),
            "counted": project_config(app_repo.path, environments={"one": one}),
            "local": project_config(app_repo.path, environments={"one": one}),
            "staged": project_config(app_repo.path, environments={"one": one}),
            # Two environments of one project on one node, same deploy_to: each its own lock and fences.
            "twoenv": project_config(app_repo.path, environments={"one": one, "two": one}),
            "nodeerr": project_config(app_repo.path, environments={"pro": every}),
        },
    }
    grains = {m: {"app_addr": f"127.0.0.1:{ports[m]}"} for m in NODES}
    with start_cluster(salt_factories, "m6", file_root, release_config, PILLAR, str(nodes_root),
                       minion_ids=NODES, grains=grains) as cluster:
        servers = [start_app_server(os.path.join(str(nodes_root), m), ports[m]) for m in NODES]
        yield cluster
        for server in servers:
            server.shutdown()


def deploy(cluster, project, env, ref, *extra):
    result, ret = cluster.run("release.deploy", project, f"env={env}", f"ref={ref}", *extra)
    return result, ret


def deployed(cluster, project, env, ref):
    result, ret = deploy(cluster, project, env, ref)
    assert result.returncode == 0 and ret["result"], ret
    return ret["release"]


def rollback(cluster, project, env, *extra):
    return cluster.run("release.rollback", project, f"env={env}", *extra)


def current(cluster, minion, project):
    return os.path.basename(os.readlink(os.path.join(cluster.deploy_to(minion, project), "current")))


def currents(cluster, project, minions=NODES):
    return {m: current(cluster, m, project) for m in minions}


def history(cluster, project, **options):
    result, ret = cluster.run("release.history", project, *(f"{k}={v}" for k, v in options.items()))
    assert result.returncode == 0, result
    return ret["runs"]


# ---------------------------------------------------------------- rollback
def test_emergency_rollback_never_picks_a_release_only_staged_there(m6):
    """Hostile: older releases installed on the node but never run there (one marked bad) are no target."""
    staged = []
    for version in ("v0.1", "v0.2"):  # staged on the master and installed by hand, never activated
        name = artifacts.fresh_name("staged", version)
        url, sha = artifacts.stage(m6, "staged", name, [artifacts.file_member("public/index.html", b"staged\n")])
        installed = artifacts.install(m6, "m6-web1", "staged", name, url, sha)
        assert installed.returncode == 0, installed
        staged.append(name)
    c = deployed(m6, "staged", "one", C)
    listed = m6.salt_cli.run("release.list", "staged", minion_tgt="m6-web1").data
    assert sorted(listed["releases"]) == sorted(staged + [c]) and listed["rollback_target"] is None, listed
    result, ret = rollback(m6, "staged", "one", "emergency=True")
    assert result.returncode != 0 and ret["result"] is False, ret
    assert "no release that passed its health check here to go back to" in json.dumps(ret), ret
    assert current(m6, "m6-web1", "staged") == c


def test_two_environments_of_one_project_on_one_node_do_not_fence_each_other(m6):
    first = deployed(m6, "twoenv", "one", A)
    deployed(m6, "twoenv", "one", B)  # env one's fence is 2 now
    other = deployed(m6, "twoenv", "two", A)  # env two's first lock: fence 1, refused before
    assert current(m6, "m6-web1", "twoenv") == other and other != first


def test_a_node_local_error_fails_the_deploy_without_marking_the_release_bad(m6):
    deployed(m6, "nodeerr", "pro", A)
    web2 = m6.deploy_to("m6-web2", "nodeerr")
    running = os.readlink(os.path.join(web2, "current"))
    # A node-local error at the switch: web2's current is a real directory (a copy: it still serves).
    os.unlink(os.path.join(web2, "current"))
    shutil.copytree(os.path.join(web2, running), os.path.join(web2, "current"), symlinks=True)
    result, ret = deploy(m6, "nodeerr", "pro", B)
    assert result.returncode != 0 and ret["result"] is False, ret
    assert "real directory" in json.dumps(ret["nodes"]["m6-web2"]), ret["nodes"]["m6-web2"]
    assert current(m6, "m6-web1", "nodeerr") == os.path.basename(running)  # rolled back
    shutil.rmtree(os.path.join(web2, "current"))
    os.symlink(running, os.path.join(web2, "current"))
    again = deployed(m6, "nodeerr", "pro", B)  # no force=True needed: B never failed its own checks
    assert currents(m6, "nodeerr") == {m: again for m in NODES}





def test_rollback_chain_to_and_refusals(m6, ports):
    a, b, c = (deployed(m6, "rainbow", "pro", ref) for ref in (A, B, C))
    assert currents(m6, "rainbow") == {m: c for m in NODES}

    result, ret = rollback(m6, "rainbow", "pro")
    assert result.returncode == 0 and ret["result"], ret
    assert ret["release"] == b and currents(m6, "rainbow") == {m: b for m in NODES}
    assert {served(ports, m, "rainbow") for m in NODES} == {b}
    # The normal rollback went node by node through switch and health check, all recorded.
    row = history(m6, "rainbow", limit=1, phases=True)[0]
    assert row["kind"] == "rollback" and row["result"] == 1
    for minion in NODES:
        assert [p["phase"] for p in row["phases"] if p["minion"] == minion] == ["activate", "verify"]

    result, status = m6.run("release.status", "rainbow", "env=pro")
    assert result.returncode == 0 and status["out_of_step"] == []
    assert status["nodes"]["m6-web2"]["bad"] == [c] and status["nodes"]["m6-web2"]["rollback_target"] == a

    result, ret = rollback(m6, "rainbow", "pro")
    assert result.returncode == 0 and currents(m6, "rainbow") == {m: a for m in NODES}, ret
    # A is the oldest and B, C are bad: a default rollback has nowhere to go and touches nothing.
    result, ret = rollback(m6, "rainbow", "pro")
    assert result.returncode != 0 and "nothing to roll back to" in ret["error"], ret
    assert currents(m6, "rainbow") == {m: a for m in NODES}

    result, ret = rollback(m6, "rainbow", "pro", f"to={c}")
    assert result.returncode == 0 and ret["result"], ret
    assert currents(m6, "rainbow") == {m: c for m in NODES}
    assert {served(ports, m, "rainbow") for m in NODES} == {c}

    shutil.rmtree(os.path.join(m6.deploy_to("m6-web3", "rainbow"), "releases", a))
    result, ret = rollback(m6, "rainbow", "pro", f"to={a}")
    assert result.returncode != 0 and ret["result"] is False
    assert f"release {a} is not on m6-web3" in ret["error"] and "no node was touched" in ret["error"]
    assert currents(m6, "rainbow") == {m: c for m in NODES}
    assert not ret["nodes"]

    # B was rolled back from: its commit is refused without force, and no node moves.
    result, ret = deploy(m6, "rainbow", "pro", B)
    assert result.returncode != 0 and "marked bad" in ret["error"] and "force=True" in ret["error"], ret
    assert currents(m6, "rainbow") == {m: c for m in NODES}
    result, ret = deploy(m6, "rainbow", "pro", B, "force=True")
    assert result.returncode == 0 and ret["result"], ret
    assert currents(m6, "rainbow") == {m: ret["release"] for m in NODES}

    # A node switched by hand is flagged out of step.
    switched = m6.salt_cli.run("release.activate", "rainbow", c, minion_tgt="m6-web1")
    assert switched.returncode == 0, switched
    result, status = m6.run("release.status", "rainbow", "env=pro")
    assert status["out_of_step"] == ["m6-web1"] and status["nodes"]["m6-web1"]["current"] == c
    assert status["releases"] == {c: 1, ret["release"]: 2}


def test_bad_release_is_refused_on_the_node_without_force(m6):
    listed = m6.salt_cli.run("release.list", "rainbow", minion_tgt="m6-web2").data
    bad = listed["bad"][0]
    refused = m6.salt_cli.run("release.activate", "rainbow", bad, minion_tgt="m6-web2")
    assert refused.returncode != 0 and "marked bad" in str(refused.data)
    assert current(m6, "m6-web2", "rainbow") == listed["current"]
    assert listed["rollback_target"] != bad


def test_emergency_rollback_switches_all_at_once_and_records_its_duration(m6):
    a, b = (deployed(m6, "emerg", "pro", ref) for ref in (A, B))
    result, ret = rollback(m6, "emerg", "pro", "emergency=True")
    assert result.returncode == 0 and ret["result"] and ret["emergency"], ret
    assert currents(m6, "emerg") == {m: a for m in NODES}
    row = history(m6, "emerg", limit=1, phases=True)[0]
    assert row["kind"] == "rollback" and row["details"]["emergency"] is True
    assert row["details"]["switch_s"] == ret["switch_s"] > 0 and row["duration_s"] > 0
    # One switch per node: no drain, no health check.
    assert sorted((p["minion"], p["phase"]) for p in row["phases"]) == [(m, "activate") for m in NODES]
    print(f"\nemergency rollback of {len(NODES)} nodes: switch {ret['switch_s']} s, run {ret['duration_s']} s")
    assert all(b in m6.salt_cli.run("release.list", "emerg", minion_tgt=m).data["bad"] for m in NODES)


# ---------------------------------------------------------------- retention


def test_prune_keeps_current_rollback_target_and_strangers(m6):
    names = [deployed(m6, "trim", "one", ref) for ref in (A, B, C, "master", A)]
    releases = os.path.join(m6.deploy_to("m6-web1", "trim"), "releases")
    assert sorted(os.listdir(releases)) == sorted(names), "keep_releases 5: the deploy's prune removed nothing"
    # The two oldest become current and rollback target (the last one confirmed healthy before current).
    for name in (names[1], names[0]):
        assert m6.salt_cli.run("release.activate", "trim", name, minion_tgt="m6-web1").returncode == 0
        if name == names[1]:
            assert m6.salt_cli.run("release.confirm", "trim", name, minion_tgt="m6-web1").returncode == 0
    os.mkdir(os.path.join(releases, "notes"))
    old_partial = os.path.join(releases, "trim_one_9.9.9_master_2020-01-01_000000_x.partial")
    fresh_partial = os.path.join(releases, "trim_one_9.9.9_master_2020-01-02_000000_x.partial")
    for path in (old_partial, fresh_partial):
        os.makedirs(os.path.join(path, "public"))
    os.utime(old_partial, (time.time() - 3600, time.time() - 3600))

    result = m6.salt_cli.run("release.prune", "trim", "keep=2", minion_tgt="m6-web1")
    assert result.returncode == 0, result
    pruned = result.data
    assert pruned["current"] == names[0] and pruned["rollback_target"] == names[1]
    assert pruned["removed"] == [names[2], os.path.basename(old_partial)]
    assert sorted(os.listdir(releases)) == sorted(
        [names[0], names[1], names[3], names[4], "notes", os.path.basename(fresh_partial)])
    assert current(m6, "m6-web1", "trim") == names[0]


def test_every_deploy_prunes_nodes_and_master_artifacts(m6):
    names = [deployed(m6, "auto", "one", ref) for ref in (A, B, C, "master")]
    releases = os.path.join(m6.deploy_to("m6-web1", "auto"), "releases")
    assert sorted(os.listdir(releases)) == names[2:]
    staged = os.path.join(m6.release_config["artifact_root"], "auto")
    left = os.listdir(staged)
    assert {n for n in names[2:] for s in (".tar.gz", ".tar.gz.sha256") if n + s in left} == set(names[2:])
    # Side files (delta, file list) go with their release.
    assert all(any(f.startswith(n + ".") for n in names[2:]) for f in left), left
    last = history(m6, "auto", limit=1, phases=True)[0]
    assert last["details"]["nodes"]["m6-web1"]["pruned"] == [names[1]]
    assert last["details"]["pruned_artifacts"] == [names[1]]
    assert ("m6-web1", "prune", 1) in [(p["minion"], p["phase"], p["result"]) for p in last["phases"]]


# ---------------------------------------------------------------- history and statistics


def test_records_and_stats_match_a_hand_count(m6):
    script = [("deploy", A, True), ("deploy", "no-such-ref", False), ("deploy", B, True),
              ("rollback", None, True), ("deploy", "no-such-ref", False), ("deploy", "no-such-ref", False),
              ("deploy", C, True)]
    for kind, ref, ok in script:
        result, ret = deploy(m6, "counted", "one", ref) if kind == "deploy" else rollback(m6, "counted", "one")
        assert (result.returncode == 0) is ok, ret
    rows = history(m6, "counted", limit=50, phases=True)[::-1]
    assert [(r["kind"], bool(r["result"])) for r in rows] == [(k, ok) for k, _, ok in script]
    for row, (kind, _, ok) in zip(rows, script, strict=True):
        phases = {p["phase"] for p in row["phases"] if p["minion"] == "m6-web1"}
        if kind == "deploy" and ok:
            assert {"install", "activate", "prune"} <= phases, row
        elif kind == "rollback":
            assert phases == {"activate"}
        else:
            assert phases == set() and row["details"]["failed_step"] == "fetch"

    result, figures = m6.run("release.stats", "counted", "env=one")
    assert result.returncode == 0
    durations = sorted(r["duration_s"] for r in rows if r["kind"] == "deploy")
    ended = [_time(r["finished_at"]) for r in rows]
    # Failures at 1 and 4 (5 continues the same outage); good releases at 2 and 6.
    recoveries = [ended[2] - ended[1], ended[6] - ended[4]]
    assert figures["deploys"] == 6 and figures["succeeded"] == 3 and figures["failures"] == 3
    assert figures["rollbacks"] == 1 and figures["unfinished"] == 0 and figures["success_rate"] == 0.5
    assert figures["duration_median_s"] == round((durations[2] + durations[3]) / 2, 3)
    assert figures["duration_p95_s"] == round(durations[math.ceil(0.95 * 6) - 1], 3) == durations[-1]
    assert figures["mttr_s"] == pytest.approx(statistics.mean(recoveries), abs=0.002)
    print(f"\nstats over the scripted sequence: {json.dumps(figures)}")


def _time(text):
    import datetime
    return datetime.datetime.fromisoformat(text).timestamp()


# ---------------------------------------------------------------- the report in a real browser


def chromium(*args, timeout=120):
    profile = tempfile.mkdtemp(prefix="i6-chromium-")
    try:
        return subprocess.run(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def console_lines(done):
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_report_opens_in_chromium_with_its_charts(m6, tmp_path):
    out = tmp_path / "rainbow.html"
    result, ret = m6.run("release.report", "rainbow", f"out={out}")
    assert result.returncode == 0 and ret["result"], ret
    page = out.read_text()
    assert "<script" not in page

    dom = chromium("--dump-dom", f"file://{out}")
    assert dom.returncode == 0 and console_lines(dom) == [], console_lines(dom)
    runs = history(m6, "rainbow", limit=1000, phases=True)
    assert dom.stdout.count('<circle class="run ') == len(runs) == ret["runs"]
    assert dom.stdout.count('<circle class="run rollback ok"') == sum(
        1 for r in runs if r["kind"] == "rollback" and r["result"])
    last = next(r for r in runs if r["phases"])
    assert dom.stdout.count('<rect class="phase ') == len(last["phases"])
    assert dom.stdout.count('<rect class="spread-seg" data-env="pro"') == 2  # m6-web1 is out of step
    _, figures = m6.run("release.stats", "rainbow")
    assert f'data-stat="deploys">{figures["deploys"]}<' in dom.stdout

    shot = tmp_path / "rainbow.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1100,1000", "--hide-scrollbars", f"file://{out}")
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = os.environ.get("I6_SCREENSHOT")
    if kept:
        shutil.copy(shot, kept)

    # The console check does see a page that tries to load something from elsewhere.
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("</body>", '<img src="http://127.0.0.1:9/x.png"></body>'))
    assert any("Content Security Policy" in line for line in console_lines(chromium("--dump-dom", f"file://{broken}")))


# ---------------------------------------------------------------- master down (keep last)


def test_local_rollback_with_the_master_stopped(m6):
    a, b = (deployed(m6, "local", "one", ref) for ref in (A, B))
    m6.master.terminate()
    assert not m6.master.is_running()
    node = next(m for m in m6.minions if m.id == "m6-web1")
    done = node.salt_call_cli(timeout=120).run("--local", "release.rollback", "local")
    assert done.returncode == 0, done
    assert done.data["release"] == a and done.data["previous"] == b
    assert current(m6, "m6-web1", "local") == a
    listed = node.salt_call_cli(timeout=120).run("--local", "release.list", "local")
    assert listed.data["bad"] == [b] and listed.data["rollback_target"] is None
