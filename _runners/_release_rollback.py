"""
The rollback pipeline, under the deploy lock, then ``_release_run.conclude``:

    normal:            survey -> choose -> switch_back   (the deploy's rollout)
    emergency, to=X:   locate -> choose -> switch_all
    emergency:         locate -> switch_all              (each node picks its own target)

``survey`` is the deploy's plan without its round trip: ``choose`` reads what
each node runs in the same call that lists its releases. The releases the
nodes leave are marked bad.
"""

import time

import _release_deploy as deploy_steps
import _release_fleet as fleet
import _release_node_state as node_state
import _release_run as runs
import _release_switch as switch

DeployError = runs.DeployError


def rollback(run, wait, emergency=False):
    run.facts["emergency"] = bool(emergency)  # recorded even when refused: the metrics count rollbacks by kind
    if not emergency:
        steps = (deploy_steps.survey, choose, switch_back)
    elif run.to:
        steps = (locate, choose, switch_all)
    else:  # the fastest path: one round trip, each node picks its own target
        steps = (locate, switch_all)
    try:
        with runs.Locked(run, "rollback", wait):
            runs.run_steps(run, steps)
    except DeployError as exc:
        run.error = run.error or str(exc)
    return runs.conclude(run)


def choose(run):
    """Each node's target, from the nodes' own view (the one ``salt-call --local`` uses)."""
    # A node's own target never is a release the master marked bad (the emergency path passes them too).
    avoid = sorted(run.records.bad_releases(run.project, run.env))
    listed = fleet.run_on(run.opts, run.minions, "release.list", arg=[run.project], kwarg={"avoid": avoid},
                          timeout_s=run.config["timeout_s"])
    try:
        run.targets = node_state.rollback_targets(listed, run.to)
    except node_state.RollbackRefused as exc:
        raise DeployError(str(exc))
    run.previous = {m: node["current"] for m, (_, node) in listed.items()}  # every node answered
    releases = sorted(set(run.targets.values()))
    runs.say(run, "rolling back to " + ", ".join(releases))
    if len(releases) == 1:  # the whole environment on one release: highstate's published release too
        run.name = releases[0]
        switch.find_staged(run)


def switch_back(run):
    """The rollout to each node's target, marking what it leaves bad."""
    switched = switch.roll(run, run.targets, rollback=True, force=bool(run.to))
    switch.mark_left_bad(run, switched)


def locate(run):
    """The environment's nodes, from the master's own view: no round trip to them."""
    run.waves = switch.waves(run)


def switch_all(run):
    """
    The emergency rollback: one switch call to every node, no drain; its
    duration is recorded. Without chosen targets each node goes back to its
    own rollback target in that same call.
    """
    # A node picking its own target never picks a release the master marked bad.
    avoid = [] if run.targets else sorted(run.records.bad_releases(run.project, run.env))
    engine = switch.engine(run, rollback=True, force=bool(run.to), avoid=avoid)
    started = time.monotonic()
    if run.targets:
        switched, failed = engine.switch_all(run.targets)
    else:
        switched, failed, landed = engine.rollback_all(run.minions)
        _note_landed(run, landed)
    run.facts.update(emergency=True, switch_s=round(time.monotonic() - started, 3))
    runs.say(run, f"switched {len(switched)} node(s) in {run.facts['switch_s']} s")
    switch.mark_left_bad(run, switched)
    if failed:
        raise DeployError(f"emergency rollback failed on {', '.join(failed)}")


def _note_landed(run, landed):
    """Where each node went by itself: its target and the release it left."""
    run.targets = {m: release for m, (release, _) in landed.items()}
    run.previous = {m: previous for m, (_, previous) in landed.items()}
    for minion, previous in run.previous.items():
        run.nodes[minion]["previous"] = previous
    if len(set(run.targets.values())) == 1:  # one release everywhere: highstate's published release
        run.name = next(iter(run.targets.values()))
        switch.find_staged(run)
