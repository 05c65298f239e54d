"""
The read-only commands: ``status`` (asked of the nodes now), ``history`` and
``stats`` (from the store) and ``report`` (one HTML page of both). Nothing
here takes the lock or changes a node.
"""

import datetime
import json

import _release_fleet as fleet
import _release_node_state as node_state
import _release_report as report_page
import _release_rollout as rollout
import _release_run as runs
import _release_stats as stats_lib
import release_safe_fs as safe_fs


def status(loader, project, env, kwargs):
    """Each node's releases, from its own ``release.list``; nodes out of step are flagged."""
    run = runs.begin(loader, project, env, "status", None, "cli", kwargs, record=False)
    try:
        if run.error:
            raise runs.DeployError(run.error)
        run.waves = rollout.plan_waves(run.opts, run.environment)
    except (runs.DeployError, fleet.FleetError, KeyError, ValueError) as exc:
        return {"result": False, "error": str(exc), "retcode": 1}
    listed = fleet.run_on(run.opts, run.minions, "release.list", arg=[project], timeout_s=run.config["timeout_s"])
    found = node_state.status(listed)
    ok = all(answered for answered, _ in listed.values())
    return dict(found, result=ok, project=project, env=env, retcode=0 if ok else 1)


def history(opts, project, env, limit, phases):
    conf = runs.master_settings(opts)
    records = runs.records(conf)
    rows = [_readable(row) for row in records.runs(project, env, limit)]
    if not rows and runs.unknown_target(conf, project, env):
        return _unknown(conf, project, env)
    if phases:
        for row in rows:
            row["phases"] = records.phases(row["id"])
    return {"result": True, "project": project, "env": env, "runs": rows, "retcode": 0}


def stats(opts, project, env, days):
    conf = runs.master_settings(opts)
    records = runs.records(conf)
    if runs.unknown_target(conf, project, env) and not records.runs(project, env, 1):
        return _unknown(conf, project, env)
    figures = stats_lib.summarize(recent_runs(records, project, env, days))
    return dict(figures, result=True, project=project, env=env, days=days, retcode=0)


def _unknown(conf, project, env):
    """A project or environment that is neither configured nor on record: said, with a failing exit code."""
    problem = runs.unknown_target(conf, project, env)
    return {"result": False, "error": f"{problem}, and no run of it is on record", "retcode": 1}


def report(opts, project, out, env, days):
    """Write the HTML report to ``out`` (atomically)."""
    conf = runs.master_settings(opts)
    records = runs.records(conf)
    rows = recent_runs(records, project, env, days)
    last = next((r for r in rows if r["kind"] in ("deploy", "rollback") and records.phases(r["id"])), None)
    page = report_page.render(
        project, rows, last, records.phases(last["id"]) if last else [],
        _spread(opts, conf, project, env), stats_lib.summarize(rows),
    )
    try:
        safe_fs.write_atomically(out, page)
    except OSError as exc:
        return {"result": False, "error": f"cannot write the report {out}: {exc.strerror}", "retcode": 1}
    return {"result": True, "project": project, "out": out, "runs": len(rows), "retcode": 0}


def recent_runs(records, project, env, days):
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=float(days))
    return records.runs(project, env, limit=100000, since=since.isoformat(timespec="milliseconds"))


def _spread(opts, conf, project, env):
    """``{env: {minion: current release}}`` for the project's environments that have nodes."""
    config = conf["projects"].get(project) or {"environments": {}, "timeout_s": conf["timeout_s"]}
    spread = {}
    for name in [env] if env else sorted(config["environments"]):
        try:
            minions = [m for w in rollout.plan_waves(opts, config["environments"][name]) for m in w.minions]
        except (fleet.FleetError, KeyError, ValueError):
            continue
        outcomes = fleet.run_on(opts, minions, "release.current", arg=[project], timeout_s=config["timeout_s"])
        spread[name] = {m: value if ok else None for m, (ok, value) in outcomes.items()}
    return spread


def _readable(row):
    row = dict(row)
    row["details"] = json.loads(row["details"]) if row.get("details") else None
    return row
