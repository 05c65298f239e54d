"""
The PostgreSQL store on a real server: the same records as SQLite, and the
shared deploy lock (row + session advisory lock) that dies with its holder.
"""

import os
import signal
import subprocess
import sys
import time

import psycopg2
import pytest

import _release_lock as locking
import _release_store as store
from tests.integration.postgres import postgres_cluster

RUNNERS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "_runners")


@pytest.fixture(scope="module")
def pg_url():
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path, pg_url):
    if request.param == "sqlite":
        return store.Store(str(tmp_path))
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cursor:  # a clean slate per test
        cursor.execute("DROP TABLE IF EXISTS phases, bad_releases, runs, locks")
    return store.Store(str(tmp_path), pg_url)


def test_both_stores_keep_the_same_records(db):
    run_id = db.start_run("deploy", "rainbow", "pro", "cli", "alice", "j1", "v1")
    db.update_run(run_id, release="r1", details={"journal": {"targets": {"web1": "r1"}}})
    db.node_phase(run_id, "web1", "activate", store.now(), 0.5, True)
    assert db.runs("rainbow", "pro")[0]["result"] is None
    db.finish_run(run_id, False, 1.5, "boom")
    db.mark_bad("rainbow", "pro", ["r1"], run_id)
    [row] = db.runs("rainbow", "pro", kinds=["deploy"])
    assert (row["id"], row["release"], row["result"], row["error"]) == (run_id, "r1", 0, "boom")
    assert [(p["minion"], p["phase"], p["result"]) for p in db.phases(run_id)] == [("web1", "activate", 1)]
    assert db.bad_releases("rainbow", "pro") == {"r1": None}
    db.clear_bad("rainbow", "pro", "r1")
    assert db.bad_releases("rainbow", "pro") == {}


def test_a_second_store_on_the_same_database_sees_the_records(tmp_path, pg_url):
    first = store.Store(str(tmp_path / "a"), pg_url)
    run_id = first.record("unlock", "shared", "pro", result=True, who="ops")
    assert store.Store(str(tmp_path / "b"), pg_url).runs("shared")[0]["id"] == run_id


def test_pg_lock_is_shared_fenced_and_released_only_by_its_token(tmp_path, pg_url):
    master_a = store.Store(str(tmp_path / "a"), pg_url).locks()
    master_b = store.Store(str(tmp_path / "b"), pg_url).locks()
    owner = master_a.acquire("rainbow", "pro", "alice", "j1", "deploy v1")
    with pytest.raises(locking.LockHeld) as caught:
        master_b.acquire("rainbow", "pro", "bob", "j2", "deploy v2")
    assert "locked by alice" in str(caught.value)
    assert master_b.holder_alive("rainbow", "pro", caught.value.owner, 0)
    assert master_b.release("rainbow", "pro", owner["token"]) is False  # not its session
    assert master_a.release("rainbow", "pro", owner["token"]) is True
    assert master_b.read("rainbow", "pro") is None
    again = master_b.acquire("rainbow", "pro", "bob", "j3", "deploy v2")
    assert again["fence"] > owner["fence"] and "took_over" not in again
    master_b.release("rainbow", "pro", again["token"])


HOLDER = """
import sys, time
sys.path[:0] = [{runners!r}, {runners!r}.replace("_runners", "_utils")]  # as Salt's loader does
import _release_store as store
locks = store.Store({state!r}, {url!r}).locks()  # kept: its session holds the lock
locks.acquire("rainbow", "dead", "carol", "j9", "deploy v9")
print("held", flush=True)
time.sleep(300)
"""


def test_a_holder_killed_with_sigkill_loses_the_lock(tmp_path, pg_url):
    code = HOLDER.format(runners=RUNNERS, state=str(tmp_path / "c"), url=pg_url)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        locks = store.Store(str(tmp_path / "d"), pg_url).locks()
        with pytest.raises(locking.LockHeld):
            locks.acquire("rainbow", "dead", "dave", "j10", "deploy")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10  # the server notices the closed connection at once, give it slack
    while locks.holder_alive("rainbow", "dead", None, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    owner = locks.acquire("rainbow", "dead", "dave", "j10", "deploy")
    assert owner["took_over"]["user"] == "carol"  # the dead holder's row, reported
    locks.release("rainbow", "dead", owner["token"])


def test_a_bad_store_setting_is_refused_without_its_password(tmp_path):
    with pytest.raises(ValueError) as caught:
        store.Store(str(tmp_path), "mysql://root:hunter2@db/release")
    assert "hunter2" not in str(caught.value)
    assert store.safe_url("postgresql://u:hunter2@db:5432/x") == "postgresql://db:5432/x"


def test_the_fleet_pillar_sees_a_deploy_holding_the_pg_lock_from_another_master(tmp_path, pg_url, monkeypatch):
    """Hostile: the ext_pillar read only the file lock, so highstate ran during a deploy with store: postgres."""
    from tests.unit.loader import load  # pylint: disable=import-outside-toplevel
    from tests.unit.test_release_pillar import GlobMinions, publish  # pylint: disable=import-outside-toplevel

    state_dir = str(tmp_path / "b")
    opts = {"cachedir": str(tmp_path), "file_roots": {"base": [str(tmp_path / "srv")]},
            "release": {"state_dir": state_dir, "store": pg_url, "projects": {
        "rainbow": {"repo": "r", "environments": {"test": {"target": "web1"}}}}}}
    pillar = load("_pillar/release_fleet.py", "release_fleet_pillar_pg", opts=opts)
    monkeypatch.setattr(pillar.salt.utils.minions, "CkMinions", GlobMinions)
    publish(state_dir, "test", "r_test_2")
    other_master = store.Store(str(tmp_path / "a"), pg_url).locks()
    owner = other_master.acquire("rainbow", "test", "alice", "j1", "deploy v2")
    try:
        entry = pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]
        assert entry["locked"] is True and entry["fence"] == owner["fence"], entry
    finally:
        other_master.release("rainbow", "test", owner["token"])
    assert "locked" not in pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]
    assert not os.path.exists(os.path.join(state_dir, "locks")), "the file lock played no part"
