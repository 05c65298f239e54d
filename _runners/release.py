"""
salt-release: ship a git ref to a Salt-managed web cluster, in batches, with an
atomic switch on every node.

A deploy is a pipeline of named steps, each one short function below:

    lock -> fetch -> screen -> build -> check -> package -> stage -> plan -> delta
         -> config_check -> install -> activate -> prune -> record

``diff=True`` stops after ``config_check``: each node reports which config files
would change (names and sha256, never contents) and nothing is installed.
A rollback reuses lock, plan and record around its own two steps (choose,
then switch back through the same rollout, or all at once in an emergency).

``activate`` is the safe rollout (``_release_rollout.py``): wave by wave,
batch by batch, each node drained, switched, reloaded, verified and put back;
``install`` stages the release on every node before any node switches.

Master configuration (see README.md)::

    release:
      artifact_root: /srv/salt/releases
      state_dir: /var/cache/salt/master/release
      projects:
        rainbow:
          repo: https://git.example.com/rainbow.git
          build: ["make dist"]
          checks: ["make test"]
          environments:
            test: {target: 'G@env:test', tgt_type: compound, batch: '100%'}
"""

import dataclasses
import datetime
import functools
import getpass
import json
import logging
import os
import shutil
import time
import uuid

import salt.utils.event

import _release_artifact as artifact
import _release_config as nodeconfig
import _release_fleet as fleet
import _release_lock as locking
import _release_recover as recovery
import _release_report as report_page
import _release_retain as retain
import _release_rollout as rollout
import _release_source as source
import _release_stats as stats_lib
import _release_store as store
import _release_webhook as hook
import release_contract as contract
import release_published as published

log = logging.getLogger(__name__)

__virtualname__ = "release"
# What salt-run offers; the pipeline steps (fetch, build, ...) are module functions too,
# named after their step, but they take a run and are not commands.
__all__ = ["deploy", "rollback", "recover", "unlock", "status", "history", "stats", "report", "webhook"]

DEFAULT_BUILD_TIMEOUT_S = 1800
DEFAULT_INSTALL_TIMEOUT_S = 300
DEFAULT_TIMEOUT_S = 60
DEFAULT_LOCK_TTL_S = 6 * 3600
# Node phases the conductor drives from the master; the nodes report install and activate themselves.
CONDUCTOR_PHASES = ("drain", "verify", "undrain", "readback")


def __virtual__():
    return __virtualname__


class DeployError(Exception):
    """A step that failed; the run stops and every node keeps the release it had."""


def _answers_errors(command):
    """A command whose DeployError (say, an unreachable store) is a failed return, not a traceback."""

    @functools.wraps(command)
    def answer(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DeployError as exc:
            return {"result": False, "error": str(exc), "retcode": 1}

    return answer


@dataclasses.dataclass
class Run:
    """Everything one deploy knows, filled in step by step."""

    project: str
    env: str
    ref: str
    author: str
    config: dict
    environment: dict
    state_dir: str
    jid: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    commit: str = None
    branch: str = None
    version: str = None
    name: str = None
    tree: str = None
    tarball: str = None
    source_url: str = None
    sha256: str = None
    manifest: dict = None
    delta_offer: dict = dataclasses.field(default_factory=dict)
    waves: list = dataclasses.field(default_factory=list)
    previous: dict = dataclasses.field(default_factory=dict)
    hosts: dict = dataclasses.field(default_factory=dict)
    fence: int = None
    nodes: dict = dataclasses.field(default_factory=dict)
    output: dict = dataclasses.field(default_factory=dict)
    error: str = None
    failed_step: str = None
    kind: str = "deploy"
    trigger: str = "cli"
    record_id: int = None
    records: store.Store = None
    force: bool = False
    to: str = None
    targets: dict = dataclasses.field(default_factory=dict)
    facts: dict = dataclasses.field(default_factory=dict)  # kind-specific extras for the return and the record

    @property
    def builds(self):
        """Where the exported tree and the tarball live until the tarball is staged."""
        return os.path.join(self.state_dir, "builds")

    @property
    def minions(self):
        return [minion for wave in self.waves for minion in wave.minions]


# ---------------------------------------------------------------- public


def deploy(project, env, ref, author=None, wait=0, trigger="cli", test=False, force=False, **kwargs):
    """
    Deploy a git ref (branch, tag or commit) of a project to an environment.
    ``test=True`` prints the plan (waves, batches, each node's current and new
    release, the load-balancer steps) and changes nothing. A commit whose
    release a rollback marked bad is only deployed again with ``force=True``.

    CLI Example:

    .. code-block:: bash

        salt-run release.deploy rainbow env=test ref=v1.1.0
        salt-run release.deploy rainbow env=pro ref=master author=alice wait=60
        salt-run release.deploy rainbow env=pro ref=v1.2.0 test=True
        salt-run release.deploy rainbow env=pro ref=v1.2.0 diff=True
    """
    if test:
        return _plan_only(project, env, ref, author)
    run = _begin(project, env, ref, author, trigger, kwargs)
    run.force = bool(force)
    try:
        with _locked(run, "deploy", wait):
            steps = (fetch, screen, build, check, package, stage, plan, delta, config_check, install, activate,
                     prune)
            if kwargs.get("diff"):  # report each node's config changes, install nothing
                steps = steps[:steps.index(config_check) + 1]
            for step in steps:
                _step(run, step)
    except DeployError as exc:
        run.error = run.error or str(exc)
    finally:
        _cleanup(run)
    return record(run)


@_answers_errors
def unlock(project, env, force=False):
    """
    Break a deploy lock left behind by a run that died. Refused while the
    holder may still be running (its pid is alive on this master, or the lock
    is younger than ``lock_ttl_s`` on another host) unless ``force=True``.
    Every break is recorded and fired as an event.

    CLI Example:

    .. code-block:: bash

        salt-run release.unlock rainbow env=pro
        salt-run release.unlock rainbow env=pro force=True
    """
    conf = _release_opts()
    records = _records(conf)
    locks = records.locks()
    holder = locks.read(project, env)
    if holder is None:
        return {"result": True, "comment": f"{project}/{env} is not locked", "retcode": 0}
    ttl_s = float((conf["projects"].get(project) or {}).get("lock_ttl_s", DEFAULT_LOCK_TTL_S))
    if locks.holder_alive(project, env, holder, ttl_s) and not force:
        return {
            "result": False, "retcode": 1,
            "error": f"{project}/{env} is {locking.describe(holder)}; its holder may be alive: "
                     "pass force=True to break it anyway",
        }
    broken = locks.remove(project, env)
    who = getpass.getuser()
    records.record(
        "unlock", project, env, result=True, who=who,
        details={"broken": _public_owner(broken), "force": bool(force)},
    )
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=False) as bus:
        bus.fire_event({"broken": _public_owner(broken), "by": who, "force": bool(force)},
                       contract.event_tag(project, env, "lock", "broken"))
    return {"result": True, "comment": f"broke the lock: {locking.describe(broken)}", "retcode": 0}


