"""
Master side: deployment metrics for Prometheus, in the text exposition
format, written to ``release:metrics_file`` for node_exporter's textfile
collector after every run (``publish``) and on demand (``release.metrics``).

Everything is read from the store, never counted in memory, so the counters
survive a master restart and agree on every master that shares a PostgreSQL
store: deploys and failures (as ``release.stats`` counts them), rollbacks by
kind, the deploy duration histogram, MTTR (``release.stats``'s, over its
default 30 days), whether the deploy lock is held, and the release each node
last reported running, per node and per environment.

Labels carry only names (project, env, minion, release, rollback kind):
never an error text, a ref as typed, or anything from pillar.
"""

import datetime
import logging

import _release_stats as stats_lib
import _release_store as store
import release_safe_fs as safe_fs

log = logging.getLogger(__name__)

PREFIX = "salt_release_"
# Seconds; a deploy of a few nodes takes tens of seconds, a large wave-by-wave one an hour.
DURATION_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1800, 3600)
MTTR_DAYS = 30  # release.stats's default window
ROLLBACK_KINDS = ("normal", "emergency", "auto")
NODE_RUN_KINDS = ("deploy", "rollback", "recover")  # runs that record what each node reported

# name (without PREFIX): (type, help). The order they are written in.
METRICS = {
    "deploys_total": ("counter", "Deploys started, as release.stats counts them."),
    "deploy_failures_total": ("counter", "Deploys that finished and failed."),
    "rollbacks_total": ("counter", "Rollbacks by kind: normal and emergency rollback runs, "
                                   "auto (failed deploys that sent switched nodes back)."),
    "deploy_duration_seconds": ("histogram", "Duration of finished deploys."),
    "mttr_seconds": ("gauge", f"Mean time to recover over the last {MTTR_DAYS} days, as release.stats computes it."),
    "lock_held": ("gauge", "1 while the deploy lock of the environment is held, else 0."),
    "node_release_info": ("gauge", "The release each node last reported running."),
    "env_release_info": ("gauge", "The releases the environment's nodes run (more than one: out of step)."),
}


def exported_names():
    """Every series name the exposition can hold (a histogram's three)."""
    names = set()
    for name, (kind, _) in METRICS.items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update(PREFIX + name + suffix for suffix in suffixes)
    return names


def publish(conf, records):
    """
    Write the metrics file after a run, when ``release:metrics_file`` is set.
    Never fails the run: a metrics file it cannot write is logged.
    """
    path = conf.get("metrics_file")
    if not path:
        return
    try:
        safe_fs.write_atomically(path, exposition(conf, records))
    except Exception as exc:  # noqa: BLE001  # the run's outcome stands whatever befalls its metrics
        log.warning("cannot write the release metrics to %s: %s", path, store.safe_url(exc))


def on_demand(conf, records, out=None):
    """``release.metrics``: the exposition, written to ``out`` or ``release:metrics_file`` when given."""
    text = exposition(conf, records)
    path = out or conf.get("metrics_file")
    if path:
        try:
            safe_fs.write_atomically(path, text)
        except OSError as exc:
            return {"result": False, "error": f"cannot write the metrics to {path}: {exc.strerror}", "retcode": 1}
    return {"result": True, "file": path, "metrics": text, "retcode": 0}


def exposition(conf, records):
    """The text exposition of every configured project and environment."""
    samples = {name: [] for name in METRICS}
    for project, config in sorted(conf["projects"].items()):
        for env in sorted(config["environments"]):
            for name, lines in env_samples(records, project, env).items():
                samples[name].extend(lines)
    out = []
    for name, (kind, help_text) in METRICS.items():
        out += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", *samples[name]]
    return "\n".join(out) + "\n"


def env_samples(records, project, env):
    """``{metric name: [sample lines]}`` of one environment, from its history rows and its lock."""
    rows = records.runs(project, env, limit=2**62)
    figures = stats_lib.summarize(rows)
    labels = {"project": project, "env": env}
    samples = {
        "deploys_total": [sample("deploys_total", labels, figures["deploys"])],
        "deploy_failures_total": [sample("deploy_failures_total", labels, figures["failures"])],
        "rollbacks_total": [sample("rollbacks_total", dict(labels, kind=kind), count)
                            for kind, count in rollback_counts(rows, figures).items()],
        "deploy_duration_seconds": histogram("deploy_duration_seconds", labels, deploy_durations(rows)),
        "mttr_seconds": [],
        "lock_held": [sample("lock_held", labels, int(records.locks().read(project, env) is not None))],
    }
    mttr = stats_lib.summarize(recent(rows, MTTR_DAYS))["mttr_s"]
    if mttr is not None:
        samples["mttr_seconds"].append(sample("mttr_seconds", labels, mttr))
    nodes = node_releases(rows)
    samples["node_release_info"] = [sample("node_release_info", dict(labels, minion=m, release=r), 1)
                                    for m, r in sorted(nodes.items())]
    samples["env_release_info"] = [sample("env_release_info", dict(labels, release=r), 1)
                                   for r in sorted(set(nodes.values()))]
    return samples


def rollback_counts(rows, figures):
    """Rollback runs, normal and emergency apart, and the deploys that rolled back by themselves."""
    rollbacks = [r for r in rows if r["kind"] == "rollback"]
    emergency = sum(1 for r in rollbacks if store.details(r).get("emergency"))
    return {"normal": len(rollbacks) - emergency, "emergency": emergency, "auto": figures["auto_rollbacks"]}


def deploy_durations(rows):
    """The durations ``release.stats`` takes its median and p95 of: every finished deploy's."""
    return [r["duration_s"] for r in rows
            if r["kind"] == "deploy" and r["result"] is not None and r["duration_s"] is not None]


def recent(rows, days):
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    return [r for r in rows if stats_lib.parse_time(r["started_at"]) >= since]


def node_releases(rows):
    """
    ``{minion: release}``: each node's release as the newest finished run
    that touched it recorded it: what the node reported (install, activate,
    rollback, or a read-back after a failure), not what the run meant to do.
    A node whose newest report is unknown is left out.
    """
    found = {}
    for row in sorted(rows, key=lambda r: r["id"], reverse=True):
        if row["kind"] not in NODE_RUN_KINDS or row["result"] is None:
            continue
        for minion, node in (store.details(row).get("nodes") or {}).items():
            found.setdefault(minion, node.get("release") if isinstance(node, dict) else None)
    return {m: release for m, release in found.items() if release}


def histogram(name, labels, values):
    """Cumulative ``_bucket`` lines (``le``, ``+Inf`` last), then ``_sum`` and ``_count``."""
    lines = [sample(f"{name}_bucket", dict(labels, le=_number(bound)), sum(1 for v in values if v <= bound))
             for bound in DURATION_BUCKETS]
    lines.append(sample(f"{name}_bucket", dict(labels, le="+Inf"), len(values)))
    lines.append(sample(f"{name}_sum", labels, round(sum(values), 3)))
    lines.append(sample(f"{name}_count", labels, len(values)))
    return lines


def sample(name, labels, value):
    """One sample line, label values escaped as the exposition format wants."""
    pairs = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels.items())
    return f"{PREFIX}{name}{{{pairs}}} {_number(value)}"


def _escape(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


