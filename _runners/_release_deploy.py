"""
The deploy pipeline, one short function per step, run in this order under
the deploy lock (``STEPS``)::

    fetch -> screen -> build -> check -> package -> stage -> plan -> delta
          -> config_check -> install -> rollout -> prune

then ``_release_run.conclude`` (return, history, published release).
``diff=True`` is a dry run (``DIFF_STEPS``, a ``plan`` record that no
statistic counts, no published release): the artifact is staged only for the
nodes' config check and removed after it, nodes keep nothing, and each node
reports which config files would change (names and sha256, never contents).
``install`` stages the release on every node before any node
switches; ``rollout`` is the safe rollout (``_release_rollout.py``): wave by
wave, batch by batch, each node drained, switched, reloaded, verified and put
back. The rollback pipeline reuses ``plan``.
"""

import datetime
import os
import shutil
import time

import _release_artifact as artifact
import _release_builds as builds_lib
import _release_config_check as config_dry_run
import _release_fleet as fleet
import _release_prune as prune_lib
import _release_rollout as rollout_lib
import _release_run as runs
import _release_sandbox as sandbox
import _release_source as source
import _release_store as store
import _release_switch as switch
import release_contract as contract
import release_health as health_lib
import release_published as published

DeployError = runs.DeployError


def deploy(run, wait, diff=False):
    """The whole pipeline under the lock; the build tree is removed whatever happens."""
    steps = DIFF_STEPS if diff else STEPS
    if diff:
        run.facts["dry_run"] = True
    try:
        with runs.Locked(run, "diff" if diff else "deploy", wait):
            runs.run_steps(run, steps)
    except DeployError as exc:
        run.error = run.error or str(exc)
    finally:
        _cleanup(run)
    return runs.conclude(run)


def fetch(run):
    """Update the project's mirror and resolve the ref to a commit."""
    try:
        ref = source.validate_ref(run.ref)
        repo = source.update_mirror(run.state_dir, run.project, run.config["repo"])
        run.commit, run.ref_name, run.full_ref = source.resolve(repo, ref)
        _check_expected(run, repo)
        run.version = source.describe(repo, run.commit)
    except source.SourceError as exc:
        raise DeployError(str(exc))
    runs.say(run, f"fetched {run.ref} = {run.commit[:12]} ({run.version})")


def _check_expected(run, repo):
    """
    A webhook deploys the commit it was told of, or nothing: a newer push has
    its own hook. A tag push's ``after`` may be the annotated tag's own id.
    """
    if run.expect_commit and run.expect_commit not in (run.commit, source.ref_object(repo, run.full_ref)):
        raise DeployError(
            f"{run.ref} is now {run.commit[:12]}, not the pushed {str(run.expect_commit)[:12]}: "
            "a newer push raced this one and deploys on its own hook"
        )


def screen(run):
    """Refuse a commit whose release was rolled back from in this environment, unless forced."""
    bad = [name for name, commit in run.records.bad_releases(run.project, run.env).items() if commit == run.commit]
    if bad and not run.force:
        raise DeployError(
            f"commit {run.commit[:12]} is release {', '.join(bad)}, marked bad by a rollback in "
            f"{run.env}: pass force=True to deploy it again"
        )


def build(run):
    """
    Export the commit's tree (no .git) into this run's build folder, after
    removing those of dead runs, and run the project's build commands in it.
    """
    removed = builds_lib.sweep(run.builds)
    if removed:
        runs.say(run, f"removed {len(removed)} build(s) left by dead runs")
    run.build = builds_lib.Build(run.builds)
    run.tree = os.path.join(run.build.path, "tree")
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
    built_at = name_release(run)
    doc = {
        "name": run.name, "project": run.project, "env": run.env, "ref": run.ref,
        "commit": run.commit, "version": run.version, "branch": run.ref_name, "full_ref": run.full_ref,
        "author": run.author, "built_at": built_at.isoformat(timespec="seconds"),
    }
    run.tarball = os.path.join(run.build.path, f"{run.name}.tar.gz")
    run.sha256, run.manifest = artifact.package(run.tree, doc, run.tarball)
    run.records.update_run(run.record_id, commit=run.commit, release=run.name)
    runs.say(run, f"packaged {run.name} ({run.manifest['file_count']} files, sha256 {run.sha256[:12]})")