# ---------------------------------------------------------------- steps


def fetch(run):
    """Update the project's mirror and resolve the ref to a commit."""
    try:
        ref = source.validate_ref(run.ref)
        repo = source.update_mirror(run.state_dir, run.project, run.config["repo"])
        run.commit, run.branch = source.resolve(repo, ref)
        run.version = source.describe(repo, run.commit)
    except source.SourceError as exc:
        raise DeployError(str(exc))
    _say(run, f"fetched {run.ref} = {run.commit[:12]} ({run.version})")


def screen(run):
    """Refuse a commit whose release was rolled back from in this environment, unless forced."""
    bad = [name for name, commit in run.records.bad_releases(run.project, run.env).items() if commit == run.commit]
    if bad and not run.force:
        raise DeployError(
            f"commit {run.commit[:12]} is release {', '.join(bad)}, marked bad by a rollback in "
            f"{run.env}: pass force=True to deploy it again"
        )


def build(run):
    """Export the commit's tree (no .git) and run the project's build commands in it."""
    run.tree = os.path.join(run.builds, uuid.uuid4().hex)
    try:
        source.export(source.mirror(run.state_dir, run.project), run.commit, run.tree)
    except source.SourceError as exc:
        raise DeployError(str(exc))
    _commands(run, "build")


def check(run):
    """Run the quality gate; a failure stops the deploy before any node is touched."""
    _commands(run, "checks")


def package(run):
    """Name the release and write its tarball with the manifest."""
    built_at = _name(run)
    doc = {
        "name": run.name, "project": run.project, "env": run.env, "ref": run.ref,
        "commit": run.commit, "version": run.version, "branch": run.branch,
        "author": run.author, "built_at": built_at.isoformat(timespec="seconds"),
    }
    run.tarball = os.path.join(run.builds, f"{run.name}.tar.gz")
    run.sha256, run.manifest = artifact.package(run.tree, doc, run.tarball)
    run.records.update_run(run.record_id, commit=run.commit, release=run.name)
    _say(run, f"packaged {run.name} ({run.manifest['file_count']} files, sha256 {run.sha256[:12]})")


def stage(run):
    """Put the tarball where the master's fileserver serves it."""
    conf = _release_opts()
    root = conf["artifact_root"]
    try:
        run.source_url = _source_url(conf, run.project, run.name)
    except artifact.ArtifactError as exc:
        raise DeployError(str(exc))
    dest = os.path.join(root, run.project, f"{run.name}.tar.gz")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(run.tarball, dest)
    run.tarball = dest
    published.write_checksum(dest, run.sha256)  # so highstate can name a release without its hash


def plan(run):
    """Find each wave's nodes, cut them into batches and read what each node runs now."""
    try:
        run.waves = rollout.plan_waves(__opts__, run.environment)
    except (fleet.FleetError, KeyError, ValueError) as exc:
        raise DeployError(f"bad waves for {run.project}/{run.env}: {exc}")
    run.previous = _current_releases(run)
    run.hosts = _hosts(run)
    for wave in run.waves:
        batches = " | ".join(", ".join(batch) for batch in wave.batches)
        _say(run, f"wave {wave.name}: {batches} (may fail: {wave.budget})")


def delta(run):
    """Stage a delta against the release most nodes run, so they fetch only what changed."""
    if run.config.get("delta", True):
        roots = __opts__["file_roots"].get("base", [])
        run.delta_offer, said = artifact.stage_delta(run.tarball, run.tree, run.name, run.previous, roots)
        _say(run, said)


def config_check(run):
    """Every node renders its config in a dry run; one that cannot stops the deploy untouched."""
    outcomes = nodeconfig.preflight(
        __opts__, run.minions, run.project, run.name, run.source_url, run.sha256, run.env,
        run.config.get("install_timeout_s", DEFAULT_INSTALL_TIMEOUT_S), run.delta_offer,
    )
    # Strict, whatever the waves' failure budgets: a config error is in pillar or
    # templates, and would fail the same way on the next node.
    failed = _note_outcomes(run, "configure", outcomes)
    for minion, (ok, value) in sorted(outcomes.items()):
        if ok:
            run.nodes[minion]["files"] = value["files"]
            _say(run, f"{minion} config: {nodeconfig.summary(value['files'])}")
    if failed:
        raise DeployError(f"config check failed on {', '.join(failed)}: no node was touched")


