"""
Switching nodes, for every pipeline: the deploy's rollout, the rollback's
switch back and recover's finish or send-back all go through ``roll`` (the
safe rollout of ``_release_rollout.py``, journalled first so a dead run can be
recovered), and a rollback marks what it leaves bad.
"""

import os

import _release_artifact as artifact
import _release_fleet as fleet
import _release_node_state as node_state
import _release_rollout as rollout
import _release_run as runs
import release_contract as contract
import release_published as published


def waves(run):
    """The environment's waves with their nodes, from the master's own view."""
    try:
        return rollout.plan_waves(run.opts, run.environment)
    except (fleet.FleetError, KeyError, ValueError) as exc:
        raise runs.DeployError(f"bad waves for {run.project}/{run.env}: {exc}")


def keep_in_waves(run, minions):
    for wave in run.waves:
        wave.minions = [m for m in wave.minions if m in minions]


def roll(run, targets, **activate_kwarg):
    """Switch nodes to ``targets`` through the rollout; returns the nodes that ended on their target."""
    journal(run, targets)
    outcome = engine(run, targets, **activate_kwarg).forward(run.waves, targets)
    for minion in targets:
        was = run.previous.get(minion)
        node = run.nodes.setdefault(minion, contract.node_result(True, was, was))
        if node.get("phase") in (None, "install"):
            node.update(result=False, error="not switched: the rollout stopped before its batch")
    if outcome.reverted:
        runs.say(run, f"rolled back {', '.join(outcome.reverted)}")
    failed_checks = sorted({targets[m] for m in outcome.failed_checks})
    if outcome.stopped and outcome.reverted and failed_checks:
        # A release the rollout gave up on because it failed its own checks (reload,
        # health) is bad; one that failed on a node within the failure budget still runs
        # on the others, and one stopped by a node-local error never ran: both stay eligible.
        run.records.mark_bad(run.project, run.env, failed_checks, run.record_id)
    if outcome.stopped:
        said = [outcome.stopped] + (["switched nodes were rolled back"] if outcome.reverted else [])
        raise runs.DeployError("; ".join(said + ([outcome.held] if outcome.held else [])))
    return [m for m in outcome.switched if m not in outcome.reverted]


def journal(run, targets, drained=()):
    """
    What ``release.recover`` needs, written before the first switch: each
    node's target and previous release; rewritten after every drain and
    undrain with the backends this run has out of the load balancer (only
    those may a recovery put back).
    """
    run.records.update_run(run.record_id, details={"journal": {
        "targets": dict(targets), "previous": {m: run.previous.get(m) for m in targets},
        "source_url": run.source_url, "sha256": run.sha256, "drained": sorted(drained),
    }})


class JournalledRollout(rollout.Rollout):
    """
    The rollout engine, keeping the run's journal of the backends it has
    drained up to date, and having the load balancer remember this run as
    the one that drained them (``by``): a drain still in flight when the
    runner dies is in no journal.
    """

    on_change = None  # callable(backends this run has out now)
    drained_by = None  # the run's name for release_lb.drain's ``by``

    def backend(self, minion):
        return self._backend(minion)

    def _call(self, minions, fun, arg=(), kwarg=None):
        if fun == "release_lb.drain" and self.drained_by:
            kwarg = dict(kwarg or {}, by=self.drained_by)
        return super()._call(minions, fun, arg=arg, kwarg=kwarg)

    def _drain(self, minions):
        before = set(self.ours)
        ok = super()._drain(minions)
        self._journal(before)
        return ok

    def _undrain(self, minions):
        before = set(self.ours)
        answer = super()._undrain(minions)
        self._journal(before)
        return answer

    def _journal(self, before):
        if self.on_change and self.ours != before:
            self.on_change(set(self.ours))


def engine(run, targets=None, **activate_kwarg):
    """The rollout engine of ``run``; with ``targets`` it journals every drain and undrain."""
    switcher = JournalledRollout(
        run.opts, run.project, run.env, run.environment, run.hosts, run.previous,
        run.fence, runs.reporter(run), lambda message: runs.say(run, message),
    )
    switcher.activate_kwarg = activate_kwarg
    switcher.drained_by = drainer(run)
    if targets is not None:
        switcher.on_change = lambda drained: journal(run, targets, drained)
    return switcher


def drainer(run, record_id=None):
    """How the load balancer names the run that drained a backend."""
    return f"{run.project}/{run.env} run {record_id or run.record_id}"


def mark_left_bad(run, switched):
    left = node_state.left_behind(run.previous, run.targets, switched)
    if left:
        run.records.mark_bad(run.project, run.env, left, run.record_id)
        runs.say(run, f"marked bad: {', '.join(left)}")
    if run.to:
        run.records.clear_bad(run.project, run.env, run.to)


def source_url(run, name):
    """
    Where nodes fetch a staged artifact: the HTTP artifact base when set (the
    project's, else the master's), else the master's own fileserver.
    """
    base = run.config.get("artifact_url") or run.conf.get("artifact_url")
    if base:
        return f"{base.rstrip('/')}/{run.project}/{name}.tar.gz"
    return artifact.salt_url(run.conf["artifact_root"], run.opts["file_roots"].get("base", []), run.project, name)


def find_staged(run):
    """The staged artifact of ``run.name`` and its checksum, when the master still has them."""
    tarball = os.path.join(run.conf["artifact_root"], run.project, f"{run.name}.tar.gz")
    try:
        with open(published.checksum_path(tarball), encoding="utf-8") as handle:
            run.sha256 = published.parse_checksum(handle.read())
        run.source_url = source_url(run, run.name)
    except (OSError, artifact.ArtifactError):
        run.sha256 = None
