"""
Which release a node rolls back to, and which releases it may prune.

Both answers are made from what the node itself knows (its releases folder,
``current`` and the cache of releases it confirmed healthy and marked bad), so they
hold the same with the master down. Standard library only: synced to minions
as ``_utils`` or installed with pip as ``salt_release.utils.release_retention``.
"""

import release_contract as contract

GOOD_LENGTH = 50  # confirmed releases remembered per project on a node


def remember_good(good, name):
    """The node's releases that passed their health check, most recently confirmed last, bounded."""
    return ([n for n in (good or []) if n != name] + [name])[-GOOD_LENGTH:]


def seed_good(cached):
    """
    The node's confirmed releases, or, on a node from a version that kept no
    such list (no ``good`` in its cache at all), a first list: the release it
    ran before the one being confirmed now (``previous``), unless marked bad.
    That release was in service until this deploy switched away from it and
    this deploy's checks passed, so a rollback right after the upgrade has
    somewhere to go; a release only ever staged is never seeded.
    """
    if "good" in cached:
        return cached["good"]
    previous = cached.get("previous")
    return [previous] if previous and previous not in cached.get("bad", []) else []


def rollback_target(installed, current, good=(), bad=()):
    """
    The release a node goes back to from ``current``: the most recently
    confirmed one (activated here and passed its health check) that is still
    installed, neither current nor bad. Only confirmed releases count: a
    release only staged, or only switched to, never is. None when there is
    nothing to go back to.
    """
    usable = [name for name in installed if name != current and name not in set(bad)]
    for name in reversed(list(good or [])):
        if name in usable:
            return name
    return None


def prunable(installed, current, keep, protected=(), good=(), bad=()):
    """
    The releases to remove: all but ``keep``, chosen newest confirmed first,
    then newest unconfirmed, bad ones last; never ``current`` nor a protected
    one (the rollback target). Unsure means keep: with no current release, or
    a current that is not among the installed ones, nothing is prunable.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if current is None or current not in installed:
        return []
    ordered = sorted(installed, key=contract.release_sort_key)
    rank = {name: 0 if name in set(bad) else 2 if name in set(good) else 1 for name in ordered}
    preferred = sorted(reversed(ordered), key=lambda name: -rank[name])  # stable: newest first in each rank
    kept = set(preferred[:keep]) | {current} | {p for p in protected if p}
    return [name for name in ordered if name not in kept]