def install(run):
    """
    Stage the release on every node of every wave, in parallel, before any
    node switches. A node that cannot stage stops the deploy, unless its
    wave's failure budget allows leaving it out.
    """
    outcomes = fleet.run_on(
        __opts__, run.minions, "release.install", arg=[run.project, run.name],
        kwarg={"source": run.source_url, "source_hash": run.sha256, "env": run.env, "fence": run.fence,
               **run.delta_offer},
        timeout_s=run.config.get("install_timeout_s", DEFAULT_INSTALL_TIMEOUT_S),
    )
    failed = _note_outcomes(run, "install", outcomes)
    over = [w.name for w in run.waves if len(set(failed) & set(w.minions)) > w.budget]
    if over:
        budget = "" if all(w.budget == 0 for w in run.waves) else f" (over the failure budget of {', '.join(over)})"
        raise DeployError(f"install failed on {', '.join(failed)}{budget}: no node was switched")
    for wave in run.waves:
        wave.minions = [m for m in wave.minions if m not in failed]
    if failed:
        _say(run, f"left out {', '.join(failed)}: staging failed within the failure budget")


def activate(run):
    """The safe rollout: waves, batches, drain, switch, reload, verify, undrain."""
    _roll(run, {m: run.name for m in run.minions})


def prune(run):
    """
    After a good rollout: trim old releases on every node of the environment,
    then drop the staged artifacts no node has any more. Pruning never fails
    the deploy; when any node cannot say what it keeps, the master keeps all.
    """
    try:
        minions = [m for wave in rollout.plan_waves(__opts__, run.environment) for m in wave.minions]
    except (fleet.FleetError, KeyError, ValueError) as exc:
        run.facts["warnings"] = [f"pruned nothing: {exc}"]
        return
    keep = run.config.get("keep_releases")
    outcomes = fleet.run_on(__opts__, minions, "release.prune", arg=[run.project],
                            kwarg={"keep": keep} if keep else {},
                            timeout_s=run.config.get("timeout_s", DEFAULT_TIMEOUT_S))
    still_used = {run.name}
    for minion, (ok, value) in sorted(outcomes.items()):
        run.records.node_phase(run.record_id, minion, "prune", store.now(), 0.0, ok, None if ok else value)
        if ok:
            still_used.update(value["kept"])
            run.nodes.setdefault(minion, contract.node_result(True))["pruned"] = value["removed"]
    unsure = sorted(m for m, (ok, _) in outcomes.items() if not ok)
    if unsure:
        run.facts["warnings"] = [f"kept every staged artifact: no prune answer from {', '.join(unsure)}"]
        return
    run.facts["pruned_artifacts"] = retain.prune_artifacts(
        _release_opts()["artifact_root"], run.project, run.env, still_used)


def record(run):
    """The runner's return; ``retcode`` makes ``salt-run`` exit non-zero on any failure."""
    ok = run.error is None and bool(run.nodes) and all(n["result"] for n in run.nodes.values())
    ret = {
        "result": ok,
        "completed": run.error is None and bool(run.nodes),
        "project": run.project,
        "env": run.env,
        "ref": run.ref,
        "commit": run.commit,
        "release": run.name,
        "duration_s": round(time.monotonic() - run.started, 3),
        "nodes": run.nodes,
        "output": run.output,
        "retcode": 0 if ok else 1,
    }
    ret.update(run.facts)
    if not ok:
        ret["error"] = run.error or "no node was deployed"
        ret["failed_step"] = run.failed_step
    run.records.update_run(run.record_id, commit=run.commit, release=run.name)
    if ok and run.sha256:  # highstate's view of the environment (the release_fleet ext_pillar)
        published.record_fleet_release(
            run.state_dir, run.project, run.env, run.name, run.source_url, run.sha256, run.jid
        )
    run.records.finish_run(
        run.record_id, ok, ret["duration_s"], ret.get("error"),
        dict(run.facts, failed_step=run.failed_step, nodes=run.nodes),
    )
    _fire(run, ("finish",), {k: v for k, v in ret.items() if k != "output"})
    _say(run, f"{'DONE' if ok else 'FAILED'}: {run.name or run.ref} " + (ret.get("error") or ""))
    return ret


# ---------------------------------------------------------------- rollback


def rollback(project, env, to=None, emergency=False, author=None, wait=0, trigger="cli", **kwargs):
    """
    Send every node of an environment back to the release it ran before its
    current one (never one marked bad), or to release ``to`` (refused, with no
    node touched, unless every node has it). The releases left are marked bad.
    Normal mode goes through the environment's waves and batches with drain,
    switch, reload, health check and put-back; ``emergency=True`` switches
    every node at once with no drain. Holds the deploy lock; returns like
    ``release.deploy``.

    CLI Example:

    .. code-block:: bash

        salt-run release.rollback rainbow env=pro
        salt-run release.rollback rainbow env=pro to=rainbow_pro_v1.1.0_master_2026-11-26_101500_alice
        salt-run release.rollback rainbow env=pro emergency=True
    """
    run = _begin(project, env, to or "previous", author, trigger, kwargs, kind="rollback")
    run.to = to
    try:
        with _locked(run, "rollback", wait):
            if not emergency:
                steps = (plan, choose, switch_back)
            elif to:
                steps = (locate, choose, switch_all)
            else:  # the fastest path: one round trip, each node picks its own target
                steps = (locate, switch_all)
            for step in steps:
                _step(run, step)
    except DeployError as exc:
        run.error = run.error or str(exc)
    return record(run)


