"""The master<->minion contract: names, sanitising, manifests, event tags."""

import datetime

import pytest

import release_contract as contract

BUILT = datetime.datetime(2026, 11, 26, 10, 15, 0, tzinfo=datetime.timezone.utc)


def test_release_name_has_seven_fields_and_a_colon_free_utc_stamp():
    name = contract.release_name("rainbow", "test", "v1.1.0", "master", BUILT, "alice")
    assert name == "rainbow_test_v1.1.0_master_2026-11-26_101500_alice"
    assert ":" not in name
    assert contract.parse_release_name(name) == {
        "project": "rainbow", "env": "test", "version": "v1.1.0", "branch": "master",
        "timestamp": "2026-11-26_101500", "author": "alice",
    }


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("release/2.0", "release-2.0"),
        ("v1.1.0-3-gabc1234", "v1.1.0-3-gabc1234"),
        ("Jane Doe <jane@x>", "Jane-Doe-jane-x"),
        ("--upload-pack=x", "upload-pack-x"),
        ("..hidden", "hidden"),
        ("under_score", "under-score"),
        ("", "unknown"),
        ("///", "unknown"),
    ],
)
def test_sanitize_field_keeps_only_safe_characters(raw, clean):
    assert contract.sanitize_field(raw) == clean


def test_release_name_sanitises_every_field():
    name = contract.release_name("rain bow", "te_st", "v1/2", "feat/x y", BUILT, "Bob O'Neil")
    assert name == "rain-bow_te-st_v1-2_feat-x-y_2026-11-26_101500_Bob-O-Neil"
    assert contract.is_release_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "rainbow_test_v1_master_2026-11-26_101500",           # no author
        "rainbow_test_v1_master_2026-11-26_10:15:00_alice",   # colon
        "rainbow_test_v1_master_2026-13-40_101500_alice",     # no such date
        "../rainbow_test_v1_master_2026-11-26_101500_alice",
        "rainbow_test_v1_master_2026-11-26_101500_alice.partial/x",
        "",
        None,
    ],
)
def test_non_names_are_refused(name):
    assert contract.parse_release_name(name) is None
    assert not contract.is_release_name(name)


def test_sort_key_orders_by_build_time_not_by_name():
    older = "zeta_test_v9_master_2026-01-01_000000_a"
    newer = "alpha_test_v1_master_2026-06-01_000000_a"
    assert sorted([newer, older], key=contract.release_sort_key) == [older, newer]


def _manifest(name):
    return {field: "x" for field in contract.MANIFEST_FIELDS} | {"name": name, "file_count": 3}


def test_a_complete_manifest_naming_the_release_is_valid():
    assert contract.validate_manifest(_manifest("r"), "r") == []


def test_manifest_problems_are_each_named():
    manifest = _manifest("other")
    del manifest["commit"], manifest["file_count"]
    problems = contract.validate_manifest(manifest, "r")
    assert "the manifest lacks 'commit'" in problems
    assert "the manifest lacks 'file_count'" in problems
    assert any("names release 'other', expected 'r'" in p for p in problems)
    assert contract.validate_manifest(["not", "a", "dict"], "r") == ["the manifest is not a JSON object"]


def test_event_tags():
    assert contract.event_tag("rainbow", "test", "web1", "install") == "release/rainbow/test/web1/install"
    assert contract.event_tag("rainbow", "test", "finish") == "release/rainbow/test/finish"
    for bad in (("rain/bow", "test"), ("rainbow", ""), ("rainbow", "test", None)):
        with pytest.raises(ValueError):
            contract.event_tag(*bad)


def test_phase_event_and_node_result_shapes():
    assert contract.phase_event("r", 1, 0.12345) == {
        "release": "r", "result": True, "duration_s": 0.123, "error": None,
    }
    assert contract.phase_event("r", False, 1, "boom", previous="p")["previous"] == "p"
    assert contract.node_result(False, error="x") == {
        "result": False, "release": None, "previous": None, "error": "x",
    }


# ---------------------------------------------------------------- node returns (the runner's side)


@pytest.mark.parametrize("kind, ret", [
    ("list", contract.list_return(["a", "b"], "b", "a", [], "a")),
    ("install", contract.install_return("r", "/srv/x/releases/r", False)),
    ("install", contract.install_return("r", "/p", True, transfer="full", delta_refused="no delta offered",
                                        staged=False)),
    ("install", contract.install_return("r", "/p", True, transfer="delta", base="b", staged=True)),
    ("activate", contract.activate_return("r", None) | {"reload": {"kind": None}, "duration_s": 0.1}),
])
def test_built_node_returns_validate(kind, ret):
    assert contract.validate_return(kind, ret) == []


def test_activate_return_says_whether_it_switched():
    assert contract.activate_return("r", "r")["changed"] is False
    assert contract.activate_return("r", "q") == {"result": True, "release": "r", "previous": "q", "changed": True}


@pytest.mark.parametrize("kind, ret, problem", [
    ("list", {"releases": [], "current": None}, "list return lacks 'bad'"),
    ("install", {"result": True, "release": "r", "changed": "yes", "path": "/p"}, "'changed' is a str"),
    ("install", {"result": True, "release": "r", "changed": True, "path": "/p", "transfer": "rsync"},
     "transfer is 'rsync'"),
    ("activate", {"result": True, "release": "r", "previous": None, "changed": 1}, "'changed' is a int"),
    ("activate", {"result": True, "release": "r", "previous": None, "changed": True, "extra": 1},
     "unknown key 'extra'"),
    ("list", ["not", "a", "dict"], "must be a mapping"),
])
def test_bad_node_returns_are_named(kind, ret, problem):
    assert any(problem in p for p in contract.validate_return(kind, ret)), contract.validate_return(kind, ret)


def test_phases_constant_is_gone():
    assert not hasattr(contract, "PHASES")
