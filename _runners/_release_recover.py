"""
Master side: what ``release.recover`` decides, from the journal a dead run
left in the store and the nodes' real state. Pure functions; the runner
does the talking to nodes and the load balancer.

The journal is the ``journal`` entry of a run's details, written before its
first switch: ``{"targets": {minion: release}, "previous": {minion: release}}``.
The phases table then says, node by node, how far the run got; the nodes'
``current`` link says where it really left them.
"""

RECOVERABLE = ("deploy", "rollback")
MODES = ("finish", "rollback")


class NothingToRecover(Exception):
    """The newest deploy or rollback finished (or there is none)."""


def dead_run(runs):
    """The newest deploy/rollback row (``runs`` newest first) when it never finished."""
    for row in runs:
        if row["kind"] in RECOVERABLE:
            if row["result"] is not None:
                raise NothingToRecover(f"the last {row['kind']} (run {row['id']}) finished: nothing to recover")
            return row
    raise NothingToRecover("no deploy or rollback on record: nothing to recover")


def journal(details):
    """The journal of a run's details (None when the run died before any switch)."""
    found = (details or {}).get("journal")
    return found if found and found.get("targets") else None


def to_finish(targets, current, drained):
    """Nodes the dead run did not take all the way: not on their target yet, or left drained."""
    return [m for m in sorted(targets) if current.get(m) != targets[m] or m in drained]


def to_send_back(targets, previous, current):
    """``{minion: previous release}`` for nodes the dead run switched (and that had a release before)."""
    return {
        m: previous[m] for m in sorted(targets)
        if previous.get(m) and current.get(m) == targets[m] and previous[m] != targets[m]
    }
