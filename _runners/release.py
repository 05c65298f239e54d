"""
salt-release: ship a git ref to a Salt-managed web cluster, in batches, with an
atomic switch on every node.

A deploy is a pipeline of named steps, each one short function below:

    lock -> fetch -> build -> check -> package -> stage -> plan -> install -> activate -> record

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
import getpass
import logging
import os
import shutil
import time
import uuid

import salt.utils.event

import _release_artifact as artifact
import _release_fleet as fleet
import _release_lock as locking
import _release_source as source
import _release_store as store

try:  # installed with pip: salt_release is an ordinary package
    from salt_release.utils import release_contract as contract
except ImportError:  # synced: Salt puts extmods/utils on sys.path while loading
    import release_contract as contract

log = logging.getLogger(__name__)

__virtualname__ = "release"

DEFAULT_BUILD_TIMEOUT_S = 1800
DEFAULT_INSTALL_TIMEOUT_S = 300
DEFAULT_TIMEOUT_S = 60


def __virtual__():
    return __virtualname__


class DeployError(Exception):
    """A step that failed; the run stops and every node keeps the release it had."""


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
    batches: list = dataclasses.field(default_factory=list)
    nodes: dict = dataclasses.field(default_factory=dict)
    output: dict = dataclasses.field(default_factory=dict)
    error: str = None
    failed_step: str = None
    kind: str = "deploy"
    trigger: str = "cli"
    record_id: int = None
    records: store.Store = None

    @property
    def minions(self):
        return [minion for batch in self.batches for minion in batch]


# ---------------------------------------------------------------- public


def deploy(project, env, ref, author=None, wait=0, trigger="cli", **kwargs):
    """
    Deploy a git ref (branch, tag or commit) of a project to an environment.

    CLI Example:

    .. code-block:: bash

        salt-run release.deploy rainbow env=test ref=v1.1.0
        salt-run release.deploy rainbow env=pro ref=master author=alice
    """
    run = _begin(project, env, ref, author, trigger, kwargs)
    try:
        with _locked(run, "deploy", wait):
            for step in (fetch, build, check, package, stage, plan, install, activate):
                _step(run, step)
    except DeployError as exc:
        run.error = run.error or str(exc)
    finally:
        _cleanup(run)
    return record(run)


# ---------------------------------------------------------------- steps


def fetch(run):
    """Update the project's mirror and resolve the ref to a commit."""
    try:
        ref = source.validate_ref(run.ref)
        repo = source.update_mirror(run.state_dir, run.project, run.config["repo"])
        run.commit, run.branch = source.resolve(repo, ref)
        run.version = source.describe(repo, run.commit)
        run.tree = os.path.join(run.state_dir, "builds", uuid.uuid4().hex)
        source.export(repo, run.commit, run.tree)
    except source.SourceError as exc:
        raise DeployError(str(exc))
    _say(run, f"fetched {run.ref} = {run.commit[:12]} ({run.version})")


def build(run):
    """Run the project's build commands in the exported tree."""
    _commands(run, "build")


def check(run):
    """Run the quality gate; a failure stops the deploy before any node is touched."""
    _commands(run, "checks")


def package(run):
    """Name the release and write its tarball with the manifest."""
    built_at = datetime.datetime.now(datetime.timezone.utc)
    run.name = contract.release_name(
        run.project, run.env, run.version, run.branch, built_at, run.author
    )
    doc = {
        "name": run.name, "project": run.project, "env": run.env, "ref": run.ref,
        "commit": run.commit, "version": run.version, "branch": run.branch,
        "author": run.author, "built_at": built_at.isoformat(timespec="seconds"),
    }
    run.tarball = os.path.join(run.state_dir, "builds", f"{run.name}.tar.gz")
    run.sha256, run.manifest = artifact.package(run.tree, doc, run.tarball)
    run.records.update_run(run.record_id, commit=run.commit, release=run.name)
    _say(run, f"packaged {run.name} ({run.manifest['file_count']} files, sha256 {run.sha256[:12]})")


def stage(run):
    """Put the tarball where the master's fileserver serves it."""
    root = _release_opts()["artifact_root"]
    try:
        run.source_url = artifact.salt_url(root, __opts__["file_roots"].get("base", []), run.project, run.name)
    except artifact.ArtifactError as exc:
        raise DeployError(str(exc))
    dest = os.path.join(root, run.project, f"{run.name}.tar.gz")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(run.tarball, dest)
    run.tarball = dest


def plan(run):
    """Find the environment's nodes and cut them into batches."""
    try:
        minions = fleet.resolve_targets(
            __opts__, run.environment["target"], run.environment.get("tgt_type", "glob")
        )
        run.batches = fleet.batches(minions, run.environment.get("batch", "100%"))
    except fleet.FleetError as exc:
        raise DeployError(str(exc))
    _say(run, f"{len(minions)} node(s) in {len(run.batches)} batch(es): {', '.join(minions)}")