def choose(run):
    """Each node's target, from the nodes' own view (the one ``salt-call --local`` uses)."""
    listed = fleet.run_on(__opts__, run.minions, "release.list", arg=[run.project],
                          timeout_s=run.config.get("timeout_s", DEFAULT_TIMEOUT_S))
    try:
        run.targets = retain.rollback_targets(listed, run.to)
    except retain.RetentionError as exc:
        raise DeployError(str(exc))
    releases = sorted(set(run.targets.values()))
    _say(run, "rolling back to " + ", ".join(releases))
    if len(releases) == 1:  # the whole environment on one release: highstate's fleet release too
        run.name = releases[0]
        _find_staged(run)


def switch_back(run):
    """The rollout to each node's target, marking what it leaves bad."""
    switched = _roll(run, run.targets, rollback=True, force=bool(run.to))
    _mark_left_bad(run, switched)


def locate(run):
    """The environment's nodes, from the master's own view: no round trip to them."""
    try:
        run.waves = rollout.plan_waves(__opts__, run.environment)
    except (fleet.FleetError, KeyError, ValueError) as exc:
        raise DeployError(f"bad waves for {run.project}/{run.env}: {exc}")


def switch_all(run):
    """
    The emergency rollback: one switch call to every node, no drain; its
    duration is recorded. Without chosen targets each node goes back to its
    own rollback target in that same call.
    """
    engine = _engine(run, rollback=True, force=bool(run.to))
    started = time.monotonic()
    if run.targets:
        switched, failed = engine.switch_all(run.targets)
    else:
        switched, failed, landed = engine.rollback_all(run.minions)
        run.targets = {m: release for m, (release, _) in landed.items()}
        run.previous = {m: previous for m, (_, previous) in landed.items()}
        for minion, previous in run.previous.items():
            run.nodes[minion]["previous"] = previous
        if len(set(run.targets.values())) == 1:  # one release everywhere: highstate's fleet release
            run.name = next(iter(run.targets.values()))
            _find_staged(run)
    run.facts.update(emergency=True, switch_s=round(time.monotonic() - started, 3))
    _say(run, f"switched {len(switched)} node(s) in {run.facts['switch_s']} s")
    _mark_left_bad(run, switched)
    if failed:
        raise DeployError(f"emergency rollback failed on {', '.join(failed)}")


@_answers_errors
def status(project, env, **kwargs):
    """
    Per node of the environment: the current release, the previous one, the
    rollback target, bad marks and what else is kept; nodes out of step with
    the rest (or that did not answer) are flagged.

    CLI Example:

    .. code-block:: bash

        salt-run release.status rainbow env=pro
    """
    run = _begin(project, env, "status", None, "cli", kwargs, record=False)
    try:
        if run.error:
            raise DeployError(run.error)
        run.waves = rollout.plan_waves(__opts__, run.environment)
    except (DeployError, fleet.FleetError, KeyError, ValueError) as exc:
        return {"result": False, "error": str(exc), "retcode": 1}
    listed = fleet.run_on(__opts__, run.minions, "release.list", arg=[project],
                          timeout_s=run.config.get("timeout_s", DEFAULT_TIMEOUT_S))
    found = retain.status(listed)
    ok = all(answered for answered, _ in listed.values())
    return dict(found, result=ok, project=project, env=env, retcode=0 if ok else 1)


# ---------------------------------------------------------------- recovery


def recover(project, env, mode="finish", author=None, **kwargs):
    """
    Finish or undo the newest deploy or rollback of an environment after its
    runner (or its master) died mid-rollout. Reads the run's journal from the
    store and each node's real state (``release.list``, the load balancer's
    status), takes over the dead run's lock (recorded), then either switches
    the remaining nodes to the run's release (``mode=finish``) or sends the
    switched ones back (``mode=rollback``), through the same rollout; drained
    nodes that are healthy go back into the load balancer. The dead run is
    closed as failed, "recovered by" this one. Run it on either master when
    both share a PostgreSQL store.

    CLI Example:

    .. code-block:: bash

        salt-run release.recover rainbow env=pro
        salt-run release.recover rainbow env=pro mode=rollback
    """
    run = _begin(project, env, f"recover {mode}", author, "cli", kwargs, kind="recover")
    if not run.error and mode not in recovery.MODES:
        run.error, run.failed_step = f"mode must be one of {', '.join(recovery.MODES)}, not {mode!r}", "configure"
    dead = None
    try:
        dead = _dead_run(run)
        with _locked(run, f"recover ({mode}) of run {dead['id']}", 0, take_over=True):
            if not run.targets:
                _close_dead(run, dead, mode)
                raise recovery.NothingToRecover(f"run {dead['id']} died before its first switch: no node to recover")
            for step in (survey, finish if mode == "finish" else send_back, settle):
                _step(run, step)
    except recovery.NothingToRecover as exc:
        return _nothing_to_recover(run, str(exc))
    except DeployError as exc:
        run.error = run.error or str(exc)
    run.facts.update(recovered_run=dead and dead["id"], mode=mode)
    ret = record(run)
    if ret["result"]:  # a failed recovery leaves the dead run open, for another try
        _close_dead(run, dead, mode)
    return ret


