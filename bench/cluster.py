"""
A throwaway Salt cluster for the benchmark: one salt-master and N
salt-minion processes, plain daemons with their config and state under one
temp folder, listening on 127.0.0.1 only. salt-release is installed the Salt
way (file_roots holds links to the repository's loader folders, then
``saltutil.sync_all``), exactly as the integration tests do.
"""

import json
import os
import signal
import socket
import subprocess
import time

import usage
import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADER_FOLDERS = ("_modules", "_runners", "_utils", "_states")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """``with Cluster(root, minion_ids, release_config, pillar_sls) as c:`` starts, syncs and stops it."""

    def __init__(self, root, minion_ids, release_config, pillar_sls, master_id="m8b"):
        self.root, self.minion_ids, self.master_id = root, list(minion_ids), master_id
        self.release_config, self.pillar_sls = release_config, pillar_sls
        self.conf_dir = os.path.join(root, "master", "conf")
        self.file_root = os.path.join(root, "file_root")
        self.processes = []
        self.servers = []

    # ------------------------------------------------------------ life cycle

    def __enter__(self):
        try:
            self._write_file_root()
            ports = {"publish_port": free_port(), "ret_port": free_port()}
            self._start("salt-master", self.conf_dir, "master", self._master_config(ports))
            for minion_id in self.minion_ids:
                conf = os.path.join(self.root, "minions", minion_id, "conf")
                self._start("salt-minion", conf, "minion", self._minion_config(minion_id, ports))
            self._wait_for_minions()
            self.salt("saltutil.sync_all", check=True)
            self.salt_run("saltutil.sync_all", check=True)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False

    def stop(self):
        """Stop our own daemons (each started in its own process group), minions first."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []

    # ------------------------------------------------------------ commands

    def salt(self, fun, *args, target=None, batch=None, check=False, timeout_s=600):
        """``salt``; its ``Done`` has ``timed_out`` set when ``timeout_s`` ran out (the command is killed)."""
        cmd = ["salt", "-c", self.conf_dir, "--out=json", "--static", "-t", "120"]
        if batch:
            cmd = ["salt", "-c", self.conf_dir, "--out=json", "-b", str(batch)]
        return self._call(cmd + [target or f"{self.prefix}*", fun, *args], check, timeout_s)

    def salt_run(self, fun, *args, check=False, timeout_s=600, wrapper=()):
        """``salt-run`` (under ``wrapper``, a profiler, when given)."""
        cmd = list(wrapper) + [_script("salt-run") if wrapper else "salt-run", "-c", self.conf_dir, "--out=json"]
        return self._call(cmd + [fun, *args], check, timeout_s)

    def minion_cachedir(self, minion_id):
        return os.path.join(self.root, "minions", minion_id, "root", "var", "cache", "salt", "minion")

    def node_root(self, minion_id):
        return os.path.join(self.root, "nodes", minion_id)

    @property
    def prefix(self):
        return f"{self.master_id}-"

    # ------------------------------------------------------------ setup

    def _master_config(self, ports):
        pillar_root = os.path.join(self.root, "pillar")
        os.makedirs(pillar_root, exist_ok=True)
        with open(os.path.join(pillar_root, "top.sls"), "w", encoding="utf-8") as handle:
            handle.write("base:\n  '*':\n    - release\n")
        with open(os.path.join(pillar_root, "release.sls"), "w", encoding="utf-8") as handle:
            handle.write(self.pillar_sls.replace("{{ nodes_root }}", os.path.join(self.root, "nodes")))
        return dict(
            ports, id=self.master_id, root_dir=os.path.join(self.root, "master", "root"),
            interface="127.0.0.1", user="root", auto_accept=True, open_mode=True,
            file_roots={"base": [self.file_root]}, pillar_roots={"base": [pillar_root]},
            fileserver_list_cache_time=0, log_level="warning", log_level_logfile="warning",
            timeout=30, gather_job_timeout=15, release=self.release_config,
        )

    def _minion_config(self, minion_id, ports):
        return {
            "id": minion_id, "master": "127.0.0.1", "master_port": ports["ret_port"],
            "publish_port": ports["publish_port"], "user": "root",
            "root_dir": os.path.join(self.root, "minions", minion_id, "root"),
            "grains": {"env": "bench", "role": "web"}, "acceptance_wait_time": 1,
            "log_level": "warning", "log_level_logfile": "warning",
        }

    def _write_file_root(self):
        os.makedirs(os.path.join(self.file_root, "releases"))
        for folder in LOADER_FOLDERS:
            os.symlink(os.path.join(REPO_ROOT, folder), os.path.join(self.file_root, folder))

    def _start(self, daemon, conf_dir, kind, config):
        os.makedirs(conf_dir, exist_ok=True)
        with open(os.path.join(conf_dir, kind), "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle)
        with open(os.path.join(conf_dir, f"{kind}.out"), "wb") as log:  # the daemon keeps its own copy
            self.processes.append(subprocess.Popen(
                [daemon, "-c", conf_dir], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def _wait_for_minions(self, timeout_s=300):
        deadline = time.monotonic() + timeout_s
        answered = {}
        while time.monotonic() < deadline:
            done = self._call(["salt", "-c", self.conf_dir, "--out=json", "--static", "-t", "10",
                               f"{self.prefix}*", "test.ping"], False, 60)
            answered = _json_or_empty(done.stdout)
            if all(answered.get(m) is True for m in self.minion_ids):
                return
            time.sleep(2)
        missing = [m for m in self.minion_ids if answered.get(m) is not True]
        raise RuntimeError(f"minions did not come up within {timeout_s} s: {', '.join(missing)}")

    def serve_http(self, folder, port):
        """Serve ``folder`` over HTTP on 127.0.0.1:``port`` (a threaded ``http.server``, counted as the master's)."""
        self.processes.append(subprocess.Popen(
            ["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", folder, str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        self.servers.append(self.processes[-1])

    def _call(self, cmd, check, timeout_s):
        # The master and the HTTP server each run in their own session: sid == pid.
        daemons = [p.pid for p in self.processes[:1] + self.servers]
        done = usage.run(cmd, timeout_s, daemons=daemons)
        if check and (done.returncode != 0 or done.timed_out):
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}{done.stdout[-2000:]}")
        return done


def _script(name):
    """The full path of a console script (a profiler runs it as a Python file)."""
    found = subprocess.run(["which", name], capture_output=True, text=True, check=True)
    return found.stdout.strip()


def _json_or_empty(text):
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {}


def last_json(text):
    """The last JSON document in ``text`` (salt-run prints progress documents before its return)."""
    decoder, docs, index = json.JSONDecoder(), [], 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            break
        try:
            doc, index = decoder.raw_decode(text, index)
        except ValueError:
            break
        docs.append(doc)
    return docs[-1] if docs else {}
