"""
Master side: each run's build folder under ``<state_dir>/builds``, and the
removal of those that dead runs left behind.

A run makes its own folder (the exported tree and the tarball until it is
staged live in it) and holds an exclusive ``flock(2)`` on it for as long as it
lives. The kernel drops that lock when the process ends, however it ends, a
``kill -9`` included; so before a run makes its folder it removes every one
whose lock it can take: those of dead runs. The folder of a run still going
(another project's or environment's deploy, now) is locked and left alone.
"""

import contextlib
import fcntl
import os
import shutil
import time
import uuid

# A folder younger than this may be one a live run has made but not locked yet.
GRACE_S = 60


class Build:
    """This run's build folder, locked until :meth:`remove`."""

    def __init__(self, builds_dir):
        os.makedirs(builds_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(builds_dir, uuid.uuid4().hex)
        os.mkdir(self.path, 0o700)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with it
            self._fd = None


def sweep(builds_dir):
    """Remove what dead runs left in ``builds_dir``; returns the names removed."""
    try:
        names = sorted(os.listdir(builds_dir))
    except FileNotFoundError:
        return []
    return [name for name in names if _remove_if_dead(os.path.join(builds_dir, name))]


def _remove_if_dead(path):
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if time.time() - info.st_mtime < GRACE_S:
        return False
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)  # a loose tarball or link: no live run keeps one here
        return True
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # its run is alive
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return True
