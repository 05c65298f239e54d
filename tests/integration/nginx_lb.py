"""
A real nginx load balancer and small app servers for rollout tests: each app
node is served by a tiny HTTP server that answers from its
``<deploy_root>/<project>/current`` (release name in the body and the
``X-Release`` header); nginx (Debian's, as www-data on a high loopback port)
balances them through an upstream include that ``release_lb`` edits, and says
which backend answered in ``X-Upstream``.
"""

import contextlib
import http.client
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

from pytestshellutils.utils.ports import get_unused_localhost_port


class AppHandler(http.server.BaseHTTPRequestHandler):
    """Serves /<project>/ and /<project>/health from <deploy_to>/current, like a web server would."""

    def do_GET(self):
        project, _, page = self.path.strip("/").partition("/")
        current = os.path.join(self.server.deploy_root, project, "current")
        try:
            if not os.path.islink(current):
                raise FileNotFoundError(current)
            release = os.path.basename(os.path.realpath(current))  # the release folder is named after it
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
        location / {{ proxy_pass http://rainbow; add_header X-Upstream $upstream_addr always; }}
    }}
}}
"""


def as_app_user(*argv):
    return ["runuser", "-u", "www-data", "--", *argv]


@contextlib.contextmanager
def running_nginx(backend_ports):
    """nginx balancing ``backend_ports`` (a list); yields its port, upstream file and commands."""
    # Outside pytest's 0700 temp root: www-data must reach it.
    prefix = pathlib.Path(tempfile.mkdtemp(prefix="sr-nginx-", dir="/tmp"))
    prefix.chmod(0o755)
    (prefix / "tmp").mkdir()
    port = get_unused_localhost_port()
    (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, port=port))
    upstream = prefix / "rainbow.upstream"
    upstream.write_text("".join(f"server 127.0.0.1:{p};\n" for p in backend_ports))
    shutil.chown(prefix, "www-data")
    shutil.chown(prefix / "tmp", "www-data")
    nginx_cmd = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    subprocess.run(as_app_user(*nginx_cmd), check=True)
    try:
        yield {
            "port": port,
            "upstream": str(upstream),
            "test_cmd": " ".join(as_app_user(*nginx_cmd, "-t", "-q")),
            "reload_cmd": " ".join(as_app_user(*nginx_cmd, "-s", "reload")),
            "pid_file": str(prefix / "nginx.pid"),
        }
    finally:
        subprocess.run(as_app_user(*nginx_cmd, "-s", "quit"), check=False)
        shutil.rmtree(prefix, ignore_errors=True)


def set_breaks(cluster, tgt, breaks):
    """
    Break the health of the named nodes for a project's NEXT install, through
    pillar (``breaks.json``: ``{project: [minion, ...]}``, read by the test's
    pillar template), and refresh the pillar of the minions ``tgt`` names.
    The pillar shares ``public``: an empty ``shared/public`` made here first
    keeps the install from seeding it with the release's own pages.
    """
    for project, minions in breaks.items():
        for minion in minions:
            os.makedirs(os.path.join(cluster.nodes_root, minion, project, "shared", "public"), exist_ok=True)
    with open(os.path.join(cluster.pillar_root, "breaks.json"), "w", encoding="utf-8") as handle:
        json.dump(breaks, handle)
    refreshed = cluster.salt_cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt=tgt)
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
    """
    Reads the nginx upstream file every few ms; remembers each backend seen
    down and the fewest backends seen in service at once.
    """

    def __init__(self, path):
        super().__init__()
        self.path, self.seen_down, self.min_up = path, set(), None

    def _run(self):
        while not self.stop.is_set():
            up = 0
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    if line.rstrip().endswith("down;"):
                        self.seen_down.add(line.split()[1])
                    elif line.strip().startswith("server "):
                        up += 1
            self.min_up = up if self.min_up is None else min(self.min_up, up)
            time.sleep(0.002)


def through_nginx(port, project, count=1):
    """``count`` requests through nginx: a list of (status, release served, backend that answered)."""
    answers = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", f"/{project}/", headers={"Connection": "close"})
            response = conn.getresponse()
            response.read()
            answers.append((response.status, response.getheader("X-Release"), response.getheader("X-Upstream")))
        finally:
            conn.close()
    return answers


def upstream_down(path):
    """The backends the upstream file has ``down`` now."""
    with open(path, encoding="utf-8") as handle:
        return {line.split()[1] for line in handle if line.rstrip().endswith("down;")}
