"""
Stopping a real run at an exact phase, and killing a real process there.

- ``Gates``: a shell script the test's stack reload and the load balancer's
  ``test_cmd`` go through. Armed (``arm(name, skip)``), the ``skip+1``-th call
  of ``name`` blocks, says so (``<name>.reached``), and waits until the test
  opens it (or, armed with ``how="fail"``, exits 1); unarmed it just runs the
  command after it.
- ``HealthGate``: the environment's health URL; it forwards to the app node,
  or, armed for a node, blocks (``hang``) or answers 500 (``fail``).
- ``BusWatcher``: waits for an event tag on the master's bus (the phases the
  nodes report themselves: ``install``).
- ``kill_tree``: kill -9 of a daemon and every process under it, as the OOM
  killer or a lost host would, except a command the node started in its own
  session (a stack reload outlives its job, as it does under systemd's
  ``KillMode=process``).
"""

import contextlib
import http.client
import http.server
import os
import signal
import stat
import threading
import time

import psutil
import salt.utils.event

GATE_SCRIPT = """\
#!/bin/sh
# gate NAME [command...]: when NAME is armed, skip its count of calls, then block until opened
dir=$(dirname "$0"); name=$1; shift
if [ -e "$dir/$name.armed" ]; then
  read -r skip how < "$dir/$name.armed"
  if [ "${skip:-0}" -gt 0 ]; then
    echo "$((skip - 1)) $how" > "$dir/$name.armed"
  else
    rm -f "$dir/$name.armed"; touch "$dir/$name.reached"
    [ "$how" = fail ] && { echo "gate $name: failed as armed" >&2; exit 1; }
    while [ ! -e "$dir/$name.open" ]; do sleep 0.05; done
    rm -f "$dir/$name.open"
  fi
fi
[ $# -eq 0 ] || exec "$@"
"""


class Gates:
    def __init__(self, directory):
        self.dir = directory
        os.chmod(directory, 0o777)
        self.script = os.path.join(directory, "gate")
        with open(self.script, "w", encoding="utf-8") as handle:
            handle.write(GATE_SCRIPT)
        os.chmod(self.script, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)

    def command(self, name, *argv):
        return " ".join((self.script, name, *argv))

    def arm(self, name, skip=0, how="hold"):
        """The ``skip+1``-th call of ``name`` blocks until opened (``hold``) or exits 1 (``fail``)."""
        self._clear(name)
        with open(self._path(name, "armed"), "w", encoding="utf-8") as handle:
            handle.write(f"{skip} {how}\n")

    def wait_reached(self, name, timeout_s=90):
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self._path(name, "reached")):
            assert time.monotonic() < deadline, f"gate {name} never reached"
            time.sleep(0.02)

    def open(self, name):
        open(self._path(name, "open"), "w").close()  # noqa: SIM115

    def disarm(self, name):
        self._clear(name)

    def _clear(self, name):
        for suffix in ("armed", "reached", "open"):
            if os.path.exists(self._path(name, suffix)):
                os.unlink(self._path(name, suffix))

    def _path(self, name, suffix):
        return os.path.join(self.dir, f"{name}.{suffix}")


class HealthGate:
    """An HTTP server at ``/<minion>/<project>`` in front of each node's health page."""

    def __init__(self, app_ports):
        self.app_ports = app_ports
        self.armed = {}  # (minion, project) -> "hang" | "fail"
        self.spared = {}  # (minion, project) -> the release it answers for all the same
        self.reached = {}
        self.opened = threading.Event()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                minion, _, project = self.path.strip("/").partition("/")
                gate.answer(self, minion, project)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/{{minion}}/{{project}}"

    def arm(self, minion, project, how, unless_release=None):
        """``how`` for every check of the node, except while it serves ``unless_release``."""
        self.opened.clear()
        self.reached[(minion, project)] = threading.Event()
        self.armed[(minion, project)] = how
        self.spared[(minion, project)] = unless_release

    def wait_reached(self, minion, project, timeout_s=90):
        assert self.reached[(minion, project)].wait(timeout_s), f"health gate {minion}/{project} never reached"

    def open(self):
        self.armed.clear()
        self.opened.set()

    def answer(self, handler, minion, project):
        try:
            status, release, body = self._ask(minion, project)
        except (OSError, http.client.HTTPException):
            handler.send_error(502)
            return
        how = self.armed.get((minion, project))
        if how and release != self.spared.get((minion, project)):
            self.reached[(minion, project)].set()
            if how == "fail":
                handler.send_error(500)
                return
            self.opened.wait(120)
        handler.send_response(status)
        handler.send_header("X-Release", release)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _ask(self, minion, project):
        """The node's own answer: (status, release it serves, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.app_ports[minion], timeout=5)
        try:
            conn.request("GET", f"/{project}/health")
            response = conn.getresponse()
            body = response.read()
            return response.status, response.getheader("X-Release") or "", body
        finally:
            conn.close()

    def close(self):
        self.open()
        self.server.shutdown()


class BusWatcher:
    """
    Waits, in a thread, for the first event whose tag ends with ``suffix``
    under ``prefix`` (and, given ``fun``, whose data names that function: a
    job's ``salt/job/<jid>/new``, fired as the master publishes it).
    """

    def __init__(self, master_config, prefix, suffix, fun=None):
        self.seen = threading.Event()
        self.bus = salt.utils.event.get_master_event(master_config, master_config["sock_dir"], listen=True)
        self.prefix, self.suffix, self.fun = prefix, suffix, fun
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop and not self.seen.is_set():
            event = self.bus.get_event(wait=0.2, tag=self.prefix, full=True)
            if event and event["tag"].endswith(self.suffix) and self.fun in (None, event["data"].get("fun")):
                self.seen.set()

    def wait(self, timeout_s=90):
        assert self.seen.wait(timeout_s), f"no {self.prefix}*{self.suffix} event"

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.bus.destroy()


def kill_tree(pid):
    """kill -9 ``pid`` and its descendants in its own session; returns how many processes died."""
    try:
        top = psutil.Process(pid)
        session = os.getsid(pid)
        victims = [top] + [p for p in top.children(recursive=True) if _in_session(p, session)]
    except psutil.NoSuchProcess:
        return 0
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def _in_session(proc, session):
    try:
        return os.getsid(proc.pid) == session
    except OSError:
        return False
