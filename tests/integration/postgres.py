"""
A throwaway PostgreSQL cluster for tests: Debian's server binaries, run as
the ``postgres`` user from a temp dir on a free loopback port (never the
system service), removed afterwards.
"""

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile

from pytestshellutils.utils.ports import get_unused_localhost_port


def _bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install -y postgresql")
    return found[-1]


def _as_postgres(*argv):
    subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def postgres_cluster(database="release"):
    """Start a cluster; yields its URL (``postgresql://postgres@127.0.0.1:<port>/<database>``)."""
    root = tempfile.mkdtemp(prefix="sr-pg-", dir="/tmp")
    shutil.chown(root, "postgres")
    data, port = os.path.join(root, "data"), get_unused_localhost_port()
    _as_postgres(_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    _as_postgres(_bin("pg_ctl"), "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "start")
    try:
        _as_postgres(_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        _as_postgres(_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
