"""
The run machinery every pipeline (deploy, rollback, recover) shares: the
``Run`` a pipeline fills in step by step, ``begin`` (settings, history row),
the deploy lock as a context manager, ``step`` (which step failed), the
rollout's reporter, progress lines and events, and ``conclude``: the return,
the history row's end and, after a good run, the published release.

Salt's loader globals live only in ``release.py``: it passes the master's
opts and a progress callback in, through ``begin``.
"""

import dataclasses
import datetime
import getpass
import logging
import os
import time

import salt.utils.event

import _release_artifact as artifact
import _release_fleet as fleet
import _release_lock as locking
import _release_metrics as metrics
import _release_store as store
import release_contract as contract
import release_published as published
import release_settings as settings

log = logging.getLogger(__name__)

# Node phases the conductor drives from the master; the nodes report install and activate themselves.
CONDUCTOR_PHASES = ("drain", "verify", "undrain", "readback")


class DeployError(Exception):
    """A step that failed; the run stops and every node keeps the release it had."""


@dataclasses.dataclass
class Run:
    """Everything one run knows, filled in step by step."""

    project: str
    env: str
    ref: str
    author: str
    config: dict
    environment: dict
    state_dir: str
    jid: str
    opts: dict = None  # the master's opts
    conf: dict = None  # its normalised release: settings (release_settings.master)
    progress: object = None  # callable(message): salt-run's live progress line
    functions: dict = None  # the runner's __salt__ (cache.grains)
    started: float = dataclasses.field(default_factory=time.monotonic)
    commit: str = None
    ref_name: str = None  # the branch or tag the ref names (a release name field)
    full_ref: str = None  # refs/heads/x, refs/tags/x, or the commit itself
    version: str = None
    name: str = None
    build: object = None  # this run's build folder (_release_builds.Build), locked while the run lives
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
    expect_commit: str = None  # a webhook's pushed commit: the ref must still name it
    to: str = None
    targets: dict = dataclasses.field(default_factory=dict)
    facts: dict = dataclasses.field(default_factory=dict)  # kind-specific extras for the return and the record

    @property
    def builds(self):
        """Where each run's build folder (the exported tree, the tarball until it is staged) lives."""
        return os.path.join(self.state_dir, "builds")

    @property
    def minions(self):
        return [minion for wave in self.waves for minion in wave.minions]


def master_settings(opts):
    """The master's normalised ``release:`` settings; the artifact root is required."""
    try:
        conf = settings.master(opts)
    except settings.SettingsError as exc:
        raise DeployError(str(exc))
    if not conf["artifact_root"]:
        raise DeployError("release:artifact_root is not set and file_roots has no base directory")
    return conf


def records(conf):
    """The history store ``release:store`` names (sqlite by default, or a shared PostgreSQL)."""
    try:
        return store.Store(conf["state_dir"], conf["store"])
    except Exception as exc:  # noqa: BLE001  # psycopg2's errors, a bad URL: said without the URL's password
        raise DeployError(f"cannot open the release store {store.safe_url(conf.get('store'))}: "
                          f"{store.safe_url(exc)}")


def begin(loader, project, env, ref, author, trigger, kwargs, record=True, kind="deploy"):
    """
    A new run of ``kind``; a project or environment the settings lack is its
    error. ``loader`` is what the runner module has from Salt's loader:
    ``{"opts": __opts__, "functions": __salt__, "progress": callable, "jid": the job's}``.
    """
    opts = loader["opts"]
    conf = master_settings(opts)
    config = conf["projects"].get(project)
    run = Run(
        project=project, env=env, ref=str(ref), author=author or getpass.getuser(),
        config=config or {}, environment={}, state_dir=conf["state_dir"], opts=opts, conf=conf,
        progress=loader.get("progress"), functions=loader.get("functions"),
        jid=kwargs.get("__pub_jid") or loader.get("jid") or _jid(), trigger=trigger, kind=kind,
    )
    if record:
        run.records = records(conf)
        run.record_id = run.records.start_run(run.kind, project, env, trigger, run.author, run.jid, run.ref)
    if project in conf["errors"]:
        run.error = conf["errors"][project]
    elif config is None:
        run.error = f"unknown project {project!r}: not under release:projects in the master config"
    elif env not in config["environments"]:
        known = ", ".join(sorted(config["environments"])) or "none"
        run.error = f"project {project} has no environment {env!r} (known: {known})"
    else:
        run.environment = config["environments"][env]
    if run.error:
        run.failed_step = "configure"
    return run


def step(run, function):
    """Run one step; a failure names it in ``run.failed_step`` and becomes a DeployError."""
    try:
        function(run)
    except DeployError:
        run.failed_step = run.failed_step or function.__name__
        raise
    except artifact.ArtifactError as exc:
        run.failed_step = function.__name__
        if exc.tail:
            run.output[function.__name__] = exc.tail
        raise DeployError(str(exc))


def run_steps(run, steps):
    for function in steps:
        step(run, function)


def conclude(run):
    """
    The run's end: its return (``retcode`` makes ``salt-run`` exit non-zero
    on any failure), its history row closed and, after a good run, the
    published release highstate reads (the ``release_fleet`` ext_pillar).
    """
    ret = run_return(run)
    ok = ret["result"]
    run.records.update_run(run.record_id, commit=run.commit, release=run.name)
    if ok and run.sha256 and run.kind != "plan":  # a dry run (diff=True) publishes nothing
        published.record_published_release(
            run.state_dir, run.project, run.env, run.name, run.source_url, run.sha256, run.jid
        )
    run.records.finish_run(
        run.record_id, ok, ret["duration_s"], ret.get("error"),
        dict(run.facts, failed_step=run.failed_step, nodes=run.nodes),
    )
    metrics.publish(run.conf, run.records)
    fire(run, ("finish",), {k: v for k, v in ret.items() if k != "output"})
    say(run, f"{'DONE' if ok else 'FAILED'}: {run.name or run.ref} " + (ret.get("error") or ""))
    return ret


