"""
The Prometheus exposition (_runners/_release_metrics.py), parsed with
prometheus_client's own text parser: counters from the store, the duration
histogram, MTTR as release.stats computes it, the lock, each node's reported
release; names only, never an error text; the file written atomically or
not at all.
"""

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

import _release_metrics as metrics
import _release_stats as stats_lib
import _release_store as store
import release_settings as settings

SECRET = "db_password=hunter2-do-not-leak"


def conf_for(state_dir, metrics_file=None, envs=("test", "pro")):
    opts = {"cachedir": "/tmp", "release": {
        "state_dir": state_dir, "artifact_root": "/srv/salt/releases", "metrics_file": metrics_file,
        "projects": {"rainbow": {"repo": "/git/rainbow", "environments": {e: {"target": "web*"} for e in envs}}},
    }}
    return settings.master(opts)


def run(db, kind, env, result, duration_s, nodes=None, error=None, **details):
    run_id = db.start_run(kind, "rainbow", env, "cli", "alice", "j", "v1")
    if result is not None:
        db.finish_run(run_id, result, duration_s, error, dict(details, nodes=nodes or {}))
    return run_id


def node(release, **extra):
    return dict(result=True, release=release, **extra)


@pytest.fixture
def db(tmp_path):
    return store.Store(str(tmp_path / "state"))


@pytest.fixture
def history(db):
    """test: 3 good deploys, 2 failed (one sent its switched nodes back), 1 normal and 2 emergency rollbacks."""
    web = {"web1": node("r1"), "web2": node("r1")}
    run(db, "deploy", "test", True, 4.0, web)
    run(db, "deploy", "test", False, 12.5, {"web1": node("r1", rolled_back=True)}, error=SECRET)
    run(db, "rollback", "test", True, 1.0, web, emergency=False)
    run(db, "deploy", "test", False, 40.0, error=SECRET)
    run(db, "rollback", "test", True, 0.5, web, emergency=True)
    run(db, "rollback", "test", False, 0.1, error=SECRET, emergency=True, failed_step="lock")
    run(db, "deploy", "test", True, 75.0, {"web1": node("r2"), "web2": node("r2")})
    run(db, "deploy", "test", True, 700.0, {"web1": node("r3"), "web2": node(None)})
    run(db, "deploy", "test", None, None)  # still going (or its runner died)
    db.record("unlock", "rainbow", "test", result=True, who="ops")
    return db


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family, sample_name=None, **labels):
    found = [s.value for s in family.samples if sample_name in (None, s.name)
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, family.samples)
    return found[0]


def test_counters_come_from_the_store_as_release_stats_counts_them(history, tmp_path):
    parsed = families(metrics.exposition(conf_for(str(tmp_path / "state")), history))
    figures = stats_lib.summarize(history.runs("rainbow", "test", limit=1000))
    assert parsed["salt_release_deploys"].type == "counter"
    assert value(parsed["salt_release_deploys"], env="test") == figures["deploys"] == 6
    assert value(parsed["salt_release_deploy_failures"], env="test") == figures["failures"] == 2
    rollbacks = parsed["salt_release_rollbacks"]
    assert {kind: value(rollbacks, env="test", kind=kind) for kind in ("normal", "emergency", "auto")} == {
        "normal": 1, "emergency": 2, "auto": 1}
    # An environment with no history is there, at zero: a rate() over it is 0, not "no data".
    assert value(parsed["salt_release_deploys"], env="pro") == 0
    assert value(rollbacks, env="pro", kind="emergency") == 0


def test_a_fresh_reader_of_the_same_store_writes_the_same_text(history, tmp_path):
    state = str(tmp_path / "state")
    assert metrics.exposition(conf_for(state), history) == metrics.exposition(conf_for(state), store.Store(state))


def test_the_duration_histogram_is_cumulative_over_finished_deploys(history, tmp_path):
    parsed = families(metrics.exposition(conf_for(str(tmp_path / "state")), history))
    hist = parsed["salt_release_deploy_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples
               if s.name.endswith("_bucket") and s.labels["env"] == "test"}
    assert buckets["5"] == 1 and buckets["30"] == 2 and buckets["60"] == 3 and buckets["120"] == 4
    assert buckets["600"] == 4 and buckets["1800"] == 5 and buckets["+Inf"] == 5
    assert value(hist, "salt_release_deploy_duration_seconds_count", env="test") == 5
    assert value(hist, "salt_release_deploy_duration_seconds_sum", env="test") == pytest.approx(831.5)


