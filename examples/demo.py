#!/usr/bin/env python3
"""
The demo: a throwaway Salt cluster on loopback (one master, three minions, as
ordinary processes with their config and state under ``.demo/`` in the
checkout) deploys the bundled example app from a local git repository twice,
printing the runner's live progress and a per-node table, then stops every
process it started, on success, failure or Ctrl-C.

A salt-api beside the master serves the web console (``console/``); the demo
prints its URL and a login. It is optional: when salt-api does not come up,
the demo says so and deploys all the same. ``--keep`` (or Enter on a
terminal) keeps the cluster up for the console until Enter or Ctrl-C.

    python examples/demo.py [--keep]        (or: make demo)
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import yaml

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(CHECKOUT, ".demo")
BIN = os.path.dirname(sys.executable)
MINIONS = ("demo-web1", "demo-web2", "demo-web3")
REFS = ("v1.0.0", "v1.1.0")
CONSOLE_USER = "demo"  # the auto eauth takes any password for the users external_auth names


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_yaml(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, default_flow_style=False)


def git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="Demo", GIT_AUTHOR_EMAIL="demo@example.com",
               GIT_COMMITTER_NAME="Demo", GIT_COMMITTER_EMAIL="demo@example.com")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def make_app_repo():
    """A local git repository of examples/rainbow with tags v1.0.0 and v1.1.0."""
    path = os.path.join(DEMO, "rainbow")
    shutil.copytree(os.path.join(CHECKOUT, "examples", "rainbow"), path)
    git(path, "init", "-q", "-b", "master")
    for ref in REFS:
        with open(os.path.join(path, "VERSION"), "w", encoding="utf-8") as handle:
            handle.write(ref[1:] + "\n")
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", f"release {ref}")
        git(path, "tag", ref)
    return path


def make_file_root():
    """The master's file_roots, with salt-release installed the Salt way (links to the checkout)."""
    root = os.path.join(DEMO, "srv")
    os.makedirs(os.path.join(root, "releases"))
    for folder in ("_modules", "_runners", "_utils", "_states"):
        os.symlink(os.path.join(CHECKOUT, folder), os.path.join(root, folder))
    return root


def console_settings(api_port):
    """salt-api serving the web console, and who may use it (see docs/console.md)."""
    return {
        "rest_cherrypy": {"port": api_port, "host": "127.0.0.1", "disable_ssl": True,
                          "app": os.path.join(CHECKOUT, "console", "index.html"),
                          "static": os.path.join(CHECKOUT, "console")},
        "external_auth": {"auto": {CONSOLE_USER: ["@runner"]}},
        "netapi_enable_clients": ["runner", "runner_async"],
    }


def write_configs(repo, file_root, api_port):
    publish_port, ret_port = free_port(), free_port()
    pillar_root = os.path.join(DEMO, "pillar")
    write_yaml(os.path.join(pillar_root, "top.sls"), {"base": {"*": ["release"]}})
    with open(os.path.join(pillar_root, "release.sls"), "w", encoding="utf-8") as handle:
        handle.write(
            "release:\n  rainbow:\n"
            f"    deploy_to: {DEMO}/nodes/{{{{ grains['id'] }}}}/rainbow\n"
            "    user: www-data\n    shared: [data, storage, logs]\n    webroot: public\n    keep_releases: 5\n"
            # The example app's pattern (docs/php-app.md): config rendered with the release name and a secret.
            "    files:\n      config/app.php: {template: config/app.php.example}\n"
            "    secrets:\n      app_secret: demo-only-secret\n"
        )
    write_yaml(os.path.join(DEMO, "master", "conf", "master"), {
        "id": "demo-master", "root_dir": os.path.join(DEMO, "master"), "user": "root",
        "interface": "127.0.0.1", "publish_port": publish_port, "ret_port": ret_port,
        "open_mode": True, "auto_accept": True,
        "file_roots": {"base": [file_root]}, "pillar_roots": {"base": [pillar_root]},
        "fileserver_list_cache_time": 0,
        **console_settings(api_port),
        "release": {
            "artifact_root": os.path.join(file_root, "releases"),
            "projects": {"rainbow": {
                "repo": repo, "build": ["make dist"], "checks": ["make test"],
                "environments": {"demo": {"target": "demo-web*", "batch": 1}},
            }},
        },
    })
    for minion in MINIONS:
        write_yaml(os.path.join(DEMO, minion, "conf", "minion"), {
            "id": minion, "root_dir": os.path.join(DEMO, minion), "user": "root",
            "master": "127.0.0.1", "master_port": ret_port, "publish_port": publish_port,
            "grains": {"env": "demo"},
        })


