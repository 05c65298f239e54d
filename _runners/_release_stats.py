"""
Master side: deployment statistics over the history's run rows.

- deploys, failures (finished deploys that failed), rollbacks (rollback runs)
  and auto_rollbacks (failed deploys that sent switched nodes back);
- success rate: good deploys / finished deploys;
- median and 95th-percentile duration of finished deploys (nearest rank);
- MTTR: from the end of a failed deploy to the end of the next good deploy or
  rollback in the same environment; a run of failures counts once, from its
  first; ``recoveries`` is how many such recoveries the mean is over. Runs
  still going (or cut short by a crash) count only as unfinished; dry runs
  (kind ``plan``) count nowhere.
"""

import datetime
import json
import math
import statistics


def parse_time(text):
    return datetime.datetime.fromisoformat(text)


def percentile(values, fraction):
    """Nearest-rank percentile: the smallest value with at least ``fraction`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(rows):
    """The statistics of ``rows`` (history rows, any order)."""
    rows = sorted(rows, key=lambda r: r["id"])
    deploys = [r for r in rows if r["kind"] == "deploy"]
    finished = [r for r in deploys if r["result"] is not None]
    good = [r for r in finished if r["result"]]
    durations = [r["duration_s"] for r in finished if r["duration_s"] is not None]
    recoveries = recovery_times(rows)
    return {
        "deploys": len(deploys),
        "succeeded": len(good),
        "failures": len(finished) - len(good),
        "unfinished": len(deploys) - len(finished),
        "rollbacks": sum(1 for r in rows if r["kind"] == "rollback"),
        "auto_rollbacks": sum(1 for r in finished if not r["result"] and _reverted(r)),
        "success_rate": round(len(good) / len(finished), 4) if finished else None,
        "duration_median_s": round(statistics.median(durations), 3) if durations else None,
        "duration_p95_s": round(percentile(durations, 0.95), 3) if durations else None,
        "mttr_s": round(statistics.mean(recoveries), 3) if recoveries else None,
        "recoveries": len(recoveries),
    }


def recovery_times(rows):
    """Seconds from each first failed deploy to the next good release, per environment."""
    times, broken_since = [], {}
    for row in sorted(rows, key=lambda r: r["id"]):
        if row["result"] is None or row["kind"] not in ("deploy", "rollback") or not row["finished_at"]:
            continue
        env, ended = row["env"], parse_time(row["finished_at"])
        if row["kind"] == "deploy" and not row["result"]:
            broken_since.setdefault(env, ended)
        elif row["result"] and env in broken_since:
            times.append((ended - broken_since.pop(env)).total_seconds())
    return times


def _reverted(row):
    try:
        nodes = json.loads(row["details"] or "{}").get("nodes") or {}
    except ValueError:
        return False
    return any(node.get("rolled_back") for node in nodes.values())
