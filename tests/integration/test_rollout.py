"""
The safe rollout on real processes: a real master, a load-balancer minion and
four app minions; real nginx (Debian's) as the load balancer, run as www-data
on a high loopback port; each app node served by a small HTTP server that
answers from its deploy_to/current (the stack handlers have their own tests).
"""

import http.client
import http.server
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import make_file_root, project_config, start_cluster

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


# ---------------------------------------------------------------- app servers and nginx


class AppHandler(http.server.BaseHTTPRequestHandler):
    """Serves /<project>/ and /<project>/health from <deploy_to>/current, like a web server would."""

    def do_GET(self):
        project, _, page = self.path.strip("/").partition("/")
        current = os.path.join(self.server.deploy_root, project, "current")
        try:
            with open(os.path.join(current, "RELEASE.json"), encoding="utf-8") as handle:
                release = json.load(handle)["name"]
            page_file = "health.php" if page == "health" else "index.html"
            if not os.path.isfile(os.path.join(current, "public", page_file)):
                raise FileNotFoundError(page_file)
        except (OSError, ValueError, KeyError):
            self.send_error(404)
            return
        body = json.dumps({"release": release}).encode()
        self.send_response(200)
        self.send_header("X-Release", release)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_app_server(deploy_root, port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), AppHandler)
    server.deploy_root = deploy_root
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    upstream rainbow {{
        include {prefix}/rainbow.upstream;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://rainbow; }}
    }}
}}
"""


def as_app_user(*argv):
    return ["runuser", "-u", "www-data", "--", *argv]


@pytest.fixture(scope="module")
def nginx(app_ports):
    # Outside pytest's 0700 temp root: www-data must reach it.
    prefix = pathlib.Path(tempfile.mkdtemp(prefix="sr-nginx-", dir="/tmp"))
    prefix.chmod(0o755)
    (prefix / "tmp").mkdir()
    port = get_unused_localhost_port()
    (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, port=port))
    upstream = prefix / "rainbow.upstream"
    upstream.write_text("".join(f"server 127.0.0.1:{app_ports[m]};\n" for m in APPS))
    shutil.chown(prefix, "www-data")
    shutil.chown(prefix / "tmp", "www-data")
    nginx_cmd = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    subprocess.run(as_app_user(*nginx_cmd), check=True)
    info = {
        "port": port,
        "upstream": str(upstream),
        "test_cmd": " ".join(as_app_user(*nginx_cmd, "-t", "-q")),
        "reload_cmd": " ".join(as_app_user(*nginx_cmd, "-s", "reload")),
        "pid_file": str(prefix / "nginx.pid"),
    }
    yield info
    subprocess.run(as_app_user(*nginx_cmd, "-s", "quit"), check=False)
    shutil.rmtree(prefix, ignore_errors=True)


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


def set_breaks(cluster, breaks):
    """Break the health of the named nodes for a project's NEXT install, through pillar."""
    with open(os.path.join(cluster.pillar_root, "breaks.json"), "w", encoding="utf-8") as handle:
        json.dump(breaks, handle)
    refreshed = cluster.salt_cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt="m4-*")
    assert refreshed.returncode == 0, refreshed


def served(app_ports, minion, project):
    conn = http.client.HTTPConnection("127.0.0.1", app_ports[minion], timeout=5)
    try:
        conn.request("GET", f"/{project}/")
        response = conn.getresponse()
        response.read()
        return response.getheader("X-Release")
    finally:
        conn.close()


def deploy(cluster, project, env, ref, *extra):
    result, ret = cluster.run("release.deploy", project, f"env={env}", f"ref={ref}", *extra)
    return result, ret


# ---------------------------------------------------------------- load


class Background:
    """A loop in a daemon thread for the length of a ``with`` block; ``_run`` checks ``self.stop``."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


class Load(Background):
    """A client opening a new connection per request through nginx, bounded in count and time."""

    def __init__(self, port, max_requests=20000, max_s=240):
        super().__init__()
        self.port, self.max_requests, self.max_s = port, max_requests, max_s
        self.results = []

    def _run(self):
        deadline = time.monotonic() + self.max_s
        while not self.stop.is_set() and len(self.results) < self.max_requests and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/rainbow/", headers={"Connection": "close"})
                response = conn.getresponse()
                response.read()
                self.results.append((response.status, response.getheader("X-Release")))
            except OSError as exc:
                self.results.append((0, str(exc)))
            finally:
                conn.close()
            time.sleep(0.005)


class UpstreamWatcher(Background):
    """Reads the nginx upstream file every few ms and remembers each backend seen down."""

    def __init__(self, path):
        super().__init__()
        self.path, self.seen_down = path, set()

    def _run(self):
        while not self.stop.is_set():
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    if line.rstrip().endswith("down;"):
                        self.seen_down.add(line.split()[1])
            time.sleep(0.002)


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
    set_breaks(rollout_cluster, {"graybad": ["m4-web2"]})
    try:
        result, ret = deploy(rollout_cluster, "graybad", "pro", "v1.1.0")
    finally:
        set_breaks(rollout_cluster, {})
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
    set_breaks(rollout_cluster, {"budget": broken})
    try:
        result, ret = deploy(rollout_cluster, "budget", "four", "v1.1.0")
    finally:
        set_breaks(rollout_cluster, {})
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