def run_return(run):
    """What ``salt-run`` prints for a run: result, nodes, output, and the error when it failed."""
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
    return ret


def reporter(run):
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
        # readback: what the node really runs after a failure, read from it (None: unknown)
        if ok and phase in ("activate", "rollback") or phase == "readback":
            node["release"] = release
        if ok and phase == "rollback":
            node.update(result=False, rolled_back=True)
            node["error"] = node.get("error") or "rolled back: the rollout stopped"
        if not ok:
            node.update(result=False, error=first_cause(node.get("error"), error))
        run.records.node_phase(run.record_id, minion, phase, started_at(duration_s), duration_s, ok, error)
        if phase in CONDUCTOR_PHASES or not ok and fleet.unreachable(error):
            fire(run, (minion, phase), contract.phase_event(release, ok, duration_s or 0, error))

    return report


def started_at(duration_s):
    """When a phase that just ended after ``duration_s`` seconds began (store.now()'s format)."""
    begun = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=float(duration_s or 0))
    return begun.isoformat(timespec="milliseconds")


def first_cause(earlier, error):
    """A node's error: the first failure of the run leads, what followed (a failed rollback) comes after it."""
    if not earlier or str(error).startswith(str(earlier)):
        return error
    if str(error) in str(earlier):
        return earlier
    return f"{earlier}; then {error}"


def note_outcomes(run, phase, outcomes):
    """Report each node's outcome of a phase run on all nodes at once; returns the failed minions."""
    report = reporter(run)
    for minion, (ok, value) in sorted(outcomes.items()):
        report(minion, phase, ok, value.get("duration_s") if ok else None, None if ok else value, run.name)
    return [minion for minion, (ok, _) in sorted(outcomes.items()) if not ok]


def say(run, message):
    """A live progress line: ``salt-run`` prints it as it comes."""
    log.info("release %s/%s: %s", run.project, run.env, message)
    if run.progress is not None:
        run.progress(message)


def fire(run, parts, data):
    fire_event(run.opts, contract.event_tag(run.project, run.env, *parts), data)


def fire_event(opts, tag, data):
    """One event on the master's bus."""
    with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False) as bus:
        bus.fire_event(data, tag)


def public_owner(owner):
    """A lock record without its token: the token is what lets its holder release it."""
    return {k: v for k, v in (owner or {}).items() if k != "token"}


class Locked:
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
        fire(self.run, ("start",), {"ref": self.run.ref, "author": self.run.author, "jid": self.run.jid})
        return self.owner

    def _acquire(self):
        run = self.run
        args = (run.project, run.env, run.author, run.jid, f"{self.reason} {run.ref}")
        try:
            return self.locks.acquire(*args, wait_s=self.wait)
        except locking.LockHeld as exc:
            if not self.take_over or self.locks.holder_alive(run.project, run.env, exc.owner,
                                                             float(run.config["lock_ttl_s"])):
                raise
        broken = self.locks.remove(run.project, run.env)
        return dict(self.locks.acquire(*args), took_over=broken)

    def _record_take_over(self, dead):
        dead = public_owner(dead)
        self.run.records.record("unlock", self.run.project, self.run.env, result=True, who=self.run.author,
                                jid=self.run.jid, details={"broken": dead, "dead_holder": True, "by": self.reason})
        say(self.run, f"took over the lock of a dead holder: {locking.describe(dead)}")

    def __exit__(self, *exc_info):
        if self.owner:
            self.locks.release(self.run.project, self.run.env, self.owner["token"])
        return False


def unlock(opts, project, env, force):
    """Break a lock left behind by a dead run (``salt-run release.unlock``); recorded and fired."""
    conf = master_settings(opts)
    problem = unknown_target(conf, project, env)
    if problem:
        return {"result": False, "error": problem, "retcode": 1}
    history = records(conf)
    locks = history.locks()
    holder = locks.read(project, env)
    if holder is None:
        return {"result": True, "comment": f"{project}/{env} is not locked", "retcode": 0}
    ttl_s = float(conf["projects"][project]["lock_ttl_s"])
    if locks.holder_alive(project, env, holder, ttl_s) and not force:
        return {
            "result": False, "retcode": 1,
            "error": f"{project}/{env} is {locking.describe(holder)}; its holder may be alive: "
                     "pass force=True to break it anyway",
        }
    broken = locks.remove(project, env)
    who = getpass.getuser()
    history.record("unlock", project, env, result=True, who=who,
                   details={"broken": public_owner(broken), "force": bool(force)})
    metrics.publish(conf, history)
    fire_event(opts, contract.event_tag(project, env, "lock", "broken"),
               {"broken": public_owner(broken), "by": who, "force": bool(force)})
    return {"result": True, "comment": f"broke the lock: {locking.describe(broken)}", "retcode": 0}


def unknown_target(conf, project, env):
    """Why ``project``/``env`` (``env`` None: any) names nothing configured, or None."""
    config = conf["projects"].get(project)
    if config is None:
        return f"unknown project {project!r}: not under release:projects in the master config"
    if env is not None and env not in config["environments"]:
        known = ", ".join(sorted(config["environments"])) or "none"
        return f"project {project} has no environment {env!r} (known: {known})"
    return None


def _jid():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S%f")
