"""
Master side: the safe rollout. Nodes are switched wave by wave, batch by
batch, each node going through

    drain -> activate (switch + stack reload on the node) -> verify -> undrain

A node passes ``verify`` only when it serves the release it was switched to.
Failures beyond a wave's budget stop the rollout (no later batch or wave
starts); with ``auto_rollback`` every node already switched goes back through
the same steps, in its own wave's batches, so a rollback keeps as many nodes
in service as the rollout did. A node that failed never goes back into the
load balancer until it passes its check on the release it runs.

After any failed node phase the engine reads what the node really runs
(``release.current``) and reports that (phase ``readback``), never the
release it meant to set; a node it cannot read stays drained. The load
balancer gets back only the backends this run took out: one an operator had
down before stays down. A put-back the load balancer does not make is asked
once more (a load-balancer minion restarted mid-edit undoes that edit at its
next call); when it still fails the rollout stops: the next batch would take
more nodes out while these cannot come back.

The same engine switches nodes to any per-node release: a deploy sends every
node to the new release, a rollback sends each node to its own target.
"""

import concurrent.futures
import dataclasses
import math
import time

import _release_fleet as fleet
import release_health as health_lib  # shared with the node's release.deployed state

DEFAULT_TIMEOUT_S = 60
RELOAD_FAILED = "reload failed on "  # release.activate's error when the release ran and its reload failed


@dataclasses.dataclass
class Wave:
    name: str
    minions: list
    batch: object = "100%"
    bake_s: float = 0
    max_failures: object = 0

    @property
    def batches(self):
        return fleet.batches(self.minions, self.batch)

    @property
    def budget(self):
        """How many nodes of this wave may fail before the rollout stops."""
        spec = str(self.max_failures or 0).strip()
        if spec.endswith("%"):
            return math.floor(len(self.minions) * float(spec[:-1]) / 100)
        return int(spec)


def plan_waves(opts, environment):
    """
    The environment's waves with their nodes; a node named by several waves
    goes in its first. An environment without ``waves`` is one wave.
    """
    specs = environment.get("waves") or [dict(environment, name="all")]
    waves, seen = [], set()
    for spec in specs:
        matched = fleet.resolve_targets(opts, spec["target"], spec.get("tgt_type", "glob"))
        minions = [m for m in matched if m not in seen]
        seen.update(minions)
        if minions:
            waves.append(Wave(
                name=spec.get("name", "all"), minions=minions, batch=spec.get("batch", "100%"),
                bake_s=float(spec.get("bake_s", 0)), max_failures=spec.get("max_failures", 0),
            ))
    for wave in waves:
        fleet.batch_size(wave.batch, len(wave.minions))  # refuse a bad batch spec before anything runs
    return waves








@dataclasses.dataclass
class Outcome:
    """What a rollout did: which nodes switched, which failed, and why it stopped."""

    switched: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)
    reverted: list = dataclasses.field(default_factory=list)
    # Nodes where the release ran and failed its own checks (reload, health): only
    # these make it bad; a node-local error before it ran (staging, config, the switch) does not.
    failed_checks: list = dataclasses.field(default_factory=list)
    sent_back: list = dataclasses.field(default_factory=list)  # nodes ``back`` took on: each is tried once
    stopped: str = None
    held: str = None  # why ``back`` left switched nodes where they are


