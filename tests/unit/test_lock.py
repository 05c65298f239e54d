"""The project+env lock: atomic, says who holds it, released only by its owner."""

import os

import pytest

import _release_lock as locking


@pytest.fixture
def path(tmp_path):
    return locking.lock_path(str(tmp_path), "rainbow", "test")


def test_acquire_records_the_owner(path):
    owner = locking.acquire(path, "alice", "2026", "deploy v1")
    held = locking.read(path)
    assert held == owner
    assert {"token", "user", "host", "pid", "jid", "since", "reason"} <= set(held)
    assert held["user"] == "alice" and held["jid"] == "2026"


def test_a_held_lock_fails_at_once_saying_who(path):
    locking.acquire(path, "alice", "111", "deploy v1")
    with pytest.raises(locking.LockHeld) as caught:
        locking.acquire(path, "bob", "222", "deploy v2")
    assert "locked by alice" in str(caught.value)
    assert "jid 111" in str(caught.value) and "deploy v1" in str(caught.value)
    assert caught.value.owner["user"] == "alice"


def test_only_the_owning_token_releases(path):
    owner = locking.acquire(path, "alice", "1", "deploy")
    assert locking.release(path, "not-the-token") is False
    assert locking.read(path)["token"] == owner["token"]
    assert locking.release(path, owner["token"]) is True
    assert locking.read(path) is None
    assert locking.release(path, owner["token"]) is False  # already free
    # Free again: someone else can take it, and the old token cannot free theirs.
    bob = locking.acquire(path, "bob", "2", "deploy")
    assert locking.release(path, owner["token"]) is False
    assert locking.read(path)["token"] == bob["token"]


def test_remove_breaks_anyones_lock_and_says_whose(path):
    locking.acquire(path, "alice", "1", "deploy")
    assert locking.remove(path)["user"] == "alice"
    assert locking.remove(path) is None


def test_a_garbled_lock_reads_as_unknown_and_still_holds(path):
    locking.acquire(path, "alice", "1", "deploy")
    with open(path, "w") as handle:
        handle.write("{half")
    assert locking.read(path)["user"] == "unknown"
    with pytest.raises(locking.LockHeld):
        locking.acquire(path, "bob", "2", "deploy")


def _salt_named_sleeper():
    """A real process whose cmdline holds 'salt', as a deploy's would."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "salt-run-holder"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until it has exec'd: cmdline is the parent's before
        with open(f"/proc/{proc.pid}/cmdline", "rb") as handle:
            if b"salt-run-holder" in handle.read():
                return proc
        time.sleep(0.01)
    raise AssertionError("holder did not start")


def test_a_live_holder_on_this_host_is_alive_whatever_its_age(path):
    holder = _salt_named_sleeper()
    try:
        owner = dict(locking.new_owner("alice", "1", "deploy"), pid=holder.pid, since_epoch=0)
        assert locking.holder_alive(owner, 0.001)
    finally:
        holder.kill()
        holder.wait()
    assert not locking.holder_alive(owner, 0.001)


def test_ttl_applies_only_to_a_holder_on_another_host():
    other = dict(locking.new_owner("bob", "2", "deploy"), host="elsewhere.invalid")
    assert locking.holder_alive(other, 3600)
    assert not locking.holder_alive(dict(other, since_epoch=0), 3600)


def test_a_live_process_holding_the_lock_past_the_ttl_is_not_broken(path):
    """A real holder past a tiny ttl: a take-over without force must leave its lock alone."""
    import time

    holder = _salt_named_sleeper()
    try:
        owner = locking.acquire(path, "alice", "1", "deploy")
        held = dict(owner, pid=holder.pid)
        with open(path, "w") as handle:
            import json

            json.dump(held, handle)
        time.sleep(0.05)
        locks = locking.FileLocks(os.path.dirname(os.path.dirname(path)))
        assert locks.holder_alive("rainbow", "test", locking.read(path), 0.01)
        with pytest.raises(locking.LockHeld):
            locking.acquire(path, "bob", "2", "deploy")
        assert locking.read(path)["token"] == owner["token"]
    finally:
        holder.kill()
        holder.wait()
