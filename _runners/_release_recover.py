"""
The recover pipeline (``release.recover``), after a runner or its master died
mid-rollout: find the dead run and its journal, take over its lock, then

    survey -> settle -> finish | send_back -> settle

and ``_release_run.conclude``; the dead run is closed "recovered by" this
one. The decisions (``dead_run`` .. ``to_send_back``) are pure functions over
the journal the dead run left in the store and the nodes' real state.

The journal is the ``journal`` entry of a run's details, written before its
first switch and after each drain and undrain: ``{"targets": {minion:
release}, "previous": {minion: release}, "drained": [backend, ...]}``, the
last being the backends the run had taken out of the load balancer and not
put back yet: the only ones ``settle`` may put back.
The phases table then says, node by node, how far the run got; the nodes'
``current`` link says where it really left them.
"""

import time

import _release_deploy as deploy_steps
import _release_fleet as fleet
import _release_metrics as metrics
import _release_run as runs
import _release_store as store
import _release_switch as switch
import release_contract as contract

RECOVERABLE = ("deploy", "rollback")
MODES = ("finish", "rollback")


class NothingToRecover(Exception):
    """The newest deploy or rollback finished (or there is none)."""


def dead_run(runs):
    """
    The newest deploy/rollback row (``runs`` newest first) when it never
    finished, or failed leaving nodes on its release or out of the load
    balancer (see ``unsettled``, ``left_drained``). Runs refused before they
    held the lock (locked, bad input) touched no node: they never shadow the
    dead run before them.
    """
    row = newest_run(runs)
    if row is None:
        raise NothingToRecover("no deploy or rollback on record: nothing to recover")
    if row["result"] is not None and not (unsettled(row) or left_drained(row)):
        raise NothingToRecover(f"the last {row['kind']} (run {row['id']}) finished: nothing to recover")
    return row


def newest_run(runs):
    """The newest deploy/rollback row that got past its lock and configuration (None: there is none)."""
    return next((row for row in runs if row["kind"] in RECOVERABLE and not _refused(row)), None)


def failed_unrecovered(row):
    """A run that ended failed and that no recovery has closed yet."""
    return row is not None and row["result"] is not None and not row["result"] \
        and not store.details(row).get("recovered_by")


def _refused(row):
    """A finished run that stopped at its lock or its configuration, before any node step."""
    return row["result"] is not None and store.details(row).get("failed_step") in ("lock", "configure")


def unsettled(row):
    """
    ``{minion: previous release}`` of the nodes a failed run may have left
    on its release: those it could not read back (a master restarted under
    it, a minion that stopped answering) and, for a deploy, those it read
    back on the new release (its rollback could not take them back, or there
    was none), so recover looks.
    """
    if not failed_unrecovered(row):
        return {}

    def left_on_it(node):
        if node.get("release") is None:
            return True
        return row["kind"] == "deploy" and node["release"] == row["release"] != node["previous"]

    nodes = store.details(row).get("nodes") or {}
    return {m: node["previous"] for m, node in sorted(nodes.items())
            if isinstance(node, dict) and node.get("previous") and left_on_it(node)}


def left_drained(row):
    """The backends a failed run still had out of the load balancer when it ended (its journal's last word)."""
    if not failed_unrecovered(row):
        return []
    return (journal(store.details(row)) or {}).get("drained") or []


def journal(details):
    """The journal of a run's details (None when the run died before any switch)."""
    found = (details or {}).get("journal")
    return found if found and found.get("targets") else None


def to_finish(targets, current, drained):
    """Nodes the dead run did not take all the way: not on their target yet, or left drained."""
    return [m for m in sorted(targets) if current.get(m) != targets[m] or m in drained]


def to_settle(down, backends, dead_drained):
    """
    The nodes ``down`` (drained now) whose backend the dead run took out
    (its journal, or the load balancer's record of its drains): a backend an
    operator (or anyone else) had down stays down.
    """
    return [m for m in down if backends.get(m) in dead_drained]


def to_send_back(targets, previous, current):
    """``{minion: previous release}`` for nodes the dead run switched (and that had a release before)."""
    return {
        m: previous[m] for m in sorted(targets)
        if previous.get(m) and current.get(m) == targets[m] and previous[m] != targets[m]
    }


# ---------------------------------------------------------------- the pipeline


