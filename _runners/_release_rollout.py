"""
Master side: the safe rollout. Nodes are switched wave by wave, batch by
batch, each node going through

    drain -> activate (switch + stack reload on the node) -> verify -> undrain

A node passes ``verify`` only when it serves the release it was switched to.
Failures beyond a wave's budget stop the rollout (no later batch or wave
starts); with ``auto_rollback`` every node already switched goes back through
the same steps. A node that failed never goes back into the load balancer on
a bad release.

The same engine switches nodes to any per-node release: a deploy sends every
node to the new release, a rollback sends each node to its own target.
"""

import concurrent.futures
import dataclasses
import math
import re
import time
import urllib.error
import urllib.request

import _release_fleet as fleet

DEFAULT_HOST_GRAIN = "fqdn_ip4[0]"
DEFAULT_TIMEOUT_S = 60
HEALTH_INTERVAL_S = 1.0


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


def grain_value(grains, path):
    """Read ``a:b`` or ``fqdn_ip4[0]`` style paths out of a grains dict."""
    value = grains
    for part in path.split(":"):
        match = re.match(r"^([^\[]+)(?:\[(\d+)\])?$", part)
        if not match or not isinstance(value, dict):
            return None
        value = value.get(match.group(1))
        if match.group(2) is not None:
            index = int(match.group(2))
            value = value[index] if isinstance(value, list) and len(value) > index else None
    return value


def check_health(url, release, expect="release", timeout_s=10, retries=3, interval_s=HEALTH_INTERVAL_S):
    """
    GET ``url`` until it answers as expected or the retries run out; returns
    ``(ok, problem)``. ``expect: release`` passes only when the body or the
    ``X-Release`` header names ``release``; ``ok`` takes any 2xx; anything
    else must appear in the body.
    """
    problem = None
    for attempt in range(max(1, int(retries))):
        if attempt:
            time.sleep(interval_s)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                body = response.read(65536).decode("utf-8", "replace")
                served = response.headers.get("X-Release") or ""
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problem = f"{url}: {getattr(exc, 'reason', exc)}"
            continue
        if expect == "ok" or (expect == "release" and (release == served or release in body)):
            return True, None
        if expect not in ("ok", "release") and expect in body:
            return True, None
        problem = f"{url} serves {served or 'something else'}, not {release if expect == 'release' else expect!r}"
    return False, problem


