"""Batch sizes follow Salt's batch semantics."""

import threading
import time

import pytest

import _release_fleet as fleet


@pytest.mark.parametrize(
    "spec, count, size",
    [
        ("25%", 3, 1),      # rounds down, never below 1
        ("50%", 4, 2),
        ("100%", 3, 3),
        ("100 %", 3, 3),
        ("66.7%", 3, 2),
        (2, 3, 2),
        ("2", 3, 2),
        (1, 3, 1),
        (10, 3, 3),         # never more than there are nodes
        (0, 3, 1),
        (None, 3, 3),
        ("25%", 0, 1),
    ],
)
def test_batch_size(spec, count, size):
    assert fleet.batch_size(spec, count) == size


def test_batches_cut_in_order():
    assert fleet.batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert fleet.batches(["a", "b", "c"], "25%") == [["a"], ["b"], ["c"]]
    assert fleet.batches(["a", "b", "c"], "100%") == [["a", "b", "c"]]


@pytest.mark.parametrize("spec", ["two", "%", "1.5.2%", [1]])
def test_nonsense_batch_specs_are_refused(spec):
    with pytest.raises(fleet.FleetError, match="batch must be N or 'N%'"):
        fleet.batch_size(spec, 3)


@pytest.mark.parametrize(
    "full, expected",
    [
        (None, (False, "no answer within 5 s (minion down or unreachable)")),
        ({}, (False, "no answer within 5 s (minion down or unreachable)")),
        ({"ret": {"result": True}, "retcode": 0}, (True, {"result": True})),
        ({"ret": "ERROR executing 'release.install': boom", "retcode": 1}, (False, "boom")),
        ({"ret": "ERROR: nope", "retcode": 1}, (False, "nope")),
        ({"ret": {"result": False, "error": "bad"}, "retcode": 0}, (False, "bad")),
    ],
)
def test_outcome_of_a_minion_return(full, expected):
    assert fleet._outcome(full, 5) == expected


# ---------------------------------------------------------------- presence probe


@pytest.fixture(autouse=True)
def no_answers_yet(monkeypatch):
    """Each test starts with no minion having answered (the record is per thread, kept for the process)."""
    monkeypatch.setattr(fleet, "_LOCAL", threading.local())


class FakeClient:
    """Stands in for salt.client.LocalClient: records the targets of each published job."""

    calls = []

    def __init__(self, mopts):
        pass

    def run_job(self, minions, fun, **kwargs):
        FakeClient.calls.append((list(minions), fun))
        return {"jid": "1", "minions": list(minions)}

    def get_iter_returns(self, jid, minions, timeout, block):
        for minion in minions:
            yield {minion: {"ret": {"result": True}, "retcode": 0}}


def test_run_on_calls_only_the_minions_that_answered_the_probe(monkeypatch):
    FakeClient.calls = []
    monkeypatch.setattr(fleet.salt.client, "LocalClient", FakeClient)
    monkeypatch.setattr(fleet, "present", lambda opts, minions, timeout_s: {"web1", "web3"})
    outcomes = fleet.run_on({}, ["web1", "web2", "web3"], "release.current", presence_timeout_s=2)
    assert FakeClient.calls == [(["web1", "web3"], "release.current")]
    assert outcomes["web2"] == (False, "web2 did not answer a presence probe within 2 s")
    assert outcomes["web1"] == (True, {"result": True})
    assert fleet.unreachable(outcomes["web2"][1])


def test_run_on_without_a_probe_calls_every_minion(monkeypatch):
    FakeClient.calls = []
    monkeypatch.setattr(fleet.salt.client, "LocalClient", FakeClient)
    monkeypatch.setattr(fleet, "present", lambda *args: pytest.fail("probed with presence_timeout_s=0"))
    fleet.run_on({}, ["web1", "web2"], "test.ping", presence_timeout_s=0)
    assert FakeClient.calls == [(["web1", "web2"], "test.ping")]


@pytest.mark.parametrize(
    "error, unreachable",
    [
        ("no answer within 60 s (minion down or unreachable)", True),
        ("web3 did not answer a presence probe within 3 s", True),
        ("nginx reload failed (exit 1): boom", False),
        (None, False),
    ],
)
def test_unreachable(error, unreachable):
    assert fleet.unreachable(error) is unreachable


