"""
Master side: the release report, one self-contained HTML page (inline CSS and
SVG; no script, no external asset; a Content-Security-Policy forbids loading
anything) with

- the deploy timeline: every run as a mark coloured by its result;
- the last deploy's (or rollback's) phases per node as a Gantt chart;
- the release spread: how many nodes run which release, per environment;
- the statistics.
"""

import datetime
import html
import json

import _release_stats as stats_lib

WIDTH = 960
LEFT = 150  # room for the row labels
PHASE_COLOURS = {
    "install": "#8da0cb", "drain": "#b3b3b3", "activate": "#1b9e77", "reload": "#66a61e",
    "verify": "#7570b3", "undrain": "#a6a6a6", "rollback": "#d95f02", "prune": "#e6ab02",
}
SPREAD_COLOURS = ("#1b9e77", "#7570b3", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
CSS = """
body { font: 14px/1.4 sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 10px; text-align: left; }
svg text { font: 11px sans-serif; fill: #333; }
.ok { fill: #1b9e77; } .failed { fill: #d7301f; } .running { fill: #999; }
.rollback.ok { fill: #fdae61; } .axis { stroke: #999; stroke-width: 1; }
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'"


def render(project, rows, last_run, phases, spread, stats, generated_at=None):
    """
    The page. ``rows``: history rows; ``last_run`` and ``phases``: the run and
    its phase rows for the Gantt chart; ``spread``: ``{env: {minion: release}}``
    (None for a node that did not answer); ``stats``: ``_release_stats.summarize``.
    """
    generated_at = generated_at or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>Releases of {_e(project)}</title><style>{CSS}</style></head><body>",
        f"<h1>Releases of {_e(project)}</h1><p>Generated {_e(generated_at)}.</p>",
        "<h2>Statistics</h2>", stats_table(stats),
        "<h2>Deploy timeline</h2>", timeline(rows),
        "<h2>Last run, per node</h2>", gantt(last_run, phases),
        "<h2>Release spread</h2>", spread_chart(spread),
        "</body></html>",
    ]
    return "\n".join(parts)


def stats_table(stats):
    labels = {
        "deploys": "Deploys", "succeeded": "Succeeded", "failures": "Failed", "unfinished": "Unfinished",
        "rollbacks": "Rollbacks", "auto_rollbacks": "Automatic rollbacks", "success_rate": "Success rate",
        "duration_median_s": "Median duration (s)", "duration_p95_s": "95th percentile duration (s)",
        "mttr_s": "Mean time to recover (s)",
    }
    body = "".join(
        f'<tr><th>{label}</th><td data-stat="{key}">{_e(_show(key, stats.get(key)))}</td></tr>'
        for key, label in labels.items()
    )
    return f'<table id="stats">{body}</table>'


def timeline(rows):
    """One mark per run on a time axis; deploys on the upper lane, other runs below."""
    rows = sorted((r for r in rows if r.get("started_at")), key=lambda r: r["id"])
    if not rows:
        return '<p id="timeline">No runs recorded.</p>'
    times = [stats_lib.parse_time(r["started_at"]) for r in rows]
    start, span = times[0], max((times[-1] - times[0]).total_seconds(), 1.0)
    lanes = {"deploy": 30, "rollback": 70}
    marks = []
    for row, when in zip(rows, times, strict=True):
        x = LEFT + (WIDTH - LEFT - 20) * (when - start).total_seconds() / span
        y = lanes.get(row["kind"], 110)
        result = "running" if row["result"] is None else ("ok" if row["result"] else "failed")
        tip = f"#{row['id']} {row['kind']} {result} {row['started_at']} {row.get('release') or row.get('ref') or ''}"
        if row.get("error"):
            tip += f": {row['error']}"
        marks.append(
            f'<circle class="run {_e(row["kind"])} {result}" data-run="{row["id"]}" cx="{x:.1f}" cy="{y}" r="6">'
            f"<title>{_e(tip)}</title></circle>"
        )
    labels = "".join(
        f'<text x="10" y="{y + 4}">{name}</text><line class="axis" x1="{LEFT}" y1="{y}" x2="{WIDTH - 10}" y2="{y}"/>'
        for name, y in (("deploys", 30), ("rollbacks", 70), ("other", 110))
    )
    ends = (f'<text x="{LEFT}" y="140">{_e(rows[0]["started_at"])}</text>'
            f'<text x="{WIDTH - 10}" y="140" text-anchor="end">{_e(rows[-1]["started_at"])}</text>')
    return f'<svg id="timeline" width="{WIDTH}" height="150" role="img">{labels}{"".join(marks)}{ends}</svg>'


def gantt(run, phases):
    """The run's node phases as bars on a shared time axis (a phase row is written when it ends)."""
    if not run or not phases:
        return '<p id="gantt">No node phases recorded yet.</p>'
    spans = []
    for phase in phases:
        end = stats_lib.parse_time(phase["started_at"])
        duration = float(phase["duration_s"] or 0)
        spans.append((phase, end - datetime.timedelta(seconds=duration), duration))
    origin = min(begin for _, begin, _ in spans)
    total = max((begin - origin).total_seconds() + d for _, begin, d in spans) or 1.0
    minions = sorted({p["minion"] for p in phases})
    scale = (WIDTH - LEFT - 20) / total
    bars = []
    for phase, begin, duration in spans:
        y = 10 + 26 * minions.index(phase["minion"])
        x = LEFT + (begin - origin).total_seconds() * scale
        colour = PHASE_COLOURS.get(phase["phase"], "#666")
        state = "ok" if phase["result"] else "failed"
        tip = f"{phase['minion']} {phase['phase']} {duration:.3f} s {state}"
        if phase.get("error"):
            tip += f": {phase['error']}"
        outline = "" if phase["result"] else ' stroke="#d7301f" stroke-width="2"'
        bars.append(
            f'<rect class="phase phase-{_e(phase["phase"])} {state}" x="{x:.1f}" y="{y}" '
            f'width="{max(duration * scale, 2):.1f}" height="18" style="fill:{colour}"{outline}>'
            f"<title>{_e(tip)}</title></rect>"
        )
    names = "".join(f'<text x="10" y="{23 + 26 * i}">{_e(m)}</text>' for i, m in enumerate(minions))
    height = 40 + 26 * len(minions)
    legend = "".join(
        f'<rect x="{LEFT + 90 * i}" y="{height - 14}" width="10" height="10" style="fill:{c}"/>'
        f'<text x="{LEFT + 90 * i + 14}" y="{height - 5}">{p}</text>'
        for i, (p, c) in enumerate(PHASE_COLOURS.items())
    )
    caption = (f"<p>Run #{run['id']}: {_e(run['kind'])} of {_e(run.get('release') or run.get('ref') or '')}, "
               f"{total:.2f} s of node phases.</p>")
    return (f'{caption}<svg id="gantt" width="{WIDTH}" height="{height + 10}" role="img">'
            f'{names}{"".join(bars)}{legend}</svg>')


def spread_chart(spread):
    """Per environment, one bar cut into one segment per release, sized by its node count."""
    if not spread:
        return '<p id="spread">No environments.</p>'
    rows, colours = [], {}
    for i, (env, nodes) in enumerate(sorted(spread.items())):
        y = 10 + 34 * i
        rows.append(f'<text x="10" y="{y + 15}">{_e(env)}</text>')
        counts = {}
        for release in nodes.values():
            counts[release] = counts.get(release, 0) + 1
        x = LEFT
        for release, count in sorted(counts.items(), key=lambda rc: (-rc[1], str(rc[0]))):
            width = (WIDTH - LEFT - 20) * count / len(nodes)
            colour = "#bbb" if release is None else colours.setdefault(
                release, SPREAD_COLOURS[len(colours) % len(SPREAD_COLOURS)])
            holders = ", ".join(sorted(m for m, r in nodes.items() if r == release))
            label = release or "no answer / no release"
            rows.append(
                f'<rect class="spread-seg" data-env="{_e(env)}" x="{x:.1f}" y="{y}" width="{width:.1f}" '
                f'height="22" style="fill:{colour}"><title>{_e(label)}: {_e(holders)}</title></rect>'
                f'<text x="{x + 4:.1f}" y="{y + 15}" style="fill:#fff">{count} x {_e(_short(label))}</text>'
            )
            x += width
    height = 20 + 34 * len(spread)
    return f'<svg id="spread" width="{WIDTH}" height="{height}" role="img">{"".join(rows)}</svg>'


def _short(release):
    """The version and time fields of a release name (the rest is in the tooltip)."""
    fields = release.split("_")
    return "_".join(fields[2:6]) if len(fields) == 7 else release


def _show(key, value):
    if value is None:
        return "-"
    if key == "success_rate":
        return f"{value * 100:.1f} %"
    return json.dumps(value) if not isinstance(value, str) else value


def _e(value):
    return html.escape(str(value), quote=True)