def _close_dead(run, dead, mode):
    run.records.finish_run(dead["id"], False, None, (dead["error"] or "the run died mid-rollout")
                           + f"; recovered by run {run.record_id} ({mode}, {run.author})")


def _dead_run(run):
    """The run to recover and its journal (``run.targets``, ``run.previous``)."""
    if run.error:
        raise DeployError(run.error)
    dead = recovery.dead_run(run.records.runs(run.project, run.env, limit=50, kinds=recovery.RECOVERABLE))
    details = json.loads(dead["details"]) if dead["details"] else None
    journal = recovery.journal(details)
    run.facts["recovered_run"] = dead["id"]
    if journal:
        run.targets, run.previous = journal["targets"], journal["previous"]
        run.name, run.source_url, run.sha256 = dead["release"], journal["source_url"], journal["sha256"]
    _say(run, f"recovering run {dead['id']} ({dead['kind']} {dead['release'] or dead['ref']} "
              f"by {dead['who']}, jid {dead['jid']})")
    return dead


def survey(run):
    """Where the dead run left each node: its current release, and whether the load balancer has it down."""
    if not run.targets:
        return
    try:
        run.waves = rollout.plan_waves(__opts__, run.environment)
    except (fleet.FleetError, KeyError, ValueError) as exc:
        raise DeployError(f"bad waves for {run.project}/{run.env}: {exc}")
    _keep_in_waves(run, run.targets)
    run.hosts = _hosts(run)
    listed = fleet.run_on(__opts__, run.minions, "release.list", arg=[run.project],
                          timeout_s=run.config.get("timeout_s", DEFAULT_TIMEOUT_S))
    run.facts["found"] = {m: value.get("current") if ok else None for m, (ok, value) in listed.items()}
    try:
        run.facts["drained"] = _engine(run).drained(run.minions)
    except fleet.FleetError as exc:
        raise DeployError(str(exc))
    _say(run, f"found {run.facts['found']}; drained: {', '.join(run.facts['drained']) or 'none'}")


def finish(run):
    """Take every node the dead run left behind to its target, through the rollout."""
    found = run.facts.get("found") or {}
    todo = recovery.to_finish(run.targets, found, run.facts.get("drained", []))
    for minion in set(run.targets) - set(todo):
        run.nodes[minion] = contract.node_result(True, run.targets[minion], run.previous.get(minion))
    if todo:
        _keep_in_waves(run, todo)
        _roll(run, {m: run.targets[m] for m in todo})


def send_back(run):
    """Send the nodes the dead run switched back to their previous release; mark its release bad."""
    found = run.facts.get("found") or {}
    back = recovery.to_send_back(run.targets, run.previous, found)
    for minion in set(run.targets) - set(back):
        run.nodes[minion] = contract.node_result(True, found.get(minion), found.get(minion))
    run.targets, run.previous = back, {m: found.get(m) for m in run.targets}
    if back:
        _keep_in_waves(run, back)
        switched = _roll(run, back, rollback=True, force=True)
        run.records.mark_bad(run.project, run.env, sorted({found[m] for m in switched}), run.record_id)
    run.name = None if len(set(back.values())) != 1 else next(iter(back.values()))


def settle(run):
    """Nodes still drained go back into the load balancer when they serve their release."""
    if not run.environment.get("lb") or not run.nodes:
        return
    engine = _engine(run)
    drained = engine.drained(sorted(run.nodes))
    if drained:
        releases = {m: run.nodes[m]["release"] for m in drained}
        run.facts["put_back"] = engine.settle(drained, releases)


def _keep_in_waves(run, minions):
    for wave in run.waves:
        wave.minions = [m for m in wave.minions if m in minions]


def _nothing_to_recover(run, comment):
    run.records.finish_run(run.record_id, True, round(time.monotonic() - run.started, 3), None, {"comment": comment})
    return {"result": True, "project": run.project, "env": run.env, "comment": comment, "retcode": 0}


def _roll(run, targets, **activate_kwarg):
    """Switch nodes to ``targets`` through the rollout; returns the nodes that ended on their target."""
    _journal(run, targets)
    outcome = _engine(run, **activate_kwarg).forward(run.waves, targets)
    for minion in targets:
        was = run.previous.get(minion)
        node = run.nodes.setdefault(minion, contract.node_result(True, was, was))
        if node.get("phase") in (None, "install"):
            node.update(result=False, error="not switched: the rollout stopped before its batch")
    if outcome.reverted:
        _say(run, f"rolled back {', '.join(outcome.reverted)}")
    if outcome.stopped and outcome.reverted:
        # A release the rollout gave up on is bad; one that failed on a node within the
        # failure budget still runs on the others and stays eligible.
        run.records.mark_bad(run.project, run.env, sorted({targets[m] for m in outcome.reverted}), run.record_id)
    if outcome.stopped:
        raise DeployError(outcome.stopped + ("; switched nodes were rolled back" if outcome.reverted else ""))
    return [m for m in outcome.switched if m not in outcome.reverted]


def _journal(run, targets):
    """Before the first switch, what ``release.recover`` needs: each node's target and previous release."""
    run.records.update_run(run.record_id, details={"journal": {
        "targets": dict(targets), "previous": {m: run.previous.get(m) for m in targets},
        "source_url": run.source_url, "sha256": run.sha256,
    }})


def _engine(run, **activate_kwarg):
    engine = rollout.Rollout(
        __opts__, run.project, run.env, run.environment, run.hosts, run.previous,
        run.fence, _reporter(run), lambda message: _say(run, message),
    )
    engine.activate_kwarg = activate_kwarg
    return engine


