"""
The environment as its nodes see it, from their own answers to
``release.list`` (releases, current, previous, bad marks, rollback target):
what a rollback sends each node to, what it leaves behind, and how the
nodes stand (``release.status``). The master and ``salt-call --local
release.rollback`` agree on the target because both read the node's view.
(Which staged artifacts the master drops is ``_release_prune``; which
releases a node keeps is the node's ``release_retention``.)
"""

import collections


class RollbackRefused(Exception):
    """A rollback that cannot go ahead on every node; no node has been touched."""


def rollback_targets(listed, to=None):
    """
    ``{minion: release}`` from each node's ``release.list`` answer
    (``{minion: (ok, value)}``): ``to`` on every node, or each node's own
    rollback target. Refuses the whole rollback when any node did not answer,
    lacks ``to``, or has nothing to go back to.
    """
    silent = sorted(m for m, (ok, _) in listed.items() if not ok)
    if silent:
        raise RollbackRefused(
            "no node was touched: " + "; ".join(f"{m}: {listed[m][1]}" for m in silent)
        )
    if to:
        lacking = sorted(m for m, (_, node) in listed.items() if to not in node["releases"])
        if lacking:
            raise RollbackRefused(f"release {to} is not on {', '.join(lacking)}: no node was touched")
        return {m: to for m in listed}
    stuck = sorted(m for m, (_, node) in listed.items() if not node["rollback_target"])
    if stuck:
        raise RollbackRefused(
            f"nothing to roll back to on {', '.join(stuck)} (no older release that is not marked bad): "
            "no node was touched"
        )
    return {m: node["rollback_target"] for m, (_, node) in listed.items()}


def left_behind(previous, targets, switched):
    """The releases the switched nodes left: a rollback marks them bad."""
    return sorted({previous[m] for m in switched if previous.get(m) and previous[m] != targets[m]})


def status(listed):
    """
    Per node current, previous, rollback target, bad marks and what else is
    kept; a node whose current differs from most of the environment's (or that
    did not answer) is flagged ``out_of_step``.
    """
    answered = {m: node for m, (ok, node) in listed.items() if ok}
    spread = collections.Counter(node["current"] for node in answered.values())
    usual = spread.most_common(1)[0][0] if spread else None
    nodes = {}
    for minion, (ok, node) in sorted(listed.items()):
        if not ok:
            nodes[minion] = {"error": node, "out_of_step": True}
            continue
        shown = {node["current"], node.get("previous")}
        nodes[minion] = {
            "current": node["current"], "previous": node.get("previous"),
            "rollback_target": node["rollback_target"], "bad": node["bad"],
            "kept": [r for r in node["releases"] if r not in shown],
            "out_of_step": node["current"] != usual,
        }
    return {
        "nodes": nodes,
        "releases": dict(spread),
        "out_of_step": sorted(m for m, node in nodes.items() if node["out_of_step"]),
    }