def test_mttr_is_release_stats_figure(history, tmp_path):
    parsed = families(metrics.exposition(conf_for(str(tmp_path / "state")), history))
    mttr = stats_lib.summarize(history.runs("rainbow", "test", limit=1000))["mttr_s"]
    assert mttr is not None
    assert value(parsed["salt_release_mttr_seconds"], env="test") == pytest.approx(mttr)
    # No recovery on record in pro: no sample rather than a made-up 0.
    assert [s for s in parsed["salt_release_mttr_seconds"].samples if s.labels["env"] == "pro"] == []


def test_lock_held_follows_the_lock(history, tmp_path):
    conf = conf_for(str(tmp_path / "state"))
    owner = history.locks().acquire("rainbow", "pro", "alice", "j1", "deploy v1")
    parsed = families(metrics.exposition(conf, history))
    assert value(parsed["salt_release_lock_held"], env="pro") == 1
    assert value(parsed["salt_release_lock_held"], env="test") == 0
    history.locks().release("rainbow", "pro", owner["token"])
    assert value(families(metrics.exposition(conf, history))["salt_release_lock_held"], env="pro") == 0


def test_each_node_shows_the_release_it_last_reported(history, tmp_path):
    parsed = families(metrics.exposition(conf_for(str(tmp_path / "state")), history))
    nodes = {(s.labels["minion"], s.labels["release"]) for s in parsed["salt_release_node_release_info"].samples}
    # web2's newest report is unknown (a read-back that failed): left out, not an older, stale release.
    assert nodes == {("web1", "r3")}
    assert {s.labels["release"] for s in parsed["salt_release_env_release_info"].samples} == {"r3"}
    assert all(s.value == 1 for s in parsed["salt_release_node_release_info"].samples)


def test_a_split_environment_shows_each_release(db, tmp_path):
    run(db, "deploy", "test", False, 3.0, {"web1": node("new"), "web2": node("old")})
    parsed = families(metrics.exposition(conf_for(str(tmp_path / "state")), db))
    assert {s.labels["release"] for s in parsed["salt_release_env_release_info"].samples} == {"new", "old"}


def test_label_values_are_escaped(db, tmp_path):
    odd = 'r"1\\x\nnext'
    run(db, "deploy", "test", True, 3.0, {"web1": node(odd)})
    parsed = families(metrics.exposition(conf_for(str(tmp_path / "state")), db))
    assert value(parsed["salt_release_node_release_info"], minion="web1", release=odd) == 1


def test_no_error_text_and_only_exported_names(history, tmp_path):
    text = metrics.exposition(conf_for(str(tmp_path / "state")), history)
    assert SECRET not in text and "hunter2" not in text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names <= metrics.exported_names()
    assert {"salt_release_deploys_total", "salt_release_deploy_duration_seconds_bucket"} <= names


def test_publish_writes_nothing_without_the_setting(history, tmp_path):
    metrics.publish(conf_for(str(tmp_path / "state")), history)
    assert [p for p in tmp_path.rglob("*.prom")] == []


def test_publish_replaces_the_file_atomically(history, tmp_path):
    out = tmp_path / "textfile" / "salt_release.prom"
    out.parent.mkdir()
    out.write_text("old\n")
    before = os.stat(out).st_ino
    metrics.publish(conf_for(str(tmp_path / "state"), str(out)), history)
    assert os.stat(out).st_ino != before  # a new file renamed over the old, never rewritten in place
    assert "salt_release_deploys_total" in out.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["salt_release.prom"]  # no temp left behind


def test_a_metrics_file_that_cannot_be_written_never_fails_the_run(history, tmp_path, monkeypatch):
    warned = []
    monkeypatch.setattr(metrics.log, "warning", lambda message, *args: warned.append(message % args))
    out = tmp_path / "missing-dir" / "salt_release.prom"
    metrics.publish(conf_for(str(tmp_path / "state"), str(out)), history)
    assert not out.exists() and warned and warned[0].startswith(f"cannot write the release metrics to {out}")


def test_on_demand_returns_the_text_and_writes_out(history, tmp_path):
    out = tmp_path / "now.prom"
    ret = metrics.on_demand(conf_for(str(tmp_path / "state")), history, str(out))
    assert ret["result"] and ret["retcode"] == 0 and ret["file"] == str(out)
    assert out.read_text() == ret["metrics"]
    bad = metrics.on_demand(conf_for(str(tmp_path / "state")), history, str(tmp_path / "no" / "x.prom"))
    assert bad["retcode"] == 1 and "cannot write the metrics" in bad["error"]


@pytest.mark.parametrize("path", ["relative.prom", "/var/lib/node_exporter/salt_release.txt", 5])
def test_the_setting_must_be_a_file_the_textfile_collector_reads(tmp_path, path):
    with pytest.raises(settings.SettingsError, match="release:metrics_file"):
        conf_for(str(tmp_path), path)


def test_the_setting_is_off_by_default(tmp_path):
    assert conf_for(str(tmp_path))["metrics_file"] is None
