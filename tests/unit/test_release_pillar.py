"""The release_fleet ext_pillar (_pillar/release_fleet.py), without a master: targets matched by glob."""

import fnmatch
import json
import os

import pytest

import release_published as published
from tests.unit.loader import load


class GlobMinions:
    """CkMinions for a test: every target is a glob over a fixed set of minions."""

    MINIONS = ("web1", "web2", "pre1")

    def __init__(self, opts):
        pass

    def check_minions(self, target, tgt_type="glob"):
        if tgt_type != "glob":
            raise ValueError(f"cannot evaluate {tgt_type}")
        return {"minions": [m for m in self.MINIONS if fnmatch.fnmatch(m, target)]}


@pytest.fixture
def pillar(tmp_path, monkeypatch):
    opts = {"cachedir": str(tmp_path), "file_roots": {"base": [str(tmp_path / "srv")]}, "release": {"projects": {
        "rainbow": {"repo": "r", "environments": {
            "test": {"target": "web1", "health": {"url": "http://{host}/health", "retries": 2}},
            "pro": {"waves": [{"name": "pre", "target": "pre1"}, {"name": "rest", "target": "web*"}]},
            "odd": {"target": "G@x:y", "tgt_type": "compound"},
        }},
        "broken": {"environments": {}},  # no repo: left out, the others still answer
    }}}
    module = load("_pillar/release_fleet.py", "release_fleet_pillar", opts=opts)
    monkeypatch.setattr(module.salt.utils.minions, "CkMinions", GlobMinions)
    module.state_dir = str(tmp_path / "release")  # the default: <cachedir>/release
    return module


def publish(state_dir, env, release):
    published.record_published_release(state_dir, "rainbow", env, release, f"salt://releases/{release}", "ab" * 32)


def test_nothing_published_gives_no_pillar(pillar):
    assert pillar.ext_pillar("web1", {}) == {}


def test_a_waves_environment_with_the_default_state_dir(pillar):
    publish(pillar.state_dir, "pro", "r_pro_1")
    for minion in ("pre1", "web2"):
        assert pillar.ext_pillar(minion, {}) == {"release_fleet": {"rainbow": {
            "env": "pro", "release": "r_pro_1", "source": "salt://releases/r_pro_1",
            "source_hash": "sha256=" + "ab" * 32}}}
    assert pillar.ext_pillar("db1", {}) == {}


def test_the_latest_published_of_matching_environments_wins(pillar):
    publish(pillar.state_dir, "pro", "r_pro_1")
    publish(pillar.state_dir, "test", "r_test_2")
    assert pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]["release"] == "r_test_2"
    assert pillar.ext_pillar("web2", {})["release_fleet"]["rainbow"]["release"] == "r_pro_1"


def test_the_environments_health_check_goes_to_its_nodes(pillar):
    publish(pillar.state_dir, "test", "r_test_2")
    entry = pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]
    assert entry["health"] == {"url": "http://{host}/health", "retries": 2}
    assert entry["host_grain"] == "fqdn_ip4[0]"


def test_a_target_the_master_cannot_evaluate_matches_nothing(pillar):
    publish(pillar.state_dir, "odd", "r_odd_1")
    assert pillar.ext_pillar("web1", {}) == {}


def test_an_environment_no_longer_configured_is_ignored(pillar):
    publish(pillar.state_dir, "gone", "r_gone_1")
    assert pillar.ext_pillar("web1", {}) == {}


def test_a_deploy_holding_the_lock_is_in_the_pillar_with_its_fence(pillar):
    publish(pillar.state_dir, "test", "r_test_2")
    lock = published.lock_path(pillar.state_dir, "rainbow", "test")
    os.makedirs(os.path.dirname(lock))
    with open(lock, "w") as handle:
        json.dump({"token": "t", "fence": 4}, handle)
    entry = pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]
    assert entry["release"] == "r_test_2" and entry["locked"] is True and entry["fence"] == 4
    with open(lock, "w") as handle:
        handle.write("{half")  # being written: held all the same
    assert pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]["locked"] is True
    os.unlink(lock)
    assert "locked" not in pillar.ext_pillar("web1", {})["release_fleet"]["rainbow"]
