"""What release.recover decides from a dead run's journal and the nodes' real state."""

import json

import pytest

import _release_recover as recovery


def test_the_newest_deploy_or_rollback_is_recovered_only_when_unfinished():
    rows = [{"id": 9, "kind": "unlock", "result": 1}, {"id": 8, "kind": "deploy", "result": None},
            {"id": 7, "kind": "deploy", "result": 1}]
    assert recovery.dead_run(rows)["id"] == 8
    with pytest.raises(recovery.NothingToRecover, match="run 7"):
        recovery.dead_run(rows[2:])
    with pytest.raises(recovery.NothingToRecover, match="no deploy"):
        recovery.dead_run([{"id": 1, "kind": "recover", "result": None}])


def test_a_run_without_journal_switched_nothing():
    assert recovery.journal(None) is None
    assert recovery.journal({"journal": {"targets": {}}}) is None
    assert recovery.journal({"journal": {"targets": {"w1": "r2"}}}) == {"targets": {"w1": "r2"}}


def test_finish_takes_nodes_not_on_target_or_left_drained():
    targets = {"w1": "r2", "w2": "r2", "w3": "r2"}
    current = {"w1": "r2", "w2": "r2", "w3": "r1"}
    assert recovery.to_finish(targets, current, drained=["w2"]) == ["w2", "w3"]


def test_rollback_sends_back_only_switched_nodes_that_had_a_release():
    targets = {"w1": "r2", "w2": "r2", "w3": "r2", "w4": "r2"}
    previous = {"w1": "r1", "w2": "r1", "w3": None, "w4": "r1"}
    current = {"w1": "r2", "w2": "r1", "w3": "r2", "w4": None}
    assert recovery.to_send_back(targets, previous, current) == {"w1": "r1"}


def test_a_refused_deploy_after_the_dead_run_does_not_shadow_it():
    refused = {"id": 12, "kind": "deploy", "result": 0, "details": json.dumps({"failed_step": "lock"})}
    bad_input = {"id": 11, "kind": "rollback", "result": 0, "details": json.dumps({"failed_step": "configure"})}
    dead = {"id": 10, "kind": "deploy", "result": None, "details": None}
    assert recovery.dead_run([refused, bad_input, dead, {"id": 9, "kind": "deploy", "result": 1}])["id"] == 10
    # A deploy that failed at a node step did run: it is the newest, and finished.
    failed = {"id": 13, "kind": "deploy", "result": 0, "details": json.dumps({"failed_step": "rollout"})}
    with pytest.raises(recovery.NothingToRecover, match="run 13"):
        recovery.dead_run([failed, refused, dead])


def test_settle_puts_back_only_what_the_dead_run_drained():
    down = ["w1", "w2", "w3"]
    backends = {"w1": "a:80", "w2": "b:80", "w3": "c:80"}
    # w3 was down by an operator: in neither the journal nor the load balancer's record of the run
    assert recovery.to_settle(down, backends, {"a:80", "b:80"}) == ["w1", "w2"]
    assert recovery.to_settle(down, backends, set()) == []


def test_a_normal_rollback_gives_the_nodes_the_masters_bad_marks(tmp_path, monkeypatch):
    """Hostile: a node's own target could be a release only the master had marked bad."""
    import _release_fleet as fleet  # pylint: disable=import-outside-toplevel
    import _release_rollback as rollback  # pylint: disable=import-outside-toplevel
    import _release_run as runs  # pylint: disable=import-outside-toplevel

    opts = {"cachedir": str(tmp_path), "file_roots": {"base": [str(tmp_path / "srv")]},
            "release": {"projects": {"app": {"repo": "/git/app", "environments": {"pro": {"target": "w*"}}}}}}
    run = runs.begin({"opts": opts}, "app", "pro", "rollback", "alice", "cli", {}, kind="rollback")
    run.records.mark_bad("app", "pro", ["r2"], run.record_id)
    asked = {}

    def run_on(opts, minions, fun, arg=(), kwarg=None, **_):
        asked.update(kwarg or {})
        good = "r1" if "r2" in (kwarg or {}).get("avoid", []) else "r2"
        return {"w1": (True, {"releases": ["r1", "r2", "r3"], "current": "r3", "rollback_target": good})}

    monkeypatch.setattr(fleet, "run_on", run_on)
    monkeypatch.setattr(rollback.switch, "find_staged", lambda run: None)
    rollback.choose(run)
    assert asked["avoid"] == ["r2"] and run.targets == {"w1": "r1"}


def test_a_failed_run_that_lost_track_of_a_node_is_recovered_until_it_is():
    """A master restart under a run: it failed with a node it could not read back, maybe on its release."""
    nodes = {"web1": {"release": None, "previous": "r1"}, "web2": {"release": "r1", "previous": "r1"}}
    lost = {"id": 12, "kind": "deploy", "result": 0, "release": "r2", "details": json.dumps({"nodes": nodes})}
    assert recovery.unsettled(lost) == {"web1": "r1"}
    assert recovery.dead_run([lost])["id"] == 12
    settled = dict(lost, details=json.dumps({"nodes": nodes, "recovered_by": 13}))
    with pytest.raises(recovery.NothingToRecover):
        recovery.dead_run([settled])
    known = dict(lost, details=json.dumps({"nodes": dict(nodes, web1={"release": "r1", "previous": "r1"})}))
    with pytest.raises(recovery.NothingToRecover):
        recovery.dead_run([known])


def test_a_failed_deploy_that_left_a_node_on_its_release_or_drained_is_recovered():
    """Its rollback could not finish (a load balancer or master lost mid-way): recover takes over from there."""
    nodes = {"web1": {"release": "r2", "previous": "r1"}, "web2": {"release": "r1", "previous": "r1"},
             "web3": {"release": "r2", "previous": "r2"}}  # web3 ran r2 before: nothing to send back
    left = {"id": 14, "kind": "deploy", "result": 0, "release": "r2", "details": json.dumps({"nodes": nodes})}
    assert recovery.unsettled(left) == {"web1": "r1"}
    assert recovery.dead_run([left])["id"] == 14
    # A failed rollback's nodes on its target are where it sent them: not its to undo.
    assert recovery.unsettled(dict(left, kind="rollback")) == {}
    # Back on the old release everywhere, but a node still out of the load balancer.
    back = {m: {"release": "r1", "previous": "r1"} for m in nodes}
    out = dict(left, details=json.dumps({"nodes": back, "journal": {"targets": {"web1": "r2"}, "drained": ["b1"]}}))
    assert recovery.unsettled(out) == {} and recovery.left_drained(out) == ["b1"]
    assert recovery.dead_run([out])["id"] == 14
    clean = dict(left, details=json.dumps({"nodes": back, "journal": {"targets": {"web1": "r2"}, "drained": []}}))
    with pytest.raises(recovery.NothingToRecover):
        recovery.dead_run([clean])