def recover(run, mode):
    """Recover the environment's dead run in ``mode``; a failed recovery leaves it open for another try."""
    if not run.error and mode not in MODES:
        run.error, run.failed_step = f"mode must be one of {', '.join(MODES)}, not {mode!r}", "configure"
    dead = None
    try:
        _settle_lb(run)
        dead = _dead_run(run, mode)
        with runs.Locked(run, f"recover ({mode}) of run {dead['id']}", 0, take_over=True):
            if not run.targets and dead["result"] is None:
                _close_dead(run, dead, mode)
                raise NothingToRecover(f"run {dead['id']} died before its first switch: no node to recover")
            runs.run_steps(run, (survey, settle, finish if mode == "finish" else send_back, settle))
    except NothingToRecover as exc:
        return _nothing_to_recover(run, str(exc))
    except runs.DeployError as exc:
        run.error = run.error or str(exc)
    run.facts.update(recovered_run=dead and dead["id"], mode=mode)
    ret = runs.conclude(run)
    if ret["result"]:
        _close_dead(run, dead, mode)
    return ret


def _close_dead(run, dead, mode):
    run.records.finish_run(dead["id"], False, dead.get("duration_s"), (dead["error"] or "the run died mid-rollout")
                           + f"; recovered by run {run.record_id} ({mode}, {run.author})",
                           dict(store.details(dead), recovered_by=run.record_id))


def _dead_run(run, mode):
    """The run to recover and its journal (``run.targets``, ``run.previous``)."""
    if run.error:
        raise runs.DeployError(run.error)
    rows = run.records.runs(run.project, run.env, limit=50, kinds=RECOVERABLE)
    try:
        dead = dead_run(rows)
    except NothingToRecover:
        dead = _failed_run_the_lb_remembers(run, newest_run(rows))
        if dead is None:
            raise
    details = store.details(dead)
    found = journal(details)
    run.facts["recovered_run"] = dead["id"]
    if dead["result"] is not None:  # a failed run, not a dead one: what it left behind, and only back
        if mode == "finish":
            raise runs.DeployError(f"run {dead['id']} failed: mode=finish cannot take it forward; use mode=rollback")
        nodes = {m: n for m, n in (details.get("nodes") or {}).items() if isinstance(n, dict)}
        run.targets = dict.fromkeys(unsettled(dead), dead["release"])
        run.previous = {m: node.get("previous") for m, node in nodes.items()}  # every node of it is surveyed
        run.facts["dead_run_drained"] = left_drained(dead)
    elif found:
        run.targets, run.previous = found["targets"], found["previous"]
        run.name, run.source_url, run.sha256 = dead["release"], found["source_url"], found["sha256"]
        run.facts["dead_run_drained"] = found.get("drained")
    runs.say(run, f"recovering run {dead['id']} ({dead['kind']} {dead['release'] or dead['ref']} "
                  f"by {dead['who']}, jid {dead['jid']})")
    return dead


def survey(run):
    """Where the dead run left each node: its current release, and whether the load balancer has it down."""
    run.waves = switch.waves(run)
    switch.keep_in_waves(run, set(run.targets) | set(run.previous))
    run.hosts = deploy_steps.hosts(run)
    listed = fleet.run_on(run.opts, run.minions, "release.list", arg=[run.project],
                          timeout_s=run.config["timeout_s"])
    run.facts["found"] = {m: value.get("current") if ok else None for m, (ok, value) in listed.items()}
    try:
        run.facts["drained"] = switch.engine(run).drained(run.minions)
    except fleet.FleetError as exc:
        raise runs.DeployError(str(exc))
    runs.say(run, f"found {run.facts['found']}; drained: {', '.join(run.facts['drained']) or 'none'}")


def finish(run):
    """Take every node the dead run left behind to its target, through the rollout."""
    todo = to_finish(run.targets, run.facts.get("found") or {}, run.facts.get("drained", []))
    for minion in set(run.targets) - set(todo):
        run.nodes[minion] = contract.node_result(True, run.targets[minion], run.previous.get(minion))
    if todo:
        switch.keep_in_waves(run, todo)
        switch.roll(run, {m: run.targets[m] for m in todo})


