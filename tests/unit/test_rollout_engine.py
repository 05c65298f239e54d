"""
The rollout engine's own bookkeeping, with the fleet calls replaced: rollback
batches follow each wave's batch size, and only backends this run drained are
put back.
"""

import pytest

import _release_fleet as fleet
import _release_rollout as rollout

LB = {"minion": "lb1", "upstream_file": "/etc/nginx/app.upstream", "backend": "{minion}:80"}


class FakeFleet:
    """Answers run_on like a fleet whose load balancer has ``down`` backends already."""

    def __init__(self, down=()):
        self.down, self.calls = set(down), []

    def run_on(self, opts, minions, fun, arg=(), kwarg=None, timeout_s=60, presence_timeout_s=3):
        self.calls.append((fun, list(arg[1]) if fun.startswith("release_lb.") else list(minions)))
        if fun == "release_lb.drain":
            changed = [b for b in arg[1] if b not in self.down]
            self.down.update(changed)
            return {"lb1": (True, {"result": True, "backends": arg[1], "drained": changed})}
        if fun == "release_lb.undrain":
            self.down.difference_update(arg[1])
            return {"lb1": (True, {"result": True, "backends": arg[1], "undrained": arg[1]})}
        return {m: (True, {"result": True, "release": arg[-1], "duration_s": 0}) for m in minions}


def engine(fake, monkeypatch, **environment):
    monkeypatch.setattr(fleet, "run_on", fake.run_on)
    reports = []
    return rollout.Rollout(
        {}, "app", "pro", dict(environment, lb=LB), {}, {m: "old" for m in ("a", "b", "c", "d")}, 1,
        lambda *args, **kwargs: reports.append(args), lambda message: None,
    ), reports


def test_rollback_batches_follow_each_wave(monkeypatch):
    roll, _ = engine(FakeFleet(), monkeypatch)
    roll.waves = [rollout.Wave("pre", ["a"]), rollout.Wave("rest", ["b", "c", "d"], batch="50%")]
    # "50%" of three nodes is one: the rest go back one by one, then the pre wave.
    assert roll._rollback_batches(["d", "c", "b", "a"]) == [["d"], ["c"], ["b"], ["a"]]
    roll.waves[1].batch = 2
    assert roll._rollback_batches(["d", "c", "b", "a"]) == [["d", "c"], ["b"], ["a"]]


def test_an_operator_down_backend_is_never_put_back(monkeypatch):
    fake = FakeFleet(down={"b:80"})
    roll, _ = engine(fake, monkeypatch, batch=2)
    waves = [rollout.Wave("all", ["a", "b", "c"], batch=2)]
    outcome = roll.forward(waves, {m: "new" for m in ("a", "b", "c")})
    assert outcome.switched == ["a", "b", "c"] and not outcome.stopped
    undrained = [b for fun, backends in fake.calls if fun == "release_lb.undrain" for b in backends]
    assert sorted(undrained) == ["a:80", "c:80"]
    assert fake.down == {"b:80"}


@pytest.mark.parametrize("spec", ["100%", 1])
def test_auto_rollback_never_takes_out_more_than_a_batch(monkeypatch, spec):
    fake = FakeFleet()
    roll, _ = engine(fake, monkeypatch, auto_rollback=True)
    waves = [rollout.Wave("pre", ["a"]), rollout.Wave("rest", ["b", "c"], batch=1)]

    def verify(minions, targets):  # c fails its check on the new release only
        sick = [m for m in minions if m == "c" and targets[m] != "old"]
        return [m for m in minions if m not in sick], sick

    monkeypatch.setattr(roll, "_verify", verify)
    roll.environment["batch"] = spec  # the environment's batch plays no part in a rollback of waves
    outcome = roll.forward(waves, {m: "new" for m in ("a", "b", "c")})
    assert outcome.stopped and sorted(outcome.reverted) == ["a", "b", "c"]
    drains = [backends for fun, backends in fake.calls if fun == "release_lb.drain"]
    assert max(len(d) for d in drains) == 1


def test_a_first_deploy_that_fails_says_rolling_back_once(monkeypatch):
    """A node with nothing to go back to is tried once, not again when the rollout stops."""
    fake = FakeFleet()
    monkeypatch.setattr(fleet, "run_on", fake.run_on)
    said, reports = [], []
    roll = rollout.Rollout({}, "app", "pro", {"auto_rollback": True}, {}, {}, 1,
                           lambda *args, **kwargs: reports.append(args), said.append)
    monkeypatch.setattr(roll, "_verify", lambda minions, targets: ([], list(minions)))
    outcome = roll.forward([rollout.Wave("all", ["a"])], {"a": "new"})
    assert outcome.stopped
    assert [m for m in said if m.startswith("rolling back")] == ["rolling back 1 node(s): a"], said
    assert [r[:3] for r in reports if r[1] == "rollback"] == [("a", "rollback", False)]


def test_healthy_nodes_are_confirmed_once_for_the_whole_rollout(monkeypatch):
    fake = FakeFleet()
    roll, _ = engine(fake, monkeypatch)
    roll.forward([rollout.Wave("all", ["a", "b", "c", "d"], batch=2)], {m: "new" for m in ("a", "b", "c", "d")})
    node_calls = [(fun, minions) for fun, minions in fake.calls if fun.startswith("release.")]
    assert node_calls == [("release.activate", ["a", "b"]), ("release.activate", ["c", "d"]),
                          ("release.confirm", ["a", "b", "c", "d"])]


