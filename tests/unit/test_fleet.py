"""Batch sizes follow Salt's batch semantics."""

import _release_fleet as fleet
import pytest


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
