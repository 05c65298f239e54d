"""
Build folders (_runners/_release_builds.py) with real processes: the folder
of a killed run is removed by the next sweep, a live run's is not.
"""

import os
import signal
import subprocess
import sys
import time

import _release_builds as builds
from tests.unit.loader import REPO_ROOT

HOLDER = """
import sys, time
import _release_builds as builds
build = builds.Build(sys.argv[1])
open(build.path + "/big", "wb").write(b"x" * 4096)
print(build.path, flush=True)
time.sleep(600)
"""


def start_run(builds_dir):
    """A real process holding a build folder, as a runner does; returns (process, folder)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO_ROOT, "_runners"))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, builds_dir], stdout=subprocess.PIPE, text=True, env=env)
    folder = proc.stdout.readline().strip()
    old = time.time() - builds.GRACE_S - 5
    os.utime(folder, (old, old))  # past the grace period a new folder gets before its lock
    return proc, folder


def test_a_killed_runs_build_is_removed_and_a_live_ones_is_kept(tmp_path):
    builds_dir = str(tmp_path / "builds")
    dead, dead_folder = start_run(builds_dir)
    live, live_folder = start_run(builds_dir)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert os.path.isdir(dead_folder)  # what a killed runner leaves behind
        removed = builds.sweep(builds_dir)
        assert removed == [os.path.basename(dead_folder)] and not os.path.exists(dead_folder)
        assert os.path.isfile(os.path.join(live_folder, "big"))  # another run, still going
    finally:
        live.kill()
        live.wait()
    assert builds.sweep(builds_dir) == [os.path.basename(live_folder)]


def test_a_new_build_is_left_alone_for_its_grace_period(tmp_path):
    builds_dir = str(tmp_path / "builds")
    os.makedirs(os.path.join(builds_dir, "just-made"))
    assert builds.sweep(builds_dir) == []


def test_a_runs_own_build_goes_when_it_ends(tmp_path):
    build = builds.Build(str(tmp_path / "builds"))
    os.mkdir(os.path.join(build.path, "tree"))
    build.remove()
    assert os.listdir(tmp_path / "builds") == []
