"""
Master side: find the nodes of an environment, cut them into batches and run
execution-module functions on them.

Batching is ours, not Salt's ``cmd_batch``: a failure budget must stop later
batches for certain, and Salt's batch failhard has a history of not doing so.
"""

import math
import re

import salt.client
import salt.utils.minions

PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


class FleetError(Exception):
    """A target that matched nothing, or a batch spec that makes no sense."""


def resolve_targets(opts, target, tgt_type="glob"):
    """
    Every minion the target names, from the master's keys and grains cache,
    sorted: minions that are down are included (and will count as failed).
    """
    found = salt.utils.minions.CkMinions(opts).check_minions(target, tgt_type)
    minions = sorted(set(found.get("minions", [])))
    if not minions:
        raise FleetError(f"target {target!r} ({tgt_type}) matched no minion")
    return minions


def batch_size(spec, count):
    """Salt's batch semantics: N nodes, or N% of them rounded down but never below 1."""
    if spec is None or count == 0:
        return max(count, 1)
    match = PERCENT.match(str(spec))
    if match:
        size = math.floor(count * float(match.group(1)) / 100)
    else:
        try:
            size = int(spec)
        except (TypeError, ValueError):
            raise FleetError(f"batch must be N or 'N%', got {spec!r}")
    return min(max(size, 1), count)


def batches(minions, spec):
    size = batch_size(spec, len(minions))
    return [minions[i:i + size] for i in range(0, len(minions), size)]


def run_on(opts, minions, fun, arg=(), kwarg=None, timeout_s=60):
    """
    Run ``fun`` on each minion at once; returns ``{minion: (ok, value)}`` with
    every minion present: one that did not answer is ``(False, message)``.
    """
    with salt.client.LocalClient(mopts=opts) as client:
        returns = client.cmd(
            list(minions), fun, arg=list(arg), kwarg=kwarg or {}, tgt_type="list",
            timeout=timeout_s, full_return=True,
        )
    return {minion: _outcome(returns.get(minion), timeout_s) for minion in minions}


def _outcome(full, timeout_s):
    if not isinstance(full, dict) or "ret" not in full:
        return False, f"no answer within {timeout_s} s (minion down or unreachable)"
    value = full["ret"]
    if full.get("retcode", 0) != 0 or full.get("success") is False:
        return False, _error_text(value)
    if isinstance(value, dict) and value.get("result") is False:
        return False, value.get("error") or "failed"
    return True, value


def _error_text(value):
    text = value if isinstance(value, str) else str(value)
    # Salt prefixes CommandExecutionError text with "ERROR executing '<fun>': " or "ERROR: ".
    return re.sub(r"^ERROR(?: executing '[^']*')?:\s*", "", text.strip())
