"""history and stats (_runners/_release_queries.py) over a real sqlite store: unknown names are errors."""

import pytest

import _release_queries as queries
import _release_run as runs

PROJECT = {"repo": "/git/app", "environments": {"pro": {"target": "web*"}}}


@pytest.fixture
def opts(tmp_path):
    return {"cachedir": str(tmp_path), "file_roots": {"base": [str(tmp_path / "srv")]},
            "release": {"projects": {"app": PROJECT}}}


@pytest.mark.parametrize(("project", "env", "error"), [
    ("nosuch", None, "unknown project 'nosuch'"),
    ("app", "qa", "project app has no environment 'qa' (known: pro)"),
])
@pytest.mark.parametrize("query", ["history", "stats"])
def test_an_unknown_project_or_environment_is_an_error(opts, query, project, env, error):
    if query == "history":
        ret = queries.history(opts, project, env, 20, False)
    else:
        ret = queries.stats(opts, project, env, 30)
    assert ret["result"] is False and ret["retcode"] == 1, ret
    assert ret["error"].startswith(error) and "no run of it is on record" in ret["error"], ret


def test_a_known_project_without_runs_has_an_empty_history(opts):
    ret = queries.history(opts, "app", None, 20, False)
    assert (ret["result"], ret["retcode"], ret["runs"]) == (True, 0, [])


def test_a_project_no_longer_configured_keeps_its_history(opts):
    runs.records(runs.master_settings(opts)).record("deploy", "old", "pro", result=True)
    ret = queries.history(opts, "old", None, 20, False)
    assert ret["result"] is True and [r["kind"] for r in ret["runs"]] == ["deploy"], ret


def test_stats_count_recoveries_and_leave_dry_runs_out(opts):
    records = runs.records(runs.master_settings(opts))
    records.record("deploy", "app", "pro", result=False)
    records.record("plan", "app", "pro", result=True)
    records.record("deploy", "app", "pro", result=True)
    ret = queries.stats(opts, "app", "pro", 30)
    assert (ret["deploys"], ret["failures"], ret["recoveries"]) == (2, 1, 1), ret
    assert ret["mttr_s"] is not None