class Daemons:
    """The processes the demo started; stop() ends exactly those."""

    def __init__(self):
        self.procs = []

    def start(self, binary, name, log_name=None):
        conf = os.path.join(DEMO, name, "conf")
        with open(os.path.join(DEMO, f"{log_name or name}.log"), "wb") as log:  # the daemon keeps its own copy
            proc = subprocess.Popen([os.path.join(BIN, binary), "-c", conf, "-l", "warning"],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs = []


def master_cli(tool, *args, timeout=60):
    conf = os.path.join(DEMO, "master", "conf")
    return subprocess.run([os.path.join(BIN, tool), "-c", conf, *args],
                          capture_output=True, text=True, timeout=timeout)


def wait_for_minions(timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pinged = master_cli("salt", "demo-web*", "test.ping", "--out=json", "--static", "-t", "5")
        answered = json.loads(pinged.stdout or "{}") if pinged.stdout.strip().startswith("{") else {}
        if sorted(k for k, v in answered.items() if v is True) == list(MINIONS):
            return
        time.sleep(1)
    raise SystemExit(f"the minions did not answer within {timeout_s} s (see {DEMO}/*.log)")


def sync():
    for tool, args in (("salt", ["demo-web*", "saltutil.sync_all"]), ("salt-run", ["saltutil.sync_all"])):
        done = master_cli(tool, *args)
        if done.returncode != 0:
            raise SystemExit(f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def deploy(ref):
    """Run the deploy, echoing its progress lines as they come; returns (exit code, return)."""
    print(f"\n$ salt-run release.deploy rainbow env=demo ref={ref}", flush=True)
    conf = os.path.join(DEMO, "master", "conf")
    proc = subprocess.Popen(
        [os.path.join(BIN, "salt-run"), "-c", conf, "release.deploy", "rainbow", "env=demo",
         f"ref={ref}", "author=demo", "--out=json", "--out-indent=-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ret = {}
    for line in proc.stdout:
        doc = json.loads(line) if line.strip().startswith("{") else {}
        if doc.get("suffix") == "progress":  # salt-run prints runner progress events this way
            print(f"  {doc['event']['message']}", flush=True)
        elif "nodes" in doc:
            ret = doc
    code = proc.wait()
    if not ret:
        print(proc.stderr.read(), file=sys.stderr)
    return code, ret


def show_nodes():
    """What each node serves now: its health page run by PHP as the app user, and its seeded data."""
    for minion in MINIONS:
        deploy_to = os.path.join(DEMO, "nodes", minion, "rainbow")
        health = subprocess.run(["runuser", "-u", "www-data", "--", "php", "-f",
                                 os.path.join(deploy_to, "current", "public", "health.php")],
                                capture_output=True, text=True, timeout=30)
        data = sorted(os.path.relpath(os.path.join(folder, name), os.path.join(deploy_to, "shared", "data"))
                      for folder, _, files in os.walk(os.path.join(deploy_to, "shared", "data")) for name in files)
        print(f"  {minion}: health {health.stdout.strip() or health.stderr.strip()}; shared/data: {', '.join(data)}")
        if '"status":"ok"' not in health.stdout:
            raise SystemExit(f"{minion} does not answer its health page as expected")


def console_up(port, timeout_s=30):
    """Whether salt-api answers on ``port`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def offer_console(api_port, keep):
    if not console_up(api_port):
        print(f"\nthe web console is not available: salt-api did not start (see {DEMO}/salt-api.log)")
        return
    print(f"\nweb console: http://127.0.0.1:{api_port}/app  (user {CONSOLE_USER}, any password, eauth auto)")
    if keep or sys.stdin.isatty():
        with contextlib.suppress(EOFError):
            input("press Enter to stop the cluster ")


def table(ret):
    rows = [("minion", "result", "release", "previous", "seconds")]
    for minion, node in sorted(ret.get("nodes", {}).items()):
        rows.append((minion, "ok" if node["result"] else "FAILED", node.get("release") or "-",
                     node.get("previous") or "-", str(node.get("duration_s") or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main(keep=False):
    shutil.rmtree(DEMO, ignore_errors=True)
    os.makedirs(DEMO)
    api_port = free_port()
    write_configs(make_app_repo(), make_file_root(), api_port)
    daemons = Daemons()
    try:
        daemons.start("salt-master", "master")
        daemons.start("salt-api", "master", log_name="salt-api")
        for minion in MINIONS:
            daemons.start("salt-minion", minion)
        print(f"started a master and {len(MINIONS)} minions on 127.0.0.1 (state in {DEMO})")
        wait_for_minions()
        sync()
        status = 0
        for ref in REFS:
            code, ret = deploy(ref)
            table(ret)
            show_nodes()
            status = status or code or (0 if ret.get("result") else 1)
        offer_console(api_port, keep)
        return status
    finally:
        daemons.stop()
        print("stopped every process the demo started")


if __name__ == "__main__":
    try:
        sys.exit(main(keep="--keep" in sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
