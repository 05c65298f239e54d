"""
Two masters, one fleet: Salt multi-master (minions connected to both masters,
which share one master key pair) with the records and the deploy lock in a
real PostgreSQL. Either master deploys and reads history; a deploy from one
is refused while the other holds the lock; a runner killed mid-wave, or a
master stopped mid-deploy, is recovered from the other master.

Each app node is a small HTTP server answering from its deploy_to/current,
which the test can make sick (503) to hold a batch in its health check; the
load balancer is a plain upstream file on h8-web1 (test and reload are
``true``: release_lb's file handling is what matters here).
"""

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg2
import pytest
import salt.crypt
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import PILLAR_TOP, Cluster, make_file_root, project_config, runner_return
from tests.integration.nginx_lb import AppHandler
from tests.integration.postgres import postgres_cluster

APPS = ("h8-web1", "h8-web2", "h8-web3")
SALT_RUN = os.path.join(os.path.dirname(sys.executable), "salt-run")

PILLAR = textwrap.dedent(
    """\
    {% set node = grains['id'] %}
    release:
    {% for project in ['rainbow', 'held', 'viahttp'] %}
      {{ project }}:
        deploy_to: {{ nodes_root }}/{{ node }}/{{ project }}
        user: {{ app_user }}
        shared: [storage, logs]
    {% endfor %}
    """
)


class FlakyHandler(AppHandler):
    """The app server, answering 503 while the test keeps it sick."""

    def do_GET(self):
        if self.server.sick.is_set():
            self.send_error(503)
            return
        super().do_GET()