class Rollout:
    """
    Switches nodes for one project+env. ``report`` receives every node phase
    (``report(minion, phase, ok, duration_s, error, release, **extra)``) and
    progress lines (``say(message)``).
    """

    def __init__(self, opts, project, env, environment, hosts, previous, fence, report, say):
        self.opts, self.project, self.env = opts, project, env
        self.environment, self.hosts, self.fence = environment, hosts, fence
        self.previous = dict(previous)  # the release each node ran before this rollout
        self.report, self.say = report, say
        self.lb = environment.get("lb")
        self.health = environment.get("health")
        self.auto_rollback = bool(environment.get("auto_rollback"))
        self.timeout_s = environment.get("timeout_s", DEFAULT_TIMEOUT_S)
        self.presence_timeout_s = environment.get("presence_timeout_s", fleet.DEFAULT_PRESENCE_TIMEOUT_S)
        self.activate_kwarg = {}  # extra release.activate arguments (a rollback marks what it leaves bad)
        self.done = 0
        self.waves = []
        self.ours = set()  # the backends this run drained: the only ones it may put back
        self.errors = {}  # the last failure of each node, for the readback's report
        self.unconfirmed = {}  # healthy node -> the release it passed its check on, not yet recorded

    # ------------------------------------------------------------ waves

    def forward(self, waves, targets):
        """Switch each node to ``targets[minion]``, wave by wave, within the failure budgets."""
        outcome = Outcome()
        self.waves = waves
        total = sum(len(w.minions) for w in waves)
        for wave in waves:
            failed_here = []
            for number, batch in enumerate(wave.batches, 1):
                switched, failed = self._batch(batch, targets, total, outcome)
                outcome.switched.extend(switched)
                failed_here.extend(failed)
                self._revert_failed(failed, outcome)
                if outcome.stopped:
                    break
                if len(failed_here) > wave.budget:
                    outcome.stopped = (
                        f"wave {wave.name}: {len(failed_here)} node(s) failed ({', '.join(failed_here)}), "
                        f"over its budget of {wave.budget}; batch {number}/{len(wave.batches)} was the last to run"
                    )
                    break
            if not outcome.stopped and wave.bake_s:
                failed_here.extend(self._bake(wave, targets, outcome))
                if len(failed_here) > wave.budget:
                    outcome.stopped = (
                        f"wave {wave.name}: {len(failed_here)} node(s) failed after baking {wave.bake_s} s"
                    )
            outcome.failed.extend(failed_here)
            if outcome.stopped:
                break
        self._confirm_pending()
        if outcome.stopped and self.auto_rollback:
            self.back([m for m in outcome.switched if m not in outcome.reverted], outcome)
        return outcome

    def switch_all(self, targets):
        """
        The emergency path: every node switched at once, no drain and no
        health check; returns (switched, failed).
        """
        self.say(f"switching {len(targets)} node(s) at once, no drain")
        switched, failed = self._switch(sorted(targets), targets)
        self._read_back(failed)
        return switched, failed

    def rollback_all(self, minions):
        """
        The emergency path in one round trip: every node goes back to its own
        rollback target (``release.rollback``, the choice ``salt-call --local``
        makes too). Returns (switched, failed, landed) where landed maps a
        switched node to (release, previous).
        """
        self.say(f"switching {len(minions)} node(s) at once, no drain")
        outcomes = self._call(minions, "release.rollback", arg=[self.project],
                              kwarg=dict(self.activate_kwarg, env=self.env, fence=self.fence))
        switched, failed, landed = [], [], {}
        for minion, (ok, value) in sorted(outcomes.items()):
            if ok:
                switched.append(minion)
                landed[minion] = (value["release"], value.get("previous"))
                self._report(minion, "activate", True, value.get("duration_s"), None, value["release"],
                             previous=value.get("previous"))
            else:
                failed.append(minion)
                self._report(minion, "activate", False, None, value, None)
        self._read_back(failed)
        return switched, failed, landed

    def back(self, minions, outcome):
        """
        Send switched nodes back to the release each had, newest switch first,
        each wave in its own batches: never more nodes out at once than its
        rollout took out.
        """
        minions = [m for m in minions if m not in outcome.sent_back]
        if not minions:
            return
        outcome.sent_back.extend(minions)
        self._confirm_pending()  # what passed its check is recorded before anything goes back
        self.say(f"rolling back {len(minions)} node(s): {', '.join(minions)}")
        targets = {m: self.previous.get(m) for m in minions}
        for minion in [m for m in minions if not targets[m]]:
            self._report(minion, "rollback", False, 0, "no previous release to go back to", None)
        order = [m for m in reversed(minions) if targets[m]]
        for batch in self._rollback_batches(order):
            still_out = self.ours - {self._backend(m) for m in batch} if self.lb else set()
            allowed = self._batch_size_of(batch[0])
            if len(still_out) + len(batch) > allowed:
                # A node this run could not put back (its release unknown, or it failed its
                # check again) already takes a place: sending more back would drain too many.
                outcome.held = (f"not rolled back: {', '.join(order[order.index(batch[0]):])} "
                                f"({len(still_out)} node(s) still out, the wave takes {allowed} out at once; "
                                "release.recover mode=rollback finishes it)")
                self.say(outcome.held)
                return
            if not self._drain(batch):
                continue
            switched, failed = self._switch(batch, targets, phase="rollback")
            running = self._read_back(failed)
            # A rollback that failed after the switch (its reload) still left the node on its target.
            back_on = switched + [m for m in failed if m in running and running[m] == targets[m]]
            healthy, _ = self._verify(back_on, targets)
            outcome.reverted.extend(back_on)
            put_back_ok, _ = self._undrain(healthy)
            if not put_back_ok:
                outcome.held = f"rollback stopped: the load balancer did not put back {', '.join(healthy)}"
                self.say(outcome.held)
                return

    def _rollback_batches(self, order):
        """``order`` cut into batches of each node's wave's size, keeping the order."""
        batches, size = [], None
        for minion in order:
            wave = self._wave_of(minion)
            if batches and wave is batches[-1][0] and len(batches[-1][1]) < size:
                batches[-1][1].append(minion)
                continue
            size = self._batch_size_of(minion)
            batches.append((wave, [minion]))
        return [batch for _, batch in batches]

    def _batch_size_of(self, minion):
        """How many nodes the wave of ``minion`` takes out at once."""
        wave = self._wave_of(minion)
        return fleet.batch_size(wave.batch, len(wave.minions)) if wave else 1

    def _wave_of(self, minion):
        return next((w for w in self.waves if minion in w.minions), None)

    def settle(self, minions, targets):
        """
        Put nodes a dead run left drained back into the load balancer when
        they pass their check; returns those. The caller vouches that the dead
        run drained them.
        """
        self.ours.update(self._backend(m) for m in minions)
        healthy, _ = self._verify(minions, targets)
        self._undrain(healthy)
        return healthy

    def drained(self, minions):
        """The nodes the load balancer has down now (none without one); raises when it cannot say."""
        if not self.lb or not minions:
            return []
        lb_minion = self.lb["minion"]
        ok, value = self._call([lb_minion], "release_lb.status", arg=[self.lb["upstream_file"]])[lb_minion]
        if not ok:
            raise fleet.FleetError(f"load balancer {lb_minion} cannot say which nodes are down: {value}")
        return [m for m in minions if value.get(self._backend(m))]

    # ------------------------------------------------------------ one batch

    def _batch(self, batch, targets, total, outcome):
        """drain -> activate -> verify -> undrain; returns (switched, failed)."""
        started = time.monotonic()
        if not self._drain(batch):
            return [], list(batch)
        switched, failed = self._switch(batch, targets)
        outcome.failed_checks += [m for m in failed if RELOAD_FAILED in str(self.errors.get(m))]
        running = self._read_back(failed)
        # A switch that failed after the symlink moved (its reload) left the node on the new
        # release: it counts as switched, so a rollback takes it back, and it stays out.
        switched += [m for m in failed if m in running and running[m] == targets[m]]
        healthy, sick = self._verify([m for m in switched if m not in failed], targets)
        self.unconfirmed.update({m: targets[m] for m in healthy})
        outcome.failed_checks += sick
        # A node still on its old release goes back in if that one is healthy; one whose
        # release is unknown stays out.
        kept = [m for m in failed if running.get(m) and running[m] == self.previous.get(m)]
        unchanged, _ = self._verify(kept, self.previous)
        put_back = healthy + unchanged
        put_back_ok, error = self._undrain(put_back)
        if not put_back_ok:
            # Out of service and not coming back: they count as failed, and no later batch starts.
            outcome.stopped = f"the load balancer did not put back {', '.join(put_back)}: {error}"
            sick += healthy
            healthy = []
        for minion in batch:
            self.done += 1
            verb = "activated" if minion in healthy else "FAILED"
            self.say(f"[{self.done}/{total}] {minion} {verb} {targets[minion]} in {time.monotonic() - started:.1f} s")
        return switched, failed + sick

    def _revert_failed(self, failed, outcome):
        """With auto_rollback, a node that switched but failed goes back to its release."""
        if self.auto_rollback:
            self.back([m for m in failed if m in outcome.switched], outcome)

    def _bake(self, wave, targets, outcome):
        self.say(f"wave {wave.name}: baking {wave.bake_s} s before the next wave")
        time.sleep(wave.bake_s)
        live = [m for m in wave.minions if m in outcome.switched and m not in outcome.reverted]
        _, sick = self._verify(live, targets)
        outcome.failed_checks += sick
        if sick:
            self._drain(sick)
            self._revert_failed(sick, outcome)
        return sick

    # ------------------------------------------------------------ node steps

    def _switch(self, minions, targets, phase="activate"):
        """
        release.activate on each node (grouped by target release); returns
        (switched, failed). Going back marks the release left bad, and may
        return to a release an earlier rollback had marked so.
        """
        kwarg = dict(self.activate_kwarg, env=self.env, fence=self.fence)
        if phase == "rollback":
            kwarg.update(rollback=True, force=True)
        switched, failed = [], []
        by_release = {}
        for minion in minions:
            by_release.setdefault(targets[minion], []).append(minion)
        for release, group in by_release.items():
            outcomes = self._call(group, "release.activate", arg=[self.project, release], kwarg=kwarg)
            for minion, (ok, value) in sorted(outcomes.items()):
                if ok:
                    switched.append(minion)
                    self._report(minion, phase, True, value.get("duration_s"), None, release,
                                 previous=value.get("previous"))
                else:
                    failed.append(minion)
                    self._report(minion, phase, False, None, value, release)
        return switched, failed

    def _verify(self, minions, targets):
        """Health-check each node in parallel; returns (healthy, sick), sick nodes read back."""
        if not self.health or not minions:
            return list(minions), []
        checks = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(minions))) as pool:
            for minion in minions:
                checks[minion] = (time.monotonic(), pool.submit(self._check, minion, targets[minion]))
        healthy, sick = [], []
        for minion, (started, future) in checks.items():
            ok, problem = future.result()
            (healthy if ok else sick).append(minion)
            self._report(minion, "verify", ok, time.monotonic() - started, problem, targets[minion])
        self._read_back(sick)
        return healthy, sick

    def _confirm_pending(self):
        """
        Nodes remember the release that passed its check: their only rollback
        targets. Recorded once for the whole rollout (one call per release),
        not after each batch: a round trip less per batch. A run that dies
        before leaves them unconfirmed, which only keeps the new release out
        of the rollback targets.
        """
        pending, self.unconfirmed = self.unconfirmed, {}
        for release in sorted(set(pending.values())):
            group = sorted(m for m, r in pending.items() if r == release)
            outcomes = self._call(group, "release.confirm", arg=[self.project, release], kwarg={"env": self.env})
            for minion, (ok, value) in sorted(outcomes.items()):
                if not ok:
                    self.say(f"{minion}: could not record {release} as healthy: {value}")

    def _read_back(self, minions):
        """
        What failed nodes really run, read from them in one call and reported
        (phase ``readback``) as their release; returns ``{minion: release}``
        for the nodes that answered. One that cannot be read is reported
        unknown and is never put back into the load balancer.
        """
        if not minions:
            return {}
        started = time.monotonic()
        # A node that was not there for the call is not asked again; one whose call was lost
        # (killed or restarted mid-call, its master restarted) is, until it answers or timeout_s.
        readable = [m for m in minions if fleet.PROBE_UNANSWERED not in str(self.errors.get(m))]
        outcomes = self._patiently(readable, "release.current", arg=[self.project])
        running = {}
        for minion in minions:
            ok, value = outcomes.get(minion, (False, "it does not answer"))
            if ok:
                running[minion] = value
                self.report(minion, "readback", True, time.monotonic() - started, None, value)
            else:
                self.report(minion, "readback", False, time.monotonic() - started,
                            f"{self.errors.get(minion)}; its release is unknown (cannot read it back: {value})",
                            None)
        return running

    def _patiently(self, minions, fun, arg=()):
        """``_call``, asked again each second of ``timeout_s`` of the nodes that do not answer yet."""
        deadline = time.monotonic() + self.timeout_s
        outcomes, waiting = {}, list(minions)
        while waiting:
            outcomes.update(self._call(waiting, fun, arg=arg))
            waiting = [m for m in waiting if not outcomes[m][0] and fleet.unreachable(outcomes[m][1])]
            if waiting and time.monotonic() < deadline:
                time.sleep(1)
            else:
                break
        return outcomes

    def _check(self, minion, release):
        url = health_lib.url_for(self.health, self.hosts.get(minion), minion, self.project)
        return health_lib.check(self.health, url, release)

    def _drain(self, minions):
        """Take nodes out of the load balancer; remembers which backends this call took out."""
        ok, value = self._balance(minions, "drain")
        if ok and value:
            # A release_lb older than "drained" cannot say: then every backend named is ours.
            self.ours.update(value.get("drained", value["backends"]))
        return ok

    def _undrain(self, minions):
        """
        Put back the nodes whose backend this run took out; leaves an
        operator's ``down`` alone. Asked twice before it counts as failed;
        returns (ok, the load balancer's return or error).
        """
        mine = [m for m in minions if self.lb and self._backend(m) in self.ours]
        ok, value = self._balance(mine, "undrain", tries=2)
        if ok:
            self.ours.difference_update(self._backend(m) for m in mine)
        return ok, value

    def _balance(self, minions, phase, tries=1):
        """Drain or undrain nodes in one load-balancer call; (ok, its return); ok without an LB."""
        if not self.lb or not minions:
            return True, None
        started = time.monotonic()
        backends = [self._backend(m) for m in minions]
        kwarg = {k: self.lb[k] for k in ("kind", "test_cmd", "reload_cmd") if k in self.lb}
        for attempt in range(1, tries + 1):
            ok, value = self._call([self.lb["minion"]], f"release_lb.{phase}",
                                   arg=[self.lb["upstream_file"], backends], kwarg=kwarg)[self.lb["minion"]]
            if ok or attempt == tries:
                break
            self.say(f"load balancer {phase} of {', '.join(backends)} failed ({value}); asking once more")
        for minion in minions:
            self._report(minion, phase, ok, time.monotonic() - started, None if ok else value, None)
        return ok, value

    def _call(self, minions, fun, arg=(), kwarg=None):
        return fleet.run_on(self.opts, minions, fun, arg=arg, kwarg=kwarg, timeout_s=self.timeout_s,
                            presence_timeout_s=self.presence_timeout_s)

    def _report(self, minion, phase, ok, duration_s, error, release, **extra):
        if not ok:
            self.errors[minion] = error
        self.report(minion, phase, ok, duration_s, error, release, **extra)

    def _backend(self, minion):
        return self.lb.get("backend", "{host}").format(host=self.hosts.get(minion), minion=minion)