def stage(run):
    """Put the tarball where the master's fileserver serves it."""
    try:
        run.source_url = switch.source_url(run, run.name)
    except artifact.ArtifactError as exc:
        raise DeployError(str(exc))
    dest = os.path.join(run.conf["artifact_root"], run.project, f"{run.name}.tar.gz")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.chmod(run.tarball, 0o640)  # read only by the master's fileserver (root)
    shutil.move(run.tarball, dest)
    run.tarball = dest
    published.write_checksum(dest, run.sha256)  # so highstate can name a release without its hash


def plan(run):
    """Find each wave's nodes, cut them into batches and read what each node runs now."""
    survey(run)
    run.previous = current_releases(run)


def survey(run):
    """Each wave's nodes and batches and each node's address, from the master's own view: no round trip."""
    run.waves = switch.waves(run)
    run.hosts = hosts(run)
    for wave in run.waves:
        batches = " | ".join(", ".join(batch) for batch in wave.batches)
        runs.say(run, f"wave {wave.name}: {batches} (may fail: {wave.budget})")


def delta(run):
    """Stage a delta against the release most nodes run, so they fetch only what changed."""
    if run.config.get("delta", True):
        run.delta_offer, said = artifact.stage_delta(
            run.tarball, run.tree, run.manifest, run.previous, lambda name: switch.source_url(run, name))
        runs.say(run, said)


def config_check(run):
    """Every node renders its config in a dry run; one that cannot stops the deploy untouched."""
    dry_run = run.kind == "plan"
    outcomes = config_dry_run.preflight(
        run.opts, run.minions, run.project, run.name, run.source_url, run.sha256, run.env,
        run.config["install_timeout_s"], run.delta_offer, keep=not dry_run,
    )
    # Strict, whatever the waves' failure budgets: a config error is in pillar or
    # templates, and would fail the same way on the next node.
    failed = runs.note_outcomes(run, "configure", outcomes)
    for minion, (ok, value) in sorted(outcomes.items()):
        if ok:
            run.nodes[minion]["files"] = value["files"]
            runs.say(run, f"{minion} config: {config_dry_run.summary(value['files'])}")
        if dry_run:  # a node's file list and sha256 (or its error), nothing of a release it never got
            keys = ("result", "files") if ok else ("result", "error")
            run.nodes[minion] = {k: run.nodes[minion][k] for k in keys}
    if failed:
        raise DeployError(f"config check failed on {', '.join(failed)}: no node was touched")


def install(run):
    """
    Stage the release on every node of every wave, in parallel, before any
    node switches. A node that cannot stage stops the deploy, unless its
    wave's failure budget allows leaving it out.
    """
    outcomes = fleet.run_on(
        run.opts, run.minions, "release.install", arg=[run.project, run.name],
        kwarg={"source": run.source_url, "source_hash": run.sha256, "env": run.env, "fence": run.fence,
               **run.delta_offer},
        timeout_s=run.config["install_timeout_s"],
    )
    failed = runs.note_outcomes(run, "install", outcomes)
    over = [w.name for w in run.waves if len(set(failed) & set(w.minions)) > w.budget]
    if over:
        budget = "" if all(w.budget == 0 for w in run.waves) else f" (over the failure budget of {', '.join(over)})"
        raise DeployError(f"install failed on {', '.join(failed)}{budget}: no node was switched")
    for wave in run.waves:
        wave.minions = [m for m in wave.minions if m not in failed]
    if failed:
        runs.say(run, f"left out {', '.join(failed)}: staging failed within the failure budget")


def rollout(run):
    """The safe rollout: waves, batches, drain, switch, reload, verify, undrain."""
    switch.roll(run, {m: run.name for m in run.minions})