def test_a_minion_that_just_answered_is_not_probed_again(monkeypatch):
    FakeClient.calls = []
    probed = []
    monkeypatch.setattr(fleet.salt.client, "LocalClient", FakeClient)
    monkeypatch.setattr(fleet, "present", lambda opts, minions, timeout_s: probed.append(list(minions)) or {"web1"})
    first = fleet.run_on({}, ["web1", "web2"], "release.current", presence_timeout_s=2)
    assert first["web2"] == (False, "web2 did not answer a presence probe within 2 s")
    fleet.run_on({}, ["web1", "web2"], "release.install", presence_timeout_s=2)
    # web1 returned a job a moment ago; web2 never did and is probed again.
    assert probed == [["web1", "web2"], ["web2"]]
    assert FakeClient.calls == [(["web1"], "release.current"), (["web1"], "release.install")]


def test_a_minion_is_probed_again_once_its_answer_is_old(monkeypatch):
    probed = []
    monkeypatch.setattr(fleet.salt.client, "LocalClient", FakeClient)
    monkeypatch.setattr(fleet, "present", lambda opts, minions, timeout_s: probed.append(list(minions)) or set(minions))
    fleet.run_on({}, ["web1"], "release.current", presence_timeout_s=2)
    clock = time.monotonic() + fleet.FRESH_S + 1
    monkeypatch.setattr(fleet.time, "monotonic", lambda: clock)
    fleet.run_on({}, ["web1"], "release.current", presence_timeout_s=2)
    assert probed == [["web1"], ["web1"]]


class SlowBus:
    """A LocalClient whose ping answers come one every ``gap`` (fake) seconds, then silence."""

    def __init__(self, clock, answers, gap):
        self.clock, self.answers, self.gap = clock, answers, gap

    def run_job(self, *args, **kwargs):
        return {"jid": "1"}

    def get_returns_no_block(self, tag, match_type=None):
        for minion in self.answers:
            self.clock[0] += self.gap
            yield {"data": {"id": minion, "return": True}}
        while True:
            self.clock[0] += 0.5
            yield None


def test_the_probe_waits_while_answers_keep_coming_and_gives_up_after_silence(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fleet.time, "monotonic", lambda: clock[0])
    minions = [f"web{i}" for i in range(30)]
    # 29 answers, 0.5 s apart: 14.5 s in all, far past the 3 s window, but never 3 s of silence.
    monkeypatch.setattr(fleet, "_client", lambda opts: SlowBus(clock, minions[:29], 0.5))
    assert fleet.present({}, minions, 3) == set(minions[:29])
    assert 14.5 + 3 <= clock[0] <= 14.5 + 3.5  # the one that is gone cost 3 s of silence


class HungJob:
    """A LocalClient whose job never returns on ``hung`` and whose nodes all say it still runs."""

    def __init__(self, clock, hung):
        self.clock, self.hung, self.asked_after = clock, hung, None

    def run_job(self, minions, fun, **kwargs):
        return {"jid": "1", "minions": list(minions)}

    def get_iter_returns(self, jid, minions, timeout, block):
        self.asked_after = timeout
        for minion in minions:
            if minion not in self.hung:
                yield {minion: {"ret": True, "retcode": 0}}
        while True:  # Salt yields None while it waits (block=False), asking find_job every so often
            self.clock[0] += 1
            yield None


def test_a_call_asks_early_whether_its_job_runs_and_ends_at_its_timeout(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fleet.time, "monotonic", lambda: clock[0])
    client = HungJob(clock, {"web2"})
    monkeypatch.setattr(fleet, "_client", lambda opts: client)
    monkeypatch.setattr(fleet, "_forget_client", lambda opts: None)
    outcomes = fleet.run_on({}, ["web1", "web2"], "release.install", timeout_s=300, presence_timeout_s=0)
    # Salt's cmd would first ask after the whole 300 s, then wait as long as the job runs.
    assert client.asked_after == fleet.LIVENESS_S
    assert outcomes["web1"] == (True, True)
    assert outcomes["web2"] == (False, "no answer within 300 s (minion down or unreachable)")
    assert 300 <= clock[0] <= 302, "the wait ends at the call's timeout, whatever the nodes say"
