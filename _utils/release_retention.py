"""
Which release a node rolls back to, and which releases it may prune.

Both answers are made from what the node itself knows (its releases folder,
``current`` and the cache of releases it switched to and marked bad), so they
hold the same with the master down. Standard library only: synced to minions
as ``_utils`` or installed with pip as ``salt_release.utils.release_retention``.
"""

import release_contract as contract

HISTORY_LENGTH = 50  # switches remembered per project on a node


def remember_switch(history, name):
    """The node's switch history with ``name`` appended, oldest first, bounded."""
    return (list(history or []) + [name])[-HISTORY_LENGTH:]


def rollback_target(installed, current, history=(), bad=()):
    """
    The release a node ran before ``current``: walking its switch history
    backwards, the first installed release that is neither current nor bad.
    A node with no usable history (installed before history was kept) falls
    back to the newest installed release older than ``current``. None when
    there is nothing to go back to.
    """
    usable = [name for name in installed if name != current and name not in set(bad)]
    for name in reversed(list(history or [])):
        if name in usable:
            return name
    if current is None or not contract.is_release_name(current):
        return None
    older = [n for n in usable if contract.release_sort_key(n) < contract.release_sort_key(current)]
    return older[-1] if older else None


def prunable(installed, current, keep, protected=()):
    """
    The releases to remove: all but the ``keep`` newest, never ``current``
    nor a protected one (the rollback target). Unsure means keep: with no
    current release, or a current that is not among the installed ones, nothing
    is prunable.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if current is None or current not in installed:
        return []
    ordered = sorted(installed, key=contract.release_sort_key)
    kept = set(ordered[-keep:]) | {current} | {p for p in protected if p}
    return [name for name in ordered if name not in kept]