@dataclasses.dataclass
class Outcome:
    """What a rollout did: which nodes switched, which failed, and why it stopped."""

    switched: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)
    reverted: list = dataclasses.field(default_factory=list)
    stopped: str = None


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
        self.activate_kwarg = {}  # extra release.activate arguments (a rollback marks what it leaves bad)
        self.done = 0

    # ------------------------------------------------------------ waves

    def forward(self, waves, targets):
        """Switch each node to ``targets[minion]``, wave by wave, within the failure budgets."""
        outcome = Outcome()
        total = sum(len(w.minions) for w in waves)
        for wave in waves:
            failed_here = []
            for number, batch in enumerate(wave.batches, 1):
                switched, failed = self._batch(batch, targets, total)
                outcome.switched.extend(switched)
                failed_here.extend(failed)
                self._revert_failed(failed, outcome)
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
        if outcome.stopped and self.auto_rollback:
            self.back([m for m in outcome.switched if m not in outcome.reverted], outcome)
        return outcome

    def switch_all(self, targets):
        """
        The emergency path: every node switched at once, no drain and no
        health check; returns (switched, failed).
        """
        self.say(f"switching {len(targets)} node(s) at once, no drain")
        return self._switch(sorted(targets), targets)

    def rollback_all(self, minions):
        """
        The emergency path in one round trip: every node goes back to its own
        rollback target (``release.rollback``, the choice ``salt-call --local``
        makes too). Returns (switched, failed, landed) where landed maps a
        switched node to (release, previous).
        """
        self.say(f"switching {len(minions)} node(s) at once, no drain")
        outcomes = fleet.run_on(
            self.opts, minions, "release.rollback", arg=[self.project],
            kwarg=dict(self.activate_kwarg, env=self.env, fence=self.fence), timeout_s=self.timeout_s,
        )
        switched, failed, landed = [], [], {}
        for minion, (ok, value) in sorted(outcomes.items()):
            if ok:
                switched.append(minion)
                landed[minion] = (value["release"], value.get("previous"))
                self.report(minion, "activate", True, value.get("duration_s"), None, value["release"],
                            previous=value.get("previous"))
            else:
                failed.append(minion)
                self.report(minion, "activate", False, None, value, None)
        return switched, failed, landed

    def back(self, minions, outcome):
        """Send switched nodes back to the release each had, newest switch first."""
        if not minions:
            return
        self.say(f"rolling back {len(minions)} node(s): {', '.join(minions)}")
        targets = {m: self.previous.get(m) for m in minions}
        for minion in [m for m in minions if not targets[m]]:
            self.report(minion, "rollback", False, 0, "no previous release to go back to", None)
        order = [m for m in reversed(minions) if targets[m]]
        size = fleet.batch_size(self.environment.get("batch", "100%"), len(order)) if order else 1
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            if not self._drain(batch):
                continue
            switched, _ = self._switch(batch, targets, phase="rollback")
            healthy, _ = self._verify(switched, targets)
            self._undrain(healthy)
            outcome.reverted.extend(switched)

    def settle(self, minions, targets):
        """Put drained nodes back into the load balancer when they pass their check; returns those."""
        healthy, _ = self._verify(minions, targets)
        self._undrain(healthy)
        return healthy

    def drained(self, minions):
        """The nodes the load balancer has down now (none without one); raises when it cannot say."""
        if not self.lb or not minions:
            return []
        lb_minion = self.lb["minion"]
        ok, value = fleet.run_on(self.opts, [lb_minion], "release_lb.status", arg=[self.lb["upstream_file"]],
                                 timeout_s=self.timeout_s)[lb_minion]
        if not ok:
            raise fleet.FleetError(f"load balancer {lb_minion} cannot say which nodes are down: {value}")
        return [m for m in minions if value.get(self._backend(m))]

    # ------------------------------------------------------------ one batch

    def _batch(self, batch, targets, total):
        """drain -> activate -> verify -> undrain; returns (switched, failed)."""
        started = time.monotonic()
        if not self._drain(batch):
            return [], list(batch)
        switched, failed = self._switch(batch, targets)
        healthy, sick = self._verify(switched, targets)
        # A node whose switch failed still runs its old release: back in if that one is healthy.
        unchanged, _ = self._verify([m for m in failed if self.previous.get(m)], self.previous)
        self._undrain(healthy + unchanged)
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
            outcomes = fleet.run_on(
                self.opts, group, "release.activate", arg=[self.project, release],
                kwarg=kwarg, timeout_s=self.timeout_s,
            )
            for minion, (ok, value) in sorted(outcomes.items()):
                if ok:
                    switched.append(minion)
                    self.report(minion, phase, True, value.get("duration_s"), None, release,
                                previous=value.get("previous"))
                else:
                    failed.append(minion)
                    self.report(minion, phase, False, None, value, release)
        return switched, failed

    def _verify(self, minions, targets):
        """Health-check each node in parallel; returns (healthy, sick)."""
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
            self.report(minion, "verify", ok, time.monotonic() - started, problem, targets[minion])
        return healthy, sick

    def _check(self, minion, release):
        url = self.health["url"].format(host=self.hosts.get(minion), minion=minion, project=self.project)
        return check_health(
            url, release, self.health.get("expect", "release"),
            float(self.health.get("timeout_s", 10)), int(self.health.get("retries", 3)),
            float(self.health.get("interval_s", HEALTH_INTERVAL_S)),
        )

    def _drain(self, minions):
        return self._balance(minions, "drain")

    def _undrain(self, minions):
        return self._balance(minions, "undrain")

    def _balance(self, minions, phase):
        """Drain or undrain nodes in one load-balancer call; True when it worked (or there is no LB)."""
        if not self.lb or not minions:
            return True
        started = time.monotonic()
        backends = [self._backend(m) for m in minions]
        kwarg = {k: self.lb[k] for k in ("kind", "test_cmd", "reload_cmd") if k in self.lb}
        outcome = fleet.run_on(
            self.opts, [self.lb["minion"]], f"release_lb.{phase}",
            arg=[self.lb["upstream_file"], backends], kwarg=kwarg, timeout_s=self.timeout_s,
        )
        ok, value = outcome[self.lb["minion"]]
        for minion in minions:
            self.report(minion, phase, ok, time.monotonic() - started, None if ok else value, None)
        return ok

    def _backend(self, minion):
        return self.lb.get("backend", "{host}").format(host=self.hosts.get(minion), minion=minion)
