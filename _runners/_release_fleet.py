"""
Master side: find the nodes of an environment, cut them into batches and run
execution-module functions on them.

Batching is ours, not Salt's ``cmd_batch``: a failure budget must stop later
batches for certain, and Salt's batch failhard has a history of not doing so.
"""

import math
import re
import threading
import time

import salt.client
import salt.utils.minions

PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
DEFAULT_PRESENCE_TIMEOUT_S = 3
# A minion that returned a job this recently is not probed again: the probe is one more
# round trip, and inside one run the next call follows the last within a second or two.
FRESH_S = 10
# How long a call waits before it first asks the nodes that have not answered whether its
# job still runs there (Salt's saltutil.find_job, asked again every gather_job_timeout): a
# minion killed or restarted mid-call is given up on this long (plus one gather_job_timeout)
# after the publish, not after the call's whole timeout (300 s for an install).
LIVENESS_S = 10
NO_ANSWER = "no answer"
PROBE_UNANSWERED = "did not answer a presence probe"
_LOCAL = threading.local()  # this thread's LocalClients, see _client


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


def run_on(opts, minions, fun, arg=(), kwarg=None, timeout_s=60, presence_timeout_s=DEFAULT_PRESENCE_TIMEOUT_S):
    """
    Run ``fun`` on each minion at once; returns ``{minion: (ok, value)}`` with
    every minion present: one that did not answer is ``(False, message)``.

    A presence probe goes first (``presence_timeout_s``; 0 or None skips it)
    to the minions that returned nothing to this process in the last
    ``FRESH_S``: a stopped minion fails at once instead of costing the whole
    ``timeout_s`` plus Salt's job lookups, and ``fun`` runs only where a
    minion answered.
    """
    minions = list(minions)
    absent = set()
    stale = [m for m in minions if time.monotonic() - _answered().get(m, float("-inf")) > FRESH_S]
    if presence_timeout_s and stale:
        absent = set(stale) - present(opts, stale, presence_timeout_s)
    here = [m for m in minions if m not in absent]
    returns = {}
    if here:
        returns = _call(_client(opts), here, fun, arg, kwarg, timeout_s)
        answered = [m for m, full in returns.items() if isinstance(full, dict) and "ret" in full]
        _note_answers(answered)
        if set(here) - set(answered):
            _forget_client(opts)
    return {
        minion: (False, f"{minion} {PROBE_UNANSWERED} within {presence_timeout_s} s")
        if minion in absent else _outcome(returns.get(minion), timeout_s)
        for minion in minions
    }


def _call(client, minions, fun, arg, kwarg, timeout_s):
    """
    Publish ``fun`` to ``minions`` and gather their full returns for at most
    ``timeout_s``. Salt's ``LocalClient.cmd`` first asks whether the job
    still runs after the whole timeout, then waits as long as it does; here
    the first question comes after LIVENESS_S (a node that lost the job is
    given up on then), and ``timeout_s`` ends the wait whatever the nodes say
    (a job that hangs).
    """
    pub = client.run_job(minions, fun, arg=list(arg), kwarg=kwarg or {}, tgt_type="list", timeout=timeout_s,
                         listen=True)
    if not pub:
        return {}
    deadline = time.monotonic() + timeout_s
    returns = {}
    for answer in client.get_iter_returns(pub["jid"], pub["minions"], timeout=min(LIVENESS_S, timeout_s),
                                          block=False):
        if answer:
            returns.update(answer)
        elif time.monotonic() > deadline:
            break
    return returns


def present(opts, minions, timeout_s):
    """
    The minions that answer ``test.ping`` before ``timeout_s`` pass with no
    answer: one publish and the returns read off the bus until all answered
    or the bus stayed silent that long (no ``saltutil.find_job`` round after
    it, which is what makes a stopped minion cost a full gather_job_timeout
    more in ``LocalClient.cmd``). Silence, not a fixed deadline: where many
    minions share few cores their answers trickle in for longer than any one
    minion takes, and none of them is gone.
    """
    wanted, answered = set(minions), set()
    deadline = time.monotonic() + float(timeout_s)
    client = _client(opts)
    pub = client.run_job(list(wanted), "test.ping", tgt_type="list", timeout=timeout_s, listen=True)
    if not pub:
        return answered
    for raw in client.get_returns_no_block(f"salt/job/{pub['jid']}/ret/", "startswith"):
        if raw and raw.get("data", {}).get("return") is True:
            answered.add(raw["data"].get("id"))
            deadline = time.monotonic() + float(timeout_s)
        if answered >= wanted or time.monotonic() > deadline:
            break
    _note_answers(answered & wanted)
    if wanted - answered:
        _forget_client(opts)
    return answered & wanted


def _answered():
    """When each minion last returned a job to this thread (monotonic seconds)."""
    return _LOCAL.__dict__.setdefault("answered", {})


def _note_answers(minions):
    now = time.monotonic()
    _answered().update(dict.fromkeys(minions, now))


def _client(opts):
    """
    One LocalClient per master config and thread, kept for the process's
    life: making one loads Salt's modules (about 0.2 s), and a deploy makes
    two fleet calls per step and per batch. Its event bus connection only
    ever sees returns by jid, so jobs of earlier calls do not mix in.
    """
    cache = _LOCAL.__dict__.setdefault("clients", {})
    key = (id(opts), salt.client.LocalClient)
    if key not in cache:
        cache[key] = (opts, salt.client.LocalClient(mopts=opts))  # opts kept: its id stays unique
    return cache[key][1]


def _forget_client(opts):
    """
    Drop this thread's client after a call some minion did not answer: its
    event bus connection may be the reason (a master restarted under it
    keeps it open but deaf), and the next call must not stay deaf with it.
    """
    _, client = _LOCAL.__dict__.setdefault("clients", {}).pop((id(opts), salt.client.LocalClient), (None, None))
    if client is not None:
        client.destroy()


def unreachable(error):
    """Whether a failure message of ``run_on`` says the minion did not answer at all."""
    return str(error).startswith(NO_ANSWER) or PROBE_UNANSWERED in str(error)


def _outcome(full, timeout_s):
    if not isinstance(full, dict) or "ret" not in full:
        return False, f"{NO_ANSWER} within {timeout_s} s (minion down or unreachable)"
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