def send_back(run):
    """Send the nodes the dead run switched back to their previous release; mark its release bad."""
    found = run.facts.get("found") or {}
    back = to_send_back(run.targets, run.previous, found)
    for minion in (set(run.targets) | set(run.previous)) - set(back):  # read back, left where they are
        run.nodes[minion] = contract.node_result(True, found.get(minion), found.get(minion))
    run.targets, run.previous = back, {m: found.get(m) for m in run.targets}
    if back:
        switch.keep_in_waves(run, back)
        switched = switch.roll(run, back, rollback=True, force=True)
        run.records.mark_bad(run.project, run.env, sorted({found[m] for m in switched}), run.record_id)
    run.name = None if len(set(back.values())) != 1 else next(iter(back.values()))


def settle(run):
    """
    Nodes the dead run left drained go back into the load balancer when they
    pass their check on the release they run; a node down for any other
    reason stays down. Run first, so that finishing or sending back one batch
    never has more nodes out than the rollout allows, and again at the end.
    """
    if not run.environment.get("lb"):
        return
    engine = switch.engine(run)
    down = [m for m in run.facts.get("drained", []) if m not in run.facts.get("put_back", [])]
    if run.nodes:  # the end: what the load balancer has down now
        down = engine.drained(sorted(run.facts.get("found") or run.nodes))
    if not down:
        return
    dead_drained = set(run.facts.get("dead_run_drained") or ()) | _lb_says_drained_by(run, run.facts["recovered_run"])
    ours = to_settle(down, {m: engine.backend(m) for m in down}, dead_drained)
    left = sorted(set(down) - set(ours))
    if left:
        runs.say(run, f"left down (the dead run did not drain them): {', '.join(left)}")
        run.facts["left_down"] = left
    running = dict(run.facts.get("found") or {}, **{m: n["release"] for m, n in run.nodes.items()})
    back_in = engine.settle([m for m in ours if running.get(m)], running)
    run.facts["put_back"] = sorted(set(run.facts.get("put_back", [])) | set(back_in))
    run.facts["drained"] = [m for m in run.facts.get("drained", []) if m not in back_in]


def _lb_says_drained_by(run, record_id):
    """The backends the load balancer remembers run ``record_id`` draining (its last drain may be in no journal)."""
    lb = run.environment["lb"]
    ok, owners = fleet.run_on(run.opts, [lb["minion"]], "release_lb.drained_by", arg=[lb["upstream_file"]],
                              timeout_s=run.config["timeout_s"])[lb["minion"]]
    if not ok:
        runs.say(run, f"load balancer {lb['minion']} cannot say who drained what: {owners}")
        return set()
    dead = switch.drainer(run, record_id)
    return {backend for backend, by in owners.items() if by == dead}


def _failed_run_the_lb_remembers(run, row):
    """
    ``row`` when it failed and the load balancer still has backends down that
    it drained: a drain whose answer was lost (its master restarted) is in no
    journal, only in the load balancer's ``by`` record.
    """
    if not failed_unrecovered(row) or not run.environment.get("lb"):
        return None
    return row if _lb_says_drained_by(run, row["id"]) else None


def _settle_lb(run):
    """
    First, whatever run died: a load-balancer minion killed mid-edit left a
    file nginx may not serve; its next call undoes that edit (see
    ``release_lb``). This is that call, so the undo is said (``lb_undone``).
    """
    lb = run.environment.get("lb")
    if run.error or not lb:
        return
    ok, value = fleet.run_on(run.opts, [lb["minion"]], "release_lb.settle", arg=[lb["upstream_file"]],
                             timeout_s=run.config["timeout_s"])[lb["minion"]]
    if not ok:
        raise runs.DeployError(f"load balancer {lb['minion']} cannot settle {lb['upstream_file']}: {value}")
    if value.get("undone"):
        run.facts["lb_undone"] = value["undone"]
        runs.say(run, f"load balancer {lb['minion']}: undid a {value['undone']} that a killed call left "
                      "half made (the file put back and reloaded)")


def _nothing_to_recover(run, comment):
    if run.facts.get("lb_undone"):
        comment += f"; the load balancer undid a {run.facts['lb_undone']} that a killed call left half made"
    undone = {k: v for k, v in run.facts.items() if k == "lb_undone"}
    duration_s = round(time.monotonic() - run.started, 3)
    run.records.finish_run(run.record_id, True, duration_s, None, dict(undone, comment=comment))
    metrics.publish(run.conf, run.records)
    return dict(undone, result=True, project=run.project, env=run.env, comment=comment, retcode=0)
