"""The run machinery (_runners/_release_run.py): return, history, progress and events, no daemons."""

import datetime
import json
import os

import pytest

import _release_run as runs
import _release_store as store
import release_published as published

PROJECT = {"repo": "/git/app", "environments": {"pro": {"target": "web*"}}}


@pytest.fixture
def run(tmp_path, monkeypatch):
    fired, said = [], []
    monkeypatch.setattr(runs, "fire_event", lambda opts, tag, data: fired.append((tag, data)))
    opts = {"cachedir": str(tmp_path), "file_roots": {"base": [str(tmp_path / "srv")]},
            "release": {"projects": {"app": PROJECT}}}
    started = runs.begin({"opts": opts, "progress": said.append}, "app", "pro", "v1", "alice", "cli",
                         {"__pub_jid": "20261127"})
    started.fired, started.said = fired, said
    return started


def test_begin_reads_the_normalised_settings(run, tmp_path):
    assert run.state_dir == str(tmp_path / "release") and run.jid == "20261127" and run.error is None
    assert run.environment["waves"][0]["target"] == "web*" and run.config["timeout_s"] == 60
    assert run.records.runs("app", "pro", 5)[0]["who"] == "alice"


@pytest.mark.parametrize(("project", "env", "error"), [
    ("nope", "pro", "unknown project 'nope'"), ("app", "qa", "project app has no environment 'qa' (known: pro)")])
def test_begin_names_what_the_settings_lack(tmp_path, project, env, error):
    opts = {"cachedir": str(tmp_path), "file_roots": {"base": ["/srv"]}, "release": {"projects": {"app": PROJECT}}}
    run = runs.begin({"opts": opts}, project, env, "v1", "bob", "cli", {}, record=False)
    assert run.error.startswith(error) and run.failed_step == "configure"


def test_the_reporter_keeps_nodes_writes_phases_and_fires_conductor_events(run):
    run.previous, run.name = {"web1": "r_old"}, "r_new"
    report = runs.reporter(run)
    report("web1", "install", True, 1.5, None, "r_new")
    report("web1", "drain", True, 0.25, None, "r_new")
    report("web1", "activate", True, 0.25, None, "r_new")
    report("web2", "install", False, None, "no answer from web2", "r_new")
    assert run.nodes["web1"] == {"result": True, "release": "r_new", "previous": "r_old", "error": None,
                                 "phase": "activate", "duration_s": 2.0}
    assert run.nodes["web2"]["result"] is False and run.nodes["web2"]["error"] == "no answer from web2"
    phases = [(p["minion"], p["phase"], bool(p["result"])) for p in run.records.phases(run.record_id)]
    assert phases == [("web1", "install", True), ("web1", "drain", True), ("web1", "activate", True),
                      ("web2", "install", False)]
    assert [tag for tag, _ in run.fired] == ["release/app/pro/web1/drain", "release/app/pro/web2/install"]


def test_a_phase_is_recorded_with_the_time_it_started(run):
    before = store.now()
    runs.reporter(run)("web1", "install", True, 30.0, None, "r_new")
    phase = run.records.phases(run.record_id)[0]
    started = datetime.datetime.fromisoformat(phase["started_at"])
    assert (datetime.datetime.fromisoformat(before) - started).total_seconds() >= 29.9, phase


def test_a_rollback_phase_marks_the_node_failed(run):
    runs.reporter(run)("web1", "rollback", True, 0.1, None, "r_old")
    assert run.nodes["web1"]["result"] is False and run.nodes["web1"]["rolled_back"] is True


def test_conclude_after_a_good_run_publishes_and_closes_the_history(run):
    run.name, run.commit, run.sha256, run.source_url = "r_new", "c" * 40, "d" * 64, "salt://releases/app/r_new.tar.gz"
    run.nodes = {"web1": {"result": True}}
    ret = runs.conclude(run)
    assert ret["result"] is True and ret["retcode"] == 0 and ret["release"] == "r_new" and "error" not in ret
    assert published.published_releases(run.state_dir, "app")["pro"]["release"] == "r_new"
    row = run.records.runs("app", "pro", 1)[0]
    assert row["result"] == 1 and row["release"] == "r_new"
    assert run.fired[-1][0] == "release/app/pro/finish" and "output" not in run.fired[-1][1]
    assert run.said[-1].startswith("DONE: r_new")


def test_conclude_after_a_failed_step_says_which_and_publishes_nothing(run):
    run.error, run.failed_step, run.sha256 = "build failed", "build", "d" * 64
    ret = runs.conclude(run)
    assert (ret["result"], ret["retcode"], ret["failed_step"], ret["error"]) == (False, 1, "build", "build failed")
    assert published.published_releases(run.state_dir, "app") == {}
    details = json.loads(run.records.runs("app", "pro", 1)[0]["details"])
    assert details["failed_step"] == "build" and run.said[-1] == "FAILED: v1 build failed"


def test_a_dry_run_publishes_nothing(run):
    run.kind, run.name, run.sha256, run.source_url = "plan", "r_new", "d" * 64, "salt://releases/app/r_new.tar.gz"
    run.nodes = {"web1": {"result": True, "files": {}}}
    assert runs.conclude(run)["result"] is True
    assert published.published_releases(run.state_dir, "app") == {}


def test_a_run_with_no_node_is_not_a_success(run):
    ret = runs.run_return(run)
    assert ret["result"] is False and ret["error"] == "no node was deployed"


def test_step_names_the_failed_step(run):
    def build(_):
        raise runs.DeployError("make failed")

    with pytest.raises(runs.DeployError):
        runs.run_steps(run, (build,))
    assert run.failed_step == "build"


def test_the_lock_is_held_and_released(run):
    with runs.Locked(run, "deploy", 0):
        other = runs.begin({"opts": run.opts}, "app", "pro", "v2", "bob", "cli", {})
        with pytest.raises(runs.DeployError, match="locked"), runs.Locked(other, "deploy", 0):
            pass
        assert other.failed_step == "lock"
    assert run.records.locks().read("app", "pro") is None
    assert os.path.isdir(run.state_dir) and store.now()