def test_what_passed_its_check_is_confirmed_before_a_rollback_takes_it_back(monkeypatch):
    fake = FakeFleet()
    roll, _ = engine(fake, monkeypatch, auto_rollback=True)

    def verify(minions, targets):  # c fails its check on the new release only
        sick = [m for m in minions if m == "c" and targets[m] != "old"]
        return [m for m in minions if m not in sick], sick

    monkeypatch.setattr(roll, "_verify", verify)
    roll.forward([rollout.Wave("all", ["a", "b", "c"], batch=1)], {m: "new" for m in ("a", "b", "c")})
    node_calls = [(fun, minions) for fun, minions in fake.calls if fun.startswith("release.")]
    first_rollback = node_calls.index(("release.activate", ["c"]), node_calls.index(("release.activate", ["c"])) + 1)
    assert ("release.confirm", ["a", "b"]) in node_calls[:first_rollback], node_calls


class FlakyFleet(FakeFleet):
    """A FakeFleet whose first ``failures[fun]`` calls of ``fun`` get no answer from anyone."""

    def __init__(self, failures, down=()):
        super().__init__(down)
        self.failures = dict(failures)

    def run_on(self, opts, minions, fun, arg=(), kwarg=None, timeout_s=60, presence_timeout_s=3):
        if self.failures.get(fun):
            self.failures[fun] -= 1
            self.calls.append((fun, "lost"))
            return {m: (False, f"{fleet.NO_ANSWER} within {timeout_s} s") for m in minions}
        return super().run_on(opts, minions, fun, arg, kwarg, timeout_s, presence_timeout_s)


def test_an_undrain_that_got_no_answer_is_asked_once_more(monkeypatch):
    fake = FlakyFleet({"release_lb.undrain": 1})
    roll, _ = engine(fake, monkeypatch)
    outcome = roll.forward([rollout.Wave("all", ["a", "b"], batch=1)], {"a": "new", "b": "new"})
    assert outcome.switched == ["a", "b"] and not outcome.stopped and not outcome.failed
    assert fake.down == set()


def test_a_put_back_that_fails_twice_stops_the_rollout(monkeypatch):
    """Hostile: the next batch used to drain b while a, healthy, could not come back."""
    fake = FlakyFleet({"release_lb.undrain": 2})
    roll, _ = engine(fake, monkeypatch)
    outcome = roll.forward([rollout.Wave("all", ["a", "b"], batch=1)], {"a": "new", "b": "new"})
    assert "did not put back a" in outcome.stopped and outcome.failed == ["a"]
    drained = [backends for fun, backends in fake.calls if fun == "release_lb.drain"]
    assert drained == [["a:80"]], "b was never taken out"


def test_a_rollback_never_drains_past_its_batch_while_a_node_is_still_out(monkeypatch):
    fake = FakeFleet()
    roll, _ = engine(fake, monkeypatch, auto_rollback=True)
    waves = [rollout.Wave("all", ["a", "b", "c"], batch=1)]

    def verify(minions, targets):  # b fails on the new release; its rollback cannot be checked either
        sick = [m for m in minions if m == "b"]
        return [m for m in minions if m not in sick], sick

    monkeypatch.setattr(roll, "_verify", verify)
    outcome = roll.forward(waves, {m: "new" for m in ("a", "b", "c")})
    assert outcome.held and "not rolled back: a" in outcome.held, outcome
    assert fake.down == {"b:80"}, "only b is out: a was not drained to go back"


def test_a_node_that_lost_its_call_is_read_back_once_it_answers_again(monkeypatch):
    fake = FlakyFleet({"release.current": 2})
    roll, reports = engine(fake, monkeypatch, timeout_s=30)
    monkeypatch.setattr(rollout.time, "sleep", lambda s: None)
    roll.errors["a"] = f"{fleet.NO_ANSWER} within 15 s (minion down or unreachable)"
    roll.errors["b"] = f"b {fleet.PROBE_UNANSWERED} within 3 s"
    running = roll._read_back(["a", "b"])
    assert running == {"a": {"result": True, "release": "app", "duration_s": 0}}
    assert [c for c in fake.calls if c[0] == "release.current"] == [("release.current", "lost")] * 2 + [
        ("release.current", ["a"])], "b, absent from the start, is not asked"


def test_a_rollback_without_a_load_balancer(monkeypatch):
    """Hostile: counting the nodes still out asked a load balancer that is not there (AttributeError)."""
    fake = FakeFleet()
    monkeypatch.setattr(fleet, "run_on", fake.run_on)
    roll = rollout.Rollout({}, "app", "pro", {"auto_rollback": True}, {}, {"a": "old", "b": "old"}, 1,
                           lambda *args, **kwargs: None, lambda message: None)

    def verify(minions, targets):  # b fails on the new release, passes on the old one
        sick = [m for m in minions if m == "b" and targets[m] != "old"]
        return [m for m in minions if m not in sick], sick

    monkeypatch.setattr(roll, "_verify", verify)
    outcome = roll.forward([rollout.Wave("all", ["a", "b"], batch=1)], {"a": "new", "b": "new"})
    assert outcome.stopped and sorted(outcome.reverted) == ["a", "b"] and not outcome.held