def _mark_left_bad(run, switched):
    left = retain.left_behind(run.previous, run.targets, switched)
    if left:
        run.records.mark_bad(run.project, run.env, left, run.record_id)
        _say(run, f"marked bad: {', '.join(left)}")
    if run.to:
        run.records.clear_bad(run.project, run.env, run.to)


def _find_staged(run):
    """The staged artifact of ``run.name`` and its checksum, when the master still has them."""
    conf = _release_opts()
    tarball = os.path.join(conf["artifact_root"], run.project, f"{run.name}.tar.gz")
    try:
        with open(published.checksum_path(tarball), encoding="utf-8") as handle:
            run.sha256 = published.parse_checksum(handle.read())
        run.source_url = _source_url(conf, run.project, run.name)
    except (OSError, artifact.ArtifactError):
        run.sha256 = None


# ---------------------------------------------------------------- history and statistics


@_answers_errors
def history(project, env=None, limit=20, phases=False, **kwargs):
    """
    The latest runs of a project (deploys, rollbacks, unlocks, refused
    attempts), newest first; ``phases=True`` adds each run's node phases.

    CLI Example:

    .. code-block:: bash

        salt-run release.history rainbow env=pro limit=5 phases=True
    """
    records = _records(_release_opts())
    runs = [_readable(row) for row in records.runs(project, env, limit)]
    if phases:
        for row in runs:
            row["phases"] = records.phases(row["id"])
    return {"result": True, "project": project, "env": env, "runs": runs, "retcode": 0}


@_answers_errors
def stats(project, env=None, days=30, **kwargs):
    """
    Deployment statistics over the last ``days`` days: deploys, failures,
    rollbacks, success rate, median and 95th-percentile duration, and the mean
    time to recover (failed deploy to the next good release).

    CLI Example:

    .. code-block:: bash

        salt-run release.stats rainbow env=pro days=90
    """
    figures = stats_lib.summarize(_recent_runs(project, env, days))
    return dict(figures, result=True, project=project, env=env, days=days, retcode=0)


@_answers_errors
def report(project, out, env=None, days=30, **kwargs):
    """
    Write one self-contained HTML page (inline SVG, no script, no external
    asset): the deploy timeline, the last run's node phases as a Gantt chart,
    the release spread per environment (asked of the nodes now) and the
    statistics.

    CLI Example:

    .. code-block:: bash

        salt-run release.report rainbow out=/var/www/reports/rainbow.html
    """
    conf = _release_opts()
    records = _records(conf)
    rows = _recent_runs(project, env, days)
    last = next((r for r in rows if r["kind"] in ("deploy", "rollback") and records.phases(r["id"])), None)
    page = report_page.render(
        project, rows, last, records.phases(last["id"]) if last else [],
        _spread(conf, project, env), stats_lib.summarize(rows),
    )
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(page)
    os.replace(tmp, out)
    return {"result": True, "project": project, "out": out, "runs": len(rows), "retcode": 0}


def _recent_runs(project, env, days):
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=float(days))
    return _records(_release_opts()).runs(
        project, env, limit=100000, since=since.isoformat(timespec="milliseconds"))


def _spread(conf, project, env):
    """``{env: {minion: current release}}`` for the project's environments that have nodes."""
    environments = (conf["projects"].get(project) or {}).get("environments") or {}
    spread = {}
    for name in [env] if env else sorted(environments):
        try:
            minions = [m for w in rollout.plan_waves(__opts__, environments[name]) for m in w.minions]
        except (fleet.FleetError, KeyError, ValueError):
            continue
        outcomes = fleet.run_on(__opts__, minions, "release.current", arg=[project], timeout_s=DEFAULT_TIMEOUT_S)
        spread[name] = {m: value if ok else None for m, (ok, value) in outcomes.items()}
    return spread


def _readable(row):
    row = dict(row)
    row["details"] = json.loads(row["details"]) if row.get("details") else None
    return row


# ---------------------------------------------------------------- helpers


def _name(run):
    """Name the release after its fields and the time it is built; returns that time."""
    built_at = datetime.datetime.now(datetime.timezone.utc)
    run.name = contract.release_name(run.project, run.env, run.version, run.branch, built_at, run.author)
    return built_at


def _plan_only(project, env, ref, author):
    """What a deploy would do, with nothing changed: no lock, no artifact, no node touched."""
    run = _begin(project, env, ref, author, "plan", {}, record=False)
    try:
        if run.error:
            raise DeployError(run.error)
        for step in (fetch, plan):
            _step(run, step)
    except DeployError as exc:
        return {"result": False, "test": True, "error": str(exc), "failed_step": run.failed_step, "retcode": 1}
    _name(run)
    lb = run.environment.get("lb")
    return {
        "result": True,
        "test": True,
        "project": project,
        "env": env,
        "ref": run.ref,
        "commit": run.commit,
        "release": run.name,
        "waves": [
            {"name": w.name, "batches": w.batches, "max_failures": w.budget, "bake_s": w.bake_s}
            for w in run.waves
        ],
        "nodes": {m: {"current": run.previous.get(m), "new": run.name} for m in run.minions},
        "load_balancer": (
            f"{lb.get('kind', 'nginx')} on {lb['minion']}: each batch drained in "
            f"{lb['upstream_file']} before its switch and put back after its health check"
        ) if lb else None,
        "retcode": 0,
    }


def _current_releases(run):
    """The release each node runs now (None for a first deploy or a node that did not answer)."""
    outcomes = fleet.run_on(__opts__, run.minions, "release.current", arg=[run.project],
                            timeout_s=run.config.get("timeout_s", DEFAULT_TIMEOUT_S))
    return {minion: value if ok else None for minion, (ok, value) in outcomes.items()}


