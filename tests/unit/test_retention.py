"""Pure rules: rollback targets, what prune may remove, node status, and the statistics."""

import pytest

import _release_node_state as node_state
import _release_stats as stats
import release_retention as retention

R = [f"app_pro_v1.{i}.0_master_2026-11-2{i}_100000_ops" for i in range(1, 6)]


def test_rollback_target_is_the_newest_confirmed_release_never_bad():
    assert retention.rollback_target(R[:3], R[2], good=R[:3]) == R[1]
    # Back from R3 to R2 (R3 bad), then again: R1, not R3.
    assert retention.rollback_target(R[:3], R[1], good=R[:3], bad=[R[2]]) == R[0]
    assert retention.rollback_target(R[:3], R[0], good=R[:3], bad=[R[2], R[1]]) is None
    # Confirmed order, not name order: R1 confirmed again after R2 is the one to go back to.
    assert retention.rollback_target(R[:4], R[3], good=retention.remember_good(R[:3], R[0])) == R[0]
    # Confirmed but no longer installed: skipped.
    assert retention.rollback_target(R[1:4], R[3], good=R[:1] + R[2:3]) == R[2]


def test_without_confirmed_history_there_is_no_rollback_target():
    # Installed (staged) releases that never passed a check here are never a target, even newer
    # ones; no fallback to the newest installed release.
    assert retention.rollback_target(R, R[3]) is None
    assert retention.rollback_target(R, R[3], good=[R[3]]) is None
    assert retention.rollback_target(R, R[1], good=[R[0]], bad=[R[0]]) is None
    assert retention.rollback_target(R, None) is None


def test_remember_good_moves_a_release_to_the_end_once_and_is_bounded():
    assert retention.remember_good([R[0], R[1]], R[0]) == [R[1], R[0]]
    many = [f"app_pro_v1.{i}.0_master_2026-11-20_100000_ops" for i in range(60)]
    assert len(retention.remember_good(many, R[0])) == retention.GOOD_LENGTH


def test_prunable_keeps_newest_current_and_protected():
    assert retention.prunable(R, R[0], 2, [R[1]]) == [R[2]]
    assert retention.prunable(R, R[4], 2) == R[:3]
    assert retention.prunable(R, "not-installed", 1) == []  # unsure: keep everything
    assert retention.prunable(R, None, 1) == []
    with pytest.raises(ValueError):
        retention.prunable(R, R[4], 0)


def test_prune_keeps_good_releases_over_newer_unconfirmed_and_bad_ones():
    # current R5; R1, R2 confirmed; R3 bad, R4 never confirmed: keep 3 -> R5, R2, R1.
    assert retention.prunable(R, R[4], 3, good=[R[0], R[1], R[4]], bad=[R[2]]) == [R[2], R[3]]
    # keep 4: the unconfirmed R4 before the bad R3.
    assert retention.prunable(R, R[4], 4, good=[R[0], R[1], R[4]], bad=[R[2]]) == [R[2]]
    # A bad current and a protected rollback target are never removed, whatever keep says.
    assert retention.prunable(R, R[2], 1, [R[0]], good=[R[0], R[4]], bad=[R[2]]) == [R[1], R[3]]


def listed(releases, current, target, bad=()):
    return (True, {"releases": releases, "current": current, "previous": None,
                   "rollback_target": target, "bad": list(bad)})


def test_rollback_targets_refuse_the_whole_fleet():
    fleet = {"a": listed(R[:2], R[1], R[0]), "b": listed(R[1:2], R[1], None)}
    with pytest.raises(node_state.RollbackRefused, match="nothing to roll back to on b"):
        node_state.rollback_targets(fleet)
    with pytest.raises(node_state.RollbackRefused, match=f"release {R[0]} is not on b"):
        node_state.rollback_targets(fleet, R[0])
    with pytest.raises(node_state.RollbackRefused, match="no node was touched: c: no answer"):
        node_state.rollback_targets(dict(fleet, c=(False, "no answer")))
    assert node_state.rollback_targets(fleet, R[1]) == {"a": R[1], "b": R[1]}


def test_status_flags_the_odd_node_out():
    found = node_state.status({"a": listed(R[:3], R[2], R[1]), "b": listed(R[:3], R[2], R[1]),
                           "c": listed(R[:3], R[1], R[0]), "d": (False, "no answer")})
    assert found["out_of_step"] == ["c", "d"] and found["releases"] == {R[2]: 2, R[1]: 1}
    assert found["nodes"]["a"]["kept"] == R[:2]


def row(run_id, kind, result, finished_s, duration_s=1.0, env="pro"):
    return {"id": run_id, "kind": kind, "result": result, "env": env, "duration_s": duration_s,
            "details": None, "finished_at": f"2026-11-26T10:00:{finished_s:02d}.000+00:00"}


def test_stats_by_hand():
    rows = [row(1, "deploy", 1, 0, 2.0), row(2, "deploy", 0, 10, 1.0), row(3, "deploy", 0, 20, 3.0),
            row(4, "rollback", 1, 25), row(5, "deploy", 1, 40, 4.0), row(6, "deploy", None, 50, None)]
    figures = stats.summarize(rows)
    assert (figures["deploys"], figures["succeeded"], figures["failures"], figures["unfinished"]) == (5, 2, 2, 1)
    assert figures["rollbacks"] == 1 and figures["success_rate"] == 0.5
    assert figures["duration_median_s"] == 2.5 and figures["duration_p95_s"] == 4.0
    assert figures["mttr_s"] == 15.0  # one outage: first failure at :10, the rollback at :25 recovers


def test_a_node_from_before_the_good_history_seeds_it_with_the_release_it_ran():
    # no "good" at all: the release the confirmed deploy replaced was in service until then
    assert retention.seed_good({"previous": R[0], "bad": []}) == [R[0]]
    assert retention.seed_good({"previous": R[0], "bad": [R[0]]}) == [], "never a bad one"
    assert retention.seed_good({"previous": None}) == [], "a first deploy has nothing to seed"
    # a node with a history (even an empty one) keeps it: only confirmed releases count there
    assert retention.seed_good({"good": [], "previous": R[0]}) == []
    assert retention.seed_good({"good": [R[1]], "previous": R[0]}) == [R[1]]
