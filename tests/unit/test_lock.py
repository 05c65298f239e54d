"""The project+env lock: atomic, says who holds it, released only by its owner."""

import _release_lock as locking
import pytest


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
