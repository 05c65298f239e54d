"""
Real PHP-FPM, nginx and Tomcat from the Debian packages, started by tests as
the non-root app user on high loopback ports, with config, pid files and logs
in a temp folder (no systemd).
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request

APP_USER = "www-data"
CATALINA_HOME = "/usr/share/tomcat10"
TOMCAT_CONF = "/etc/tomcat10"
JAVA_OPTS = "-Xmx64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"


def app_ids():
    entry = pwd.getpwnam(APP_USER)
    return entry.pw_uid, entry.pw_gid


def owned_dir(path):
    """A folder the app user owns (where a service writes pid files, logs, temp files)."""
    os.makedirs(path, exist_ok=True)
    os.chown(path, *app_ids())
    return path


def readable_root(prefix):
    """A temp folder with a nodes/ folder in it, outside pytest's 0700 tmp dirs: the app user must read releases."""
    root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(root, 0o755)
    os.makedirs(os.path.join(root, "nodes"))
    return root, os.path.join(root, "nodes")


def as_app_user():
    uid, gid = app_ids()
    return {"user": uid, "group": gid, "extra_groups": []}


def wait_port(port, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered on 127.0.0.1:{port} within {timeout_s} s")


def get(port, path="/"):
    """(status, body) of one HTTP GET on a new connection."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def proc_uids(pid):
    """Real, effective, saved and filesystem uids of a process, from /proc."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Fpm:
    """php-fpm8.2 in the foreground as the app user; OPcache never revalidates."""

    def __init__(self, root, port):
        self.dir = owned_dir(root)
        self.port = port
        self.pid_file = os.path.join(self.dir, "fpm.pid")
        self.log = os.path.join(self.dir, "fpm.log")
        conf = os.path.join(self.dir, "fpm.conf")
        with open(conf, "w", encoding="utf-8") as handle:
            handle.write(textwrap.dedent(f"""\
                [global]
                pid = {self.pid_file}
                error_log = {self.log}
                process_control_timeout = 10s

                [app]
                listen = 127.0.0.1:{port}
                pm = static
                pm.max_children = 2
                catch_workers_output = yes
                """))
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            ["php-fpm8.2", "-F", "-y", conf, "-d", "opcache.enable=1",
             "-d", "opcache.validate_timestamps=0", "-d", "opcache.file_update_protection=2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", **as_app_user(),
        )
        wait_port(port)

    def stop(self):
        stop(self.proc)


class Nginx:
    """nginx as the app user, one server per PHP site, passing $document_root (the classic setup)."""

    def __init__(self, root, sites):
        self.dir = owned_dir(root)
        for name in ("tmp", "logs"):
            owned_dir(os.path.join(self.dir, name))
        servers = "".join(self._server(port, docroot, fpm_port) for port, docroot, fpm_port in sites)
        temp_paths = "".join(
            f"    {kind}_temp_path {self.dir}/tmp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as handle:
            handle.write(
                f"worker_processes 1;\ndaemon off;\npid {self.dir}/nginx.pid;\n"
                f"error_log {self.dir}/logs/error.log;\nevents {{ worker_connections 256; }}\n"
                f"http {{\n    access_log off;\n{temp_paths}{servers}}}\n"
            )
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            ["nginx", "-p", self.dir, "-c", conf, "-e", f"{self.dir}/logs/error.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", **as_app_user(),
        )
        for port, _, _ in sites:
            wait_port(port)

    @staticmethod
    def _server(port, docroot, fpm_port):
        return textwrap.indent(textwrap.dedent(f"""\
            server {{
                listen 127.0.0.1:{port};
                root {docroot};
                index index.php;
                location ~ \\.php$ {{
                    try_files $uri =404;
                    include /etc/nginx/fastcgi_params;
                    fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
                    fastcgi_pass 127.0.0.1:{fpm_port};
                }}
            }}
            """), "    ")

    def stop(self):
        stop(self.proc)


class TomcatBase:
    """
    A CATALINA_BASE in a temp folder: conf/ copied from /etc/tomcat10 and
    owned by root; work/, temp/, logs/ and run/ owned by the app user. The
    context ROOT's docBase is ``<deploy_to>/current/web``.
    """

    def __init__(self, root, http_port, shutdown_port, doc_base):
        self.base = root
        self.port = http_port
        conf = os.path.join(root, "conf")
        os.makedirs(os.path.join(conf, "Catalina", "localhost"))
        for name in ("web.xml", "catalina.properties", "context.xml", "logging.properties"):
            # Debian ships them root:tomcat 0640: readable by the app user only as copies.
            os.chmod(shutil.copy(os.path.join(TOMCAT_CONF, name), conf), 0o644)
        with open(os.path.join(conf, "server.xml"), "w", encoding="utf-8") as handle:
            handle.write(textwrap.dedent(f"""\
                <?xml version="1.0" encoding="UTF-8"?>
                <Server port="{shutdown_port}" address="127.0.0.1" shutdown="SHUTDOWN">
                  <Service name="Catalina">
                    <Connector port="{http_port}" address="127.0.0.1" protocol="HTTP/1.1" connectionTimeout="20000"/>
                    <Engine name="Catalina" defaultHost="localhost">
                      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false"/>
                    </Engine>
                  </Service>
                </Server>
                """))
        with open(os.path.join(conf, "Catalina", "localhost", "ROOT.xml"), "w", encoding="utf-8") as handle:
            handle.write(f'<Context docBase="{doc_base}"/>\n')
        os.makedirs(os.path.join(root, "webapps"))
        for name in ("work", "temp", "logs", "run"):
            owned_dir(os.path.join(root, name))
        self.pid_file = os.path.join(root, "run", "tomcat.pid")

    def environment(self):
        return {
            "CATALINA_HOME": CATALINA_HOME, "CATALINA_BASE": self.base,
            "CATALINA_PID": self.pid_file, "CATALINA_TMPDIR": os.path.join(self.base, "temp"),
            "JAVA_OPTS": JAVA_OPTS,
        }

    start_command = f"{CATALINA_HOME}/bin/catalina.sh start"
    stop_command = f"{CATALINA_HOME}/bin/catalina.sh stop 30 -force"

    def jvm_pid(self):
        with open(self.pid_file, encoding="utf-8") as handle:
            return int(handle.read().strip())

    def shutdown(self):
        """Stop the JVM the handler left running (as the app user, like the handler)."""
        if os.path.exists(self.pid_file):
            subprocess.run(["/bin/sh", "-c", self.stop_command], env=dict(self.environment(), PATH=os.environ["PATH"]),
                           capture_output=True, timeout=60, check=False, cwd="/", **as_app_user())