def _hosts(run):
    """Each node's address for health checks and the load balancer, read from a grain."""
    if not (run.environment.get("health") or run.environment.get("lb")):
        return {}
    grain = run.environment.get("host_grain", rollout.DEFAULT_HOST_GRAIN)
    grains = __salt__["cache.grains"](tgt=",".join(run.minions), tgt_type="list")
    hosts = {m: rollout.grain_value(grains.get(m) or {}, grain) for m in run.minions}
    unknown = [m for m, host in hosts.items() if not host]
    if unknown:
        raise DeployError(f"no '{grain}' grain in the master's cache for {', '.join(unknown)}")
    return hosts


def _reporter(run):
    """
    The rollout's report callback: it keeps run.nodes, writes the phase to
    the records, and fires the events the nodes cannot fire themselves.
    """

    def report(minion, phase, ok, duration_s, error, release, **extra):
        node = run.nodes.setdefault(
            minion, contract.node_result(True, release=run.previous.get(minion), previous=run.previous.get(minion))
        )
        # duration_s: the time this node's phases took in this run, all phases together.
        node.update(phase=phase, duration_s=round((node.get("duration_s") or 0) + (duration_s or 0), 3))
        if ok and phase in ("activate", "rollback") or phase == "readback":  # readback: what the node runs
            node["release"] = release
        if ok and phase == "rollback":
            node.update(result=False, rolled_back=True)
            node["error"] = node.get("error") or "rolled back: the rollout stopped"
        if not ok:
            node.update(result=False, error=error)
        run.records.node_phase(run.record_id, minion, phase, store.now(), duration_s, ok, error)
        if phase in CONDUCTOR_PHASES or not ok and fleet.unreachable(error):
            _fire(run, (minion, phase), contract.phase_event(release, ok, duration_s or 0, error))

    return report


def _public_owner(owner):
    """A lock record without its token: the token is what lets its holder release it."""
    return {k: v for k, v in (owner or {}).items() if k != "token"}


def _release_opts():
    conf = dict(__opts__.get("release") or {})
    conf.setdefault("state_dir", os.path.join(__opts__["cachedir"], "release"))
    if not conf.get("artifact_root"):
        roots = __opts__["file_roots"].get("base") or []
        if not roots:
            raise DeployError("release:artifact_root is not set and file_roots has no base directory")
        conf["artifact_root"] = os.path.join(roots[0], "releases")
    conf.setdefault("projects", {})
    return conf


def _records(conf):
    """The history store ``release:store`` names (sqlite by default, or a shared PostgreSQL)."""
    try:
        return store.Store(conf["state_dir"], conf.get("store", "sqlite"))
    except Exception as exc:  # noqa: BLE001  # psycopg2's errors, a bad URL: said without the URL's password
        raise DeployError(f"cannot open the release store {store.safe_url(conf.get('store'))}: "
                          f"{store.safe_url(exc)}")


def _source_url(conf, project, name):
    """
    Where nodes fetch a staged artifact: the HTTP artifact base when set (the
    project's, else the master's), else the master's own fileserver.
    """
    base = (conf["projects"].get(project) or {}).get("artifact_url") or conf.get("artifact_url")
    if base:
        return f"{base.rstrip('/')}/{project}/{name}.tar.gz"
    return artifact.salt_url(conf["artifact_root"], __opts__["file_roots"].get("base", []), project, name)


def _begin(project, env, ref, author, trigger, kwargs, record=True, kind="deploy"):
    conf = _release_opts()
    config = conf["projects"].get(project)
    run = Run(
        project=project, env=env, ref=str(ref), author=author or getpass.getuser(),
        config=config or {}, environment={}, state_dir=conf["state_dir"],
        jid=kwargs.get("__pub_jid") or _jid(), trigger=trigger, kind=kind,
    )
    if record:
        run.records = _records(conf)
        run.record_id = run.records.start_run(run.kind, project, env, trigger, run.author, run.jid, run.ref)
    if config is None:
        run.error = f"unknown project {project!r}: not under release:projects in the master config"
    elif env not in (config.get("environments") or {}):
        known = ", ".join(sorted(config.get("environments") or {})) or "none"
        run.error = f"project {project} has no environment {env!r} (known: {known})"
    else:
        run.environment = config["environments"][env]
    if run.error:
        run.failed_step = "configure"
    return run


class _locked:
    """
    Hold the project+env lock for the run; only ever release our own token.
    ``take_over`` (recover) breaks a lock whose holder is dead. A lock taken
    from a dead holder, which PostgreSQL's session lock knows for certain, is
    recorded as an unlock.
    """

    def __init__(self, run, reason, wait, take_over=False):
        self.run, self.reason, self.wait, self.take_over = run, reason, wait, take_over
        self.locks = run.records.locks() if run.records else None
        self.owner = None

    def __enter__(self):
        if self.run.error:
            raise DeployError(self.run.error)
        try:
            self.owner = self._acquire()
            self.run.fence = self.owner["fence"]
        except locking.LockHeld as exc:
            self.run.failed_step = "lock"
            raise DeployError(f"{self.run.project}/{self.run.env} is {exc}")
        if self.owner.get("took_over"):
            self._record_take_over(self.owner.pop("took_over"))
        _fire(self.run, ("start",), {"ref": self.run.ref, "author": self.run.author, "jid": self.run.jid})
        return self.owner

    def _acquire(self):
        run = self.run
        args = (run.project, run.env, run.author, run.jid, f"{self.reason} {run.ref}")
        try:
            return self.locks.acquire(*args, wait_s=self.wait)
        except locking.LockHeld as exc:
            ttl_s = float(run.config.get("lock_ttl_s", DEFAULT_LOCK_TTL_S))
            if not self.take_over or self.locks.holder_alive(run.project, run.env, exc.owner, ttl_s):
                raise
        broken = self.locks.remove(run.project, run.env)
        return dict(self.locks.acquire(*args), took_over=broken)

    def _record_take_over(self, dead):
        dead = _public_owner(dead)
        self.run.records.record("unlock", self.run.project, self.run.env, result=True, who=self.run.author,
                                jid=self.run.jid, details={"broken": dead, "dead_holder": True, "by": self.reason})
        _say(self.run, f"took over the lock of a dead holder: {locking.describe(dead)}")

    def __exit__(self, *exc_info):
        if self.owner:
            self.locks.release(self.run.project, self.run.env, self.owner["token"])
        return False