def start_app(deploy_root, port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FlakyHandler)
    server.deploy_root, server.sick = deploy_root, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class ArtifactHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the artifact root; remembers every path asked for."""

    def log_message(self, *args):
        self.server.asked.append(self.path)


def start_artifact_server(root):
    port = get_unused_localhost_port()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), lambda *a: ArtifactHandler(*a, directory=root))
    server.asked = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


def write_keys(dirs, name):
    """One fresh RSA key pair, written as <name>.pem/<name>.pub into each folder."""
    private, public = salt.crypt.gen_keys(2048)
    for folder in dirs:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        for filename, text in ((f"{name}.pem", private), (f"{name}.pub", public)):
            with open(os.path.join(folder, filename), "w", encoding="utf-8") as handle:
                handle.write(text)
        os.chmod(os.path.join(folder, f"{name}.pem"), 0o400)


def share_master_key(*masters):
    """
    One master key pair for both masters, written before either starts. Salt
    3008's key cache (localfs_key) looks for it in pki_dir or, as seen here,
    in the master's cachedir: both get it.
    """
    write_keys([m.config[key] for m in masters for key in ("pki_dir", "cachedir")], "master")


def start_minion(master, minion_id, port, ret_ports):
    """
    A minion of both masters. Its key is made before it starts, as a package
    install would, so its two master connections never race to create it.
    """
    minion = master.salt_minion_daemon(minion_id, overrides={
        "master": [f"127.0.0.1:{p}" for p in ret_ports],
        "grains": {"env": "test", "role": "web", "app_addr": f"127.0.0.1:{port}"},
    })
    write_keys([minion.config["pki_dir"]], "minion")
    minion.start(start_timeout=120)
    return minion


@pytest.fixture(scope="module")
def ha(salt_factories, app_repo, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("h8"))
    nodes_root = os.path.join(base, "nodes")
    flags = os.path.join(base, "flags")
    os.makedirs(nodes_root)
    os.makedirs(flags)
    ports = {m: get_unused_localhost_port() for m in APPS}
    upstream = os.path.join(base, "rainbow.upstream")
    with open(upstream, "w", encoding="utf-8") as handle:
        handle.write("".join(f"server 127.0.0.1:{ports[m]};\n" for m in APPS))
    pillar_root = os.path.join(base, "pillar")
    os.makedirs(pillar_root)
    with open(os.path.join(pillar_root, "top.sls"), "w", encoding="utf-8") as handle:
        handle.write(PILLAR_TOP)
    with open(os.path.join(pillar_root, "release.sls"), "w", encoding="utf-8") as handle:
        handle.write(PILLAR.replace("{{ nodes_root }}", nodes_root).replace("{{ app_user }}", "www-data"))
    # Each master has its own fileserver: nodes must fetch from the master that published the job.
    roots = {name: make_file_root(os.path.join(base, f"files-{name}", "base")) for name in ("a", "b")}
    artifact_server, artifact_url = start_artifact_server(os.path.join(roots["a"], "releases"))
    with postgres_cluster() as pg_url:
        env = {
            "waves": [{"name": "first", "target": "h8-web1"},
                      {"name": "rest", "target": "h8-web*", "batch": 1}],
            "health": {"url": "http://{host}/{project}/health", "expect": "release", "timeout_s": 2,
                       "retries": 120, "interval_s": 0.5},
            "host_grain": "app_addr",
            "lb": {"minion": "h8-web1", "kind": "nginx", "upstream_file": upstream, "backend": "{host}",
                   "test_cmd": "true", "reload_cmd": "true"},
        }
        projects = {
            "rainbow": project_config(app_repo.path, checks=[], environments={"pro": env}),
            "held": project_config(
                app_repo.path, checks=[], environments={"one": {"target": "h8-web1"}},
                build=[f"for i in $(seq 300); do test -f {flags}/go && break; sleep 0.2; done", "make dist"],
                build_user="root", build_sandbox="none",  # the build waits on a flag under the test's private tmp
            ),
            "viahttp": project_config(app_repo.path, checks=[], artifact_url=artifact_url,
                                      environments={"all": {"target": "h8-web*"}}),
        }

        def release_config(name):
            return {"artifact_root": os.path.join(roots[name], "releases"), "store": pg_url,
                    "state_dir": os.path.join(base, f"state-{name}"), "projects": projects}

        ret_a, pub_a, ret_b, pub_b = (get_unused_localhost_port() for _ in range(4))
        common = {"pillar_roots": {"base": [pillar_root]}, "open_mode": True, "auto_accept": True,
                  "timeout": 15, "gather_job_timeout": 10, "fileserver_list_cache_time": 0}
        master_b = salt_factories.salt_master_daemon("h8b", overrides=dict(
            common, file_roots={"base": [roots["b"]]}, release=release_config("b"),
            ret_port=ret_b, publish_port=pub_b))
        master_a = salt_factories.salt_master_daemon("h8a", overrides=dict(
            common, file_roots={"base": [roots["a"]]}, release=release_config("a"),
            ret_port=ret_a, publish_port=pub_a))
        share_master_key(master_a, master_b)
        with master_b.started(start_timeout=120), master_a.started(start_timeout=120):
            minions = [start_minion(master_a, m, ports[m], [ret_a, ret_b]) for m in APPS]
            cluster = Cluster(master_a, minions, release_config("a"), nodes_root, pillar_root)
            run_b = master_b.salt_run_cli(timeout=300)
            for runner in (cluster.salt_run_cli, run_b):
                assert runner.run("saltutil.sync_all").returncode == 0
            assert cluster.salt_cli.run("saltutil.sync_all", minion_tgt="h8-*").returncode == 0
            refreshed = master_b.salt_cli(timeout=60).run("saltutil.refresh_pillar", "wait=True", minion_tgt="h8-*")
            assert refreshed.returncode == 0, refreshed
            apps = {m: start_app(os.path.join(nodes_root, m), ports[m]) for m in APPS}
            cluster.b, cluster.run_b, cluster.apps = master_b, run_b, apps
            cluster.pg_url, cluster.flags, cluster.upstream = pg_url, flags, upstream
            cluster.artifacts = artifact_server
            try:
                yield cluster
            finally:
                for server in (*apps.values(), artifact_server):
                    server.shutdown()
                open(os.path.join(flags, "go"), "w").close()
                for minion in minions:
                    minion.terminate()


def run_on_b(ha, fun, *args):
    result = ha.run_b.run(fun, *args, "--out=json")
    return result, runner_return(result)


def salt_run_a(ha, *args):
    return subprocess.Popen([SALT_RUN, "-c", str(ha.master.config_dir), *args, "--out=json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def current(ha, minion, project="rainbow"):
    link = os.path.join(ha.deploy_to(minion, project), "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def down(ha):
    with open(ha.upstream, encoding="utf-8") as handle:
        return sorted(line.split()[1] for line in handle if line.rstrip().endswith("down;"))


def wait_for(what, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(0.2)


def lock_row(ha, project, env):
    """The lock row in PostgreSQL (None before the first runner made the schema)."""
    with psycopg2.connect(ha.pg_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass('locks') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return None
        cursor.execute("SELECT owner FROM locks WHERE project = %s AND env = %s", (project, env))
        row = cursor.fetchone()
    return json.loads(row[0]) if row else None


def backend(ha, minion):
    return f"127.0.0.1:{ha.apps[minion].server_address[1]}"


# ---------------------------------------------------------------- tests


def test_two_masters_share_records_and_lock_and_either_deploys(ha):
    proc = salt_run_a(ha, "release.deploy", "held", "env=one", "ref=v1.0.0")
    try:
        wait_for(lambda: lock_row(ha, "held", "one"))
        result, refused = run_on_b(ha, "release.deploy", "held", "env=one", "ref=v1.1.0")
        assert result.returncode != 0 and refused["failed_step"] == "lock", refused
        assert "locked by" in refused["error"]
        _, seen = run_on_b(ha, "release.history", "held", "env=one")
        assert seen["runs"][1]["result"] is None and seen["runs"][1]["ref"] == "v1.0.0"  # A's, still running
    finally:
        open(os.path.join(ha.flags, "go"), "w").close()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-2000:]
    # Master B deploys too; its artifact is only on B's fileserver, so nodes fetched it from B.
    result, ret = run_on_b(ha, "release.deploy", "held", "env=one", "ref=v1.1.0")
    assert result.returncode == 0 and ret["result"], ret
    assert not os.path.exists(os.path.join(ha.release_config["artifact_root"], "held", f"{ret['release']}.tar.gz"))
    _, status = run_on_b(ha, "release.status", "held", "env=one")
    assert status["result"], status
    result, history = ha.run("release.history", "held", "env=one")  # and A reads what B did
    kinds = [(r["kind"], r["result"]) for r in history["runs"]]
    assert kinds[:3] == [("deploy", 1), ("deploy", 0), ("deploy", 1)], kinds  # B, B refused, A (by start)
    assert lock_row(ha, "held", "one") is None


def test_artifact_url_nodes_fetch_over_http_with_checksum(ha):
    result, ret = ha.run("release.deploy", "viahttp", "env=all", "ref=v1.0.0")
    assert result.returncode == 0 and ret["result"], ret
    assert f"/viahttp/{ret['release']}.tar.gz" in ha.artifacts.asked
    assert {current(ha, m, "viahttp") for m in APPS} == {ret["release"]}


def start_stuck_deploy(ha, ref):
    """A deploy from master A whose batch on h8-web2 waits in its health check, drained."""
    ha.apps["h8-web2"].sick.set()
    before = current(ha, "h8-web2")
    proc = salt_run_a(ha, "release.deploy", "rainbow", "env=pro", f"ref={ref}")

    def web2_switched_and_drained():
        return current(ha, "h8-web2") != before and down(ha) == [backend(ha, "h8-web2")]

    wait_for(web2_switched_and_drained, 180)
    time.sleep(1)
    return proc


def dead_and_recover(ha):
    _, history = run_on_b(ha, "release.history", "rainbow", "env=pro", "limit=3")
    return history["runs"]


def test_runner_killed_mid_wave_is_finished_from_the_other_master(ha):
    _, first = ha.run("release.deploy", "rainbow", "env=pro", "ref=v1.0.0")
    assert first["result"], first
    proc = start_stuck_deploy(ha, "v1.1.0")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    new = current(ha, "h8-web2")
    assert current(ha, "h8-web3") == first["release"]  # the kill came before h8-web3's batch
    ha.apps["h8-web2"].sick.clear()
    result, ret = run_on_b(ha, "release.recover", "rainbow", "env=pro")
    assert result.returncode == 0 and ret["result"], ret
    assert {current(ha, m) for m in APPS} == {new}
    assert down(ha) == []
    assert ret["release"] == new and ret["mode"] == "finish"
    runs = dead_and_recover(ha)
    by_kind = {r["kind"]: r for r in reversed(runs)}  # newest of each kind
    recover_run, unlock_run, dead = by_kind["recover"], by_kind["unlock"], by_kind["deploy"]
    assert recover_run["kind"] == "recover" and recover_run["result"] == 1
    assert unlock_run["kind"] == "unlock" and unlock_run["details"]["dead_holder"] is True
    assert dead["kind"] == "deploy" and dead["result"] == 0 and f"recovered by run {recover_run['id']}" in dead["error"]
    assert dead["details"]["journal"]["targets"] == {m: new for m in APPS}


def test_primary_master_stopped_mid_deploy_is_rolled_back_from_the_secondary(ha):
    before = {m: current(ha, m) for m in APPS}
    assert len(set(before.values())) == 1
    proc = start_stuck_deploy(ha, "release/2.0")
    ha.master.terminate()  # the primary master's daemon goes away mid-wave
    ha.apps["h8-web2"].sick.clear()
    try:
        proc.wait(timeout=120)  # its runner fails at its next call through the master
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a master host that dies takes its runner with it
        proc.wait()
    assert current(ha, "h8-web2") != before["h8-web2"]
    result, ret = run_on_b(ha, "release.recover", "rainbow", "env=pro", "mode=rollback")
    assert result.returncode == 0 and ret["result"], ret
    assert {m: current(ha, m) for m in APPS} == before
    assert down(ha) == []
    runs = dead_and_recover(ha)
    dead = next(r for r in runs if r["kind"] == "deploy")
    assert dead["result"] == 0 and "recovered by" in dead["error"] and "rollback" in dead["error"]
    _, bad = run_on_b(ha, "release.status", "rainbow", "env=pro")
    assert bad["result"], bad
