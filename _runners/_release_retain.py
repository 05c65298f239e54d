"""
Master side: what a rollback sends each node to, how an environment's nodes
stand (``release.status``), and which staged artifacts the master may drop.

Everything here works on the nodes' own answers to ``release.list`` (their
releases, current, previous, bad marks and rollback target), so the master
and ``salt-call --local release.rollback`` agree on the target.
"""

import collections
import os

import release_contract as contract
import release_delta as delta

TARBALL_SUFFIX = ".tar.gz"


class RetentionError(Exception):
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
        raise RetentionError(
            "no node was touched: " + "; ".join(f"{m}: {listed[m][1]}" for m in silent)
        )
    if to:
        lacking = sorted(m for m, (_, node) in listed.items() if to not in node["releases"])
        if lacking:
            raise RetentionError(f"release {to} is not on {', '.join(lacking)}: no node was touched")
        return {m: to for m in listed}
    stuck = sorted(m for m, (_, node) in listed.items() if not node["rollback_target"])
    if stuck:
        raise RetentionError(
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


def prune_artifacts(artifact_root, project, env, still_used):
    """
    Remove the staged tarballs (and checksum files) of ``env``'s releases of
    ``project`` that no node has any more; other environments' artifacts and
    files that are not release tarballs stay. Returns the release names removed.
    """
    folder = os.path.join(artifact_root, project)
    removed = []
    for name in _staged_releases(folder):
        fields = contract.parse_release_name(name)
        if fields["env"] != contract.sanitize_field(env) or name in still_used:
            continue
        tarball = os.path.join(folder, name + TARBALL_SUFFIX)
        for path in [tarball + ".sha256", tarball] + delta.side_files(folder, name):
            if os.path.exists(path):
                os.unlink(path)
        removed.append(name)
    return removed


def _staged_releases(folder):
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    # A delta's name ends in .tar.gz too, and "<release>.delta" parses as a release (dots are allowed).
    tarballs = [e for e in entries if e.endswith(TARBALL_SUFFIX) and not e.endswith(delta.DELTA_SUFFIX)]
    names = (e[: -len(TARBALL_SUFFIX)] for e in tarballs)
    return [n for n in names if contract.is_release_name(n)]