def _step(run, step):
    try:
        step(run)
    except DeployError:
        run.failed_step = run.failed_step or step.__name__
        raise
    except artifact.ArtifactError as exc:
        run.failed_step = step.__name__
        if exc.tail:
            run.output[step.__name__] = exc.tail
        raise DeployError(str(exc))


def _commands(run, key):
    commands = run.config.get(key) or []
    if not commands:
        return
    timeout_s = run.config.get("build_timeout_s", DEFAULT_BUILD_TIMEOUT_S)
    try:
        run.output[key] = artifact.run_commands(commands, run.tree, key, timeout_s)
    except artifact.ArtifactError as exc:
        # Keep the tail under the config key ("checks"), as a passing run does.
        run.output[key] = exc.tail
        raise DeployError(str(exc))
    _say(run, f"{key}: {len(commands)} command(s) passed")


def _note_outcomes(run, phase, outcomes):
    """Report each node's outcome of a phase run on all nodes at once; returns the failed minions."""
    report = _reporter(run)
    for minion, (ok, value) in sorted(outcomes.items()):
        report(minion, phase, ok, value.get("duration_s") if ok else None, None if ok else value, run.name)
    return [minion for minion, (ok, _) in sorted(outcomes.items()) if not ok]


def _cleanup(run):
    """Remove the build tree, and the tarball when the run stopped before staging it."""
    if run.tree and os.path.isdir(run.tree):
        shutil.rmtree(run.tree, ignore_errors=True)
    if run.tarball and os.path.dirname(run.tarball) == run.builds and os.path.exists(run.tarball):
        os.unlink(run.tarball)


def _say(run, message):
    """A live progress line: ``salt-run`` prints it as it comes."""
    log.info("release %s/%s: %s", run.project, run.env, message)
    jid_event = globals().get("__jid_event__")
    if jid_event is not None:
        jid_event.fire_event({"message": message}, "progress")


def _fire(run, parts, data):
    tag = contract.event_tag(run.project, run.env, *parts)
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=False) as bus:
        bus.fire_event(data, tag)


def _jid():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S%f")


# ---------------------------------------------------------------- webhook


def webhook(project, body="", headers=None, gitlab_token_sha256=None, **kwargs):
    """
    Deploy what a verified git push asks for; called by the reactor on
    ``salt/netapi/hook/release/<project>`` (see ``salt/reactor/release_webhook.sls``).
    Refusals fire ``release/<project>/webhook/refused`` and leave a history row.

    CLI Example (what the reactor runs):

    .. code-block:: bash

        salt-run release.webhook rainbow body='{"ref": "refs/heads/dev", ...}' \\
            headers='{"X-Hub-Signature-256": "sha256=...", "X-Github-Event": "push"}'
    """
    conf = _release_opts()
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
    try:
        push = hook.read_push(project, raw, headers or {}, conf["projects"], gitlab_token_sha256)
        if not hook.claim_delivery(conf["state_dir"], project, push["keys"]):
            raise hook.Ignored(f"delivery {push['delivery'] or '(no id)'} was handled before")
    except hook.Refused as exc:
        return _refuse_webhook(conf, project, exc.reason, str(exc))
    except hook.Ignored as exc:
        return {"result": True, "project": project, "deploys": {}, "comment": str(exc), "retcode": 0}
    deploys = {
        env: deploy(project, env, push["ref"], author=push["author"], trigger="webhook")
        for env in push["envs"]
    }
    if any(ret.get("failed_step") == "lock" for ret in deploys.values()):
        hook.forget_delivery(conf["state_dir"], project, push["keys"])  # a redelivery may deploy
        _refuse_webhook(conf, project, "locked", "; ".join(r["error"] for r in deploys.values() if r.get("error")),
                        record=False)  # deploy() already wrote the history row
    ok = all(ret["result"] for ret in deploys.values())
    return {"result": ok, "project": project, "ref": push["ref"], "author": push["author"],
            "delivery": push["delivery"], "deploys": deploys, "retcode": 0 if ok else 1}


def _refuse_webhook(conf, project, reason, error, record=True):
    """Say no on the bus and in the history; never with the request's headers or secret."""
    name = contract.sanitize_field(project)
    data = {"project": name, "reason": reason, "error": error}
    if record:
        _records(conf).record("refused", name, result=False, error=error,
                                              trigger="webhook", details={"reason": reason})
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=False) as bus:
        bus.fire_event(data, contract.event_tag(name, "webhook", "refused"))
    return dict(data, result=False, refused=True, retcode=1)
