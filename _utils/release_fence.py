"""
Fence numbers on a node: the runner passes the fence of its deploy lock,
which grows with every lock of that project+env; a node refuses a deploy
older than the last one of the same environment that touched it.

Environments sharing a node keep their own fences (``fences:{env}`` in the
node's cache). A call without an environment is held to the highest fence of
any, the per-project ``fence`` of older versions included. Stdlib only.
"""


class StaleFence(Exception):
    """A deploy older than one that already touched this node."""


def advance(cached, project, env, fence):
    """
    The node cache's new ``fences`` mapping after a call with ``fence``, or
    None when nothing changes; raises StaleFence for an older fence.
    """
    if fence is None:
        return None
    fences = cached.get("fences") if isinstance(cached.get("fences"), dict) else {}
    key = env or ""
    every = [_as_fence(f) for f in list(fences.values()) + [cached.get("fence")]]
    seen = _as_fence(fences.get(key)) if env else max(every)
    if int(fence) < seen:
        raise StaleFence(
            f"stale deploy refused: fence {fence} is older than {seen}, the last deploy of "
            f"{env or project} that touched this node"
        )
    return dict(fences, **{key: int(fence)}) if int(fence) > seen else None


def _as_fence(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0  # an unreadable fence record refuses nothing rather than everything
