"""The example Grafana dashboards (examples/grafana/): every query names only metrics the master exports."""

import glob
import json
import os
import re

import pytest

import _release_metrics as metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARDS = sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "grafana", "*.json")))
# Words of PromQL that are not metric names (functions are told apart by the "(" after them).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan"}
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr):
    """The metric names a PromQL expression selects: no label matchers, groupings, ranges or functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings: label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for found in IDENTIFIER.finditer(expr):
        rest = expr[found.end():].lstrip()
        if found.group() not in KEYWORDS and not rest.startswith("(") and not expr[:found.start()].endswith("$"):
            names.add(found.group())
    return names


def queries(dashboard):
    """Every PromQL expression of the dashboard: panel targets and query variables (label_values' metric)."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            exprs.append(re.fullmatch(r"label_values\((.*),\s*\w+\)", query).group(1))
    return exprs


def test_the_name_parser_finds_names_and_only_names():
    expr = ('histogram_quantile(0.95, sum by (le, env) (increase(salt_release_x_bucket{env=~"$env", a="b(c)"}[7d])))'
            " / on (env) group_left clamp_min(other_metric, 1) > bool 0")
    assert metric_names(expr) == {"salt_release_x_bucket", "other_metric"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=os.path.basename)
def test_every_query_names_only_exported_metrics(path):
    with open(path, encoding="utf-8") as handle:
        dashboard = json.load(handle)
    exprs = queries(dashboard)
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= metrics.exported_names(), (expr, names - metrics.exported_names())


def test_the_dashboard_has_the_panels_docs_promise():
    [path] = [p for p in DASHBOARDS if p.endswith("salt-release.json")]
    with open(path, encoding="utf-8") as handle:
        dashboard = json.load(handle)
    used = set().union(*(metric_names(e) for e in queries(dashboard)))
    assert {"salt_release_deploys_total", "salt_release_deploy_failures_total",
            "salt_release_deploy_duration_seconds_bucket", "salt_release_mttr_seconds", "salt_release_lock_held",
            "salt_release_node_release_info"} <= used
