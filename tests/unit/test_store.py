"""History rows: written as a run goes, a crash leaves result NULL."""

import json

import _release_store as store


def test_a_run_and_its_phases(tmp_path):
    db = store.Store(str(tmp_path))
    run_id = db.start_run("deploy", "rainbow", "test", "cli", "alice", "j1", "v1.0.0")
    [row] = db.runs("rainbow")
    assert row["result"] is None and row["finished_at"] is None  # still running
    db.update_run(run_id, commit="abc", release="r1", ignored="x")
    db.node_phase(run_id, "web1", "install", store.now(), 0.5, True)
    db.node_phase(run_id, "web2", "install", store.now(), None, False, "disk full")
    db.finish_run(run_id, False, 1.25, "install failed", {"failed_step": "install"})
    [row] = db.runs("rainbow", "test")
    assert (row["commit"], row["release"], row["result"], row["error"]) == ("abc", "r1", 0, "install failed")
    assert row["duration_s"] == 1.25 and row["finished_at"]
    assert json.loads(row["details"]) == {"failed_step": "install"}
    phases = db.phases(run_id)
    assert [(p["minion"], p["result"], p["error"]) for p in phases] == [
        ("web1", 1, None), ("web2", 0, "disk full"),
    ]


def test_runs_filter_by_env_and_kind_newest_first(tmp_path):
    db = store.Store(str(tmp_path))
    first = db.start_run("deploy", "rainbow", "test")
    db.record("unlock", "rainbow", "test", result=True, who="ops")
    db.start_run("deploy", "rainbow", "pro")
    db.start_run("deploy", "other", "test")
    assert [r["id"] for r in db.runs("rainbow", "test")][-1] == first
    assert [r["kind"] for r in db.runs("rainbow", "test")] == ["unlock", "deploy"]
    assert [r["kind"] for r in db.runs("rainbow", kinds=["unlock"])] == ["unlock"]
    assert len(db.runs("rainbow", limit=1)) == 1
    # A second Store on the same folder sees the same history.
    assert len(store.Store(str(tmp_path)).runs("rainbow")) == 3