def install(run):
    """Stage the release on every node before any node switches."""
    started_at = store.now()
    outcomes = fleet.run_on(
        __opts__, run.minions, "release.install", arg=[run.project, run.name],
        kwarg={"source": run.source_url, "source_hash": run.sha256, "env": run.env},
        timeout_s=run.config.get("install_timeout_s", DEFAULT_INSTALL_TIMEOUT_S),
    )
    failed = _note_outcomes(run, "install", started_at, outcomes)
    if failed:
        raise DeployError(f"install failed on {', '.join(failed)}: no node was switched")


def activate(run):
    """Switch ``current`` batch by batch; a failed batch stops the later ones."""
    done = 0
    for number, batch in enumerate(run.batches, 1):
        started_at = store.now()
        outcomes = fleet.run_on(
            __opts__, batch, "release.activate", arg=[run.project, run.name],
            kwarg={"env": run.env}, timeout_s=run.config.get("timeout_s", DEFAULT_TIMEOUT_S),
        )
        failed = _note_outcomes(run, "activate", started_at, outcomes)
        for minion in batch:
            done += 1
            node = run.nodes[minion]
            verb = "activated" if node["result"] else f"FAILED ({node['error']})"
            _say(run, f"[{done}/{len(run.minions)}] {minion} {verb} {run.name} in {node['duration_s']} s")
        if failed:
            raise DeployError(
                f"activate failed on {', '.join(failed)} in batch {number}/{len(run.batches)}; "
                "later batches were not started"
            )


def record(run):
    """The runner's return; ``retcode`` makes ``salt-run`` exit non-zero on any failure."""
    ok = run.error is None and bool(run.nodes) and all(n["result"] for n in run.nodes.values())
    ret = {
        "result": ok,
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
    if not ok:
        ret["error"] = run.error or "no node was deployed"
        ret["failed_step"] = run.failed_step
    run.records.update_run(run.record_id, commit=run.commit, release=run.name)
    run.records.finish_run(
        run.record_id, ok, ret["duration_s"], ret.get("error"),
        {"failed_step": run.failed_step, "nodes": run.nodes},
    )
    _fire(run, ("finish",), {k: v for k, v in ret.items() if k != "output"})
    _say(run, f"{'DONE' if ok else 'FAILED'}: {run.name or run.ref} " + (ret.get("error") or ""))
    return ret


# ---------------------------------------------------------------- helpers


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


def _begin(project, env, ref, author, trigger, kwargs):
    conf = _release_opts()
    config = conf["projects"].get(project)
    run = Run(
        project=project, env=env, ref=str(ref), author=author or getpass.getuser(),
        config=config or {}, environment={}, state_dir=conf["state_dir"],
        jid=kwargs.get("__pub_jid") or _jid(), trigger=trigger,
        records=store.Store(conf["state_dir"]),
    )
    run.record_id = run.records.start_run(
        run.kind, project, env, trigger, run.author, run.jid, run.ref
    )
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
    """Hold the project+env lock for the run; only ever release our own token."""

    def __init__(self, run, reason, wait):
        self.run, self.reason, self.wait = run, reason, wait
        self.path = locking.lock_path(run.state_dir, run.project, run.env)
        self.owner = None

    def __enter__(self):
        if self.run.error:
            raise DeployError(self.run.error)
        try:
            self.owner = locking.acquire(
                self.path, self.run.author, self.run.jid, f"{self.reason} {self.run.ref}", self.wait
            )
        except locking.LockHeld as exc:
            self.run.failed_step = "lock"
            raise DeployError(f"{self.run.project}/{self.run.env} is {exc}")
        _fire(self.run, ("start",), {"ref": self.run.ref, "author": self.run.author, "jid": self.run.jid})
        return self.owner

    def __exit__(self, *exc_info):
        if self.owner:
            locking.release(self.path, self.owner["token"])
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


def _note_outcomes(run, phase, started_at, outcomes):
    """Fold a phase's outcomes into run.nodes and the records; returns the failed minions."""
    failed = []
    for minion, (ok, value) in sorted(outcomes.items()):
        run.records.node_phase(
            run.record_id, minion, phase, started_at,
            value.get("duration_s") if ok else None, ok, None if ok else value,
        )
        node = run.nodes.setdefault(minion, contract.node_result(True, release=run.name))
        node["phase"] = phase
        if ok:
            node["duration_s"] = value.get("duration_s")
            if "previous" in value:
                node["previous"] = value["previous"]
            continue
        node.update(result=False, error=value, duration_s=None)
        failed.append(minion)
        if value.startswith("no answer"):
            # The node cannot report for itself: say it on its behalf.
            _fire(run, (minion, phase), contract.phase_event(run.name, False, 0, value))
    return failed


def _cleanup(run):
    for path in (run.tree,):
        if path and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    if run.tarball and os.path.dirname(run.tarball).endswith("builds") and os.path.exists(run.tarball):
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