def prune(run):
    """
    After a good rollout: trim old releases on every node of the environment,
    then drop the staged artifacts no node has any more. Pruning never fails
    the deploy; when any node cannot say what it keeps, the master keeps all.
    """
    try:
        minions = [m for wave in rollout_lib.plan_waves(run.opts, run.environment) for m in wave.minions]
    except (fleet.FleetError, KeyError, ValueError) as exc:
        run.facts["warnings"] = [f"pruned nothing: {exc}"]
        return
    keep = run.config.get("keep_releases")
    started, began = store.now(), time.monotonic()
    outcomes = fleet.run_on(run.opts, minions, "release.prune", arg=[run.project],
                            kwarg={"keep": keep} if keep else {}, timeout_s=run.config["timeout_s"])
    took = round(time.monotonic() - began, 3)
    still_used = {run.name}
    for minion, (ok, value) in sorted(outcomes.items()):
        run.records.node_phase(run.record_id, minion, "prune", started, took, ok, None if ok else value)
        if ok:
            still_used.update(value["kept"])
            run.nodes.setdefault(minion, contract.node_result(True))["pruned"] = value["removed"]
    unsure = sorted(m for m, (ok, _) in outcomes.items() if not ok)
    if unsure:
        run.facts["warnings"] = [f"kept every staged artifact: no prune answer from {', '.join(unsure)}"]
        return
    run.facts["pruned_artifacts"] = prune_lib.prune_artifacts(
        run.conf["artifact_root"], run.project, run.env, still_used)


STEPS = (fetch, screen, build, check, package, stage, plan, delta, config_check, install, rollout, prune)
DIFF_STEPS = (fetch, screen, build, check, package, stage, plan, config_check)


def plan_only(run):
    """What a deploy would do (``test=True``): no lock, no artifact, no node touched."""
    try:
        if run.error:
            raise DeployError(run.error)
        runs.run_steps(run, (fetch, plan))
    except DeployError as exc:
        return {"result": False, "test": True, "error": str(exc), "failed_step": run.failed_step, "retcode": 1}
    name_release(run)
    lb = run.environment.get("lb")
    return {
        "result": True, "test": True, "project": run.project, "env": run.env,
        "ref": run.ref, "commit": run.commit, "release": run.name,
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


def name_release(run):
    """Name the release after its fields and the time it is built; returns that time."""
    built_at = datetime.datetime.now(datetime.timezone.utc)
    run.name = contract.release_name(run.project, run.env, run.version, run.ref_name, built_at, run.author)
    return built_at


def current_releases(run):
    """The release each node runs now (None for a first deploy or a node that did not answer)."""
    outcomes = fleet.run_on(run.opts, run.minions, "release.current", arg=[run.project],
                            timeout_s=run.config["timeout_s"])
    return {minion: value if ok else None for minion, (ok, value) in outcomes.items()}


def hosts(run):
    """Each node's address for health checks and the load balancer, read from a grain in the master's cache."""
    if not (run.environment.get("health") or run.environment.get("lb")):
        return {}
    grain = run.environment.get("host_grain", health_lib.DEFAULT_HOST_GRAIN)
    grains = run.functions["cache.grains"](tgt=",".join(run.minions), tgt_type="list")
    found = {m: health_lib.grain_value(grains.get(m) or {}, grain) for m in run.minions}
    unknown = [m for m, host in found.items() if not host]
    if unknown:
        raise DeployError(f"no '{grain}' grain in the master's cache for {', '.join(unknown)}")
    return found


def _commands(run, key):
    commands = run.config.get(key) or []
    if not commands:
        return
    try:
        jail = sandbox.jail_for(run.config, run.conf, run.opts)
        run.output[key] = artifact.run_commands(commands, run.tree, key, run.config["build_timeout_s"], jail=jail)
    except artifact.ArtifactError as exc:
        # Keep the tail under the config key ("checks"), as a passing run does.
        run.output[key] = exc.tail
        raise DeployError(str(exc))
    runs.say(run, f"{key}: {len(commands)} command(s) passed")


def _cleanup(run):
    """
    Remove the run's build folder (its tree, and its tarball when the run
    stopped before staging it); a dry run's staged tarball and checksum go too.
    """
    if run.build:
        run.build.remove()
    if run.tarball and run.kind == "plan":
        for path in (run.tarball, published.checksum_path(run.tarball)):
            if os.path.exists(path):
                os.unlink(path)
