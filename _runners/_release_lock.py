"""
Master side: the per project+env deploy lock of one master (the default
store); with a PostgreSQL store both masters share ``SessionLocks`` instead
(in ``_release_store.py``), which offers the same methods as ``FileLocks``.

The lock is a file created atomically (``O_CREAT|O_EXCL``) under
``<state_dir>/locks``; it records its owner (user, host, pid, jid, start,
reason) and a random token. A deploy releases only a lock that carries its own
token, so a deploy can never free another deploy's lock.
"""

import contextlib
import datetime
import json
import os
import socket
import time
import uuid

import release_published as published


class LockHeld(Exception):
    """The lock belongs to someone else; ``owner`` says who."""

    def __init__(self, owner):
        super().__init__(describe(owner))
        self.owner = owner


lock_path = published.lock_path  # the ext_pillar reads the same file (deploy in progress)


def new_owner(user, jid, reason):
    """The record a lock holder leaves: who, where, since when, why, and its secret token."""
    return {
        "token": uuid.uuid4().hex,
        "user": user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "jid": jid,
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "since_epoch": time.time(),
        "reason": reason,
    }


def unknown_owner():
    """A holder that left no readable record (half-written, or not written yet)."""
    return {"token": None, "user": "unknown", "since": "unknown"}


def acquire(path, user, jid, reason, wait_s=0, poll_s=0.5):
    """Take the lock or raise LockHeld; returns the owner record (with its token)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    owner = new_owner(user, jid, reason)
    deadline = time.monotonic() + float(wait_s or 0)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            holder = read(path)
            if time.monotonic() >= deadline:
                raise LockHeld(holder)
            time.sleep(poll_s)
            continue
        owner["fence"] = _next_fence(path)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
        return owner


def _next_fence(path):
    """
    A number that grows with every acquisition of this lock. Nodes remember
    the highest they have seen and refuse an older one, so a deploy that lost
    its lock (broken as stale) cannot switch nodes behind a newer deploy.
    Only the lock holder calls this, so read-increment-write does not race.
    """
    counter = f"{path}.fence"
    try:
        with open(counter, encoding="utf-8") as handle:
            fence = int(handle.read().strip() or 0) + 1
    except (OSError, ValueError):
        fence = 1
    tmp = f"{counter}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # one a dead run of this pid left
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as handle:
        handle.write(f"{fence}\n")
    os.replace(tmp, counter)
    return fence


def read(path):
    """The owner record, or None when unlocked; a half-written file reads as unknown."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return unknown_owner()


def release(path, token):
    """Remove the lock if it still carries ``token``; True when it did."""
    holder = read(path)
    if not holder or holder.get("token") != token:
        return False
    os.unlink(path)
    return True


def remove(path):
    """Break the lock whoever holds it; returns the record that was there."""
    holder = read(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return holder


def holder_alive(owner, ttl_s):
    """
    Whether the lock's holder may still be running. On this host the answer
    is the holder's pid alone (it must exist and be a salt process), whatever
    the lock's age: a long deploy is still a deploy. Only a holder on another
    host, whose pid cannot be checked, is taken as dead once the lock is older
    than ``ttl_s``.
    """
    if not owner or owner.get("token") is None:
        return False
    if owner.get("host") != socket.gethostname():
        return time.time() - float(owner.get("since_epoch") or 0) <= ttl_s
    try:
        with open(f"/proc/{int(owner.get('pid'))}/cmdline", "rb") as handle:
            return b"salt" in handle.read()
    except (OSError, TypeError, ValueError):
        return False


def describe(owner):
    if not owner:
        return "not locked"
    return (
        f"locked by {owner.get('user')} on {owner.get('host')} (pid {owner.get('pid')}, "
        f"jid {owner.get('jid')}) since {owner.get('since')}: {owner.get('reason')}"
    )


class FileLocks:
    """The lock files of one master's state_dir, behind the interface the runner uses for any store."""

    def __init__(self, state_dir):
        self.state_dir = state_dir

    def acquire(self, project, env, user, jid, reason, wait_s=0):
        return acquire(lock_path(self.state_dir, project, env), user, jid, reason, wait_s)

    def release(self, project, env, token):
        return release(lock_path(self.state_dir, project, env), token)

    def read(self, project, env):
        return read(lock_path(self.state_dir, project, env))

    def remove(self, project, env):
        return remove(lock_path(self.state_dir, project, env))

    def holder_alive(self, project, env, owner, ttl_s):
        return holder_alive(owner, ttl_s)
