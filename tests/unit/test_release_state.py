"""The release states (_states/release.py) with the dunders Salt's loader would give them."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load

FLEET = {"rainbow": {"env": "pro", "release": "r_new", "source": "salt://releases/rainbow/r_new.tar.gz",
                     "source_hash": "sha256=" + "1" * 64}}


class Node:
    """A node's release module: records calls, holds ``current``."""

    def __init__(self, current=None, fail=None):
        self.current, self.fail, self.calls = current, fail, []

    def functions(self):
        return {
            "release.current": lambda project: self.current,
            "release.install": self.install,
            "release.activate": self.activate,
            "release.prune": self.prune,
            "cp.get_file_str": self.checksum,
        }

    @staticmethod
    def checksum(path):
        return "2" * 64 + "  r_old.tar.gz\n" if path.endswith("r_old.tar.gz.sha256") else None

    def install(self, project, name, source, source_hash, env=None):
        self.calls.append(("install", name, source, source_hash, env))
        if self.fail:
            raise CommandExecutionError(self.fail)

    def activate(self, project, name, env=None):
        self.calls.append(("activate", name))
        self.current = name

    def prune(self, project, keep=None, test=False):
        self.calls.append(("prune", keep, test))
        return {"removed": ["r_1", "r_2"], "kept": ["r_new"]}


def state(node, test=False, pillar=None):
    return load("_states/release.py", "release_state", salt=node.functions(), opts={"test": test},
                pillar={"release_fleet": FLEET} if pillar is None else pillar)


def test_deployed_with_test_says_what_would_change_and_changes_nothing():
    node = Node(current="r_old")
    ret = state(node, test=True).deployed("rainbow")
    assert ret == {"name": "rainbow", "result": None, "changes": {"old": "r_old", "new": "r_new"},
                   "comment": "rainbow would switch from r_old to r_new"}
    assert node.calls == [] and node.current == "r_old"


def test_deployed_installs_then_activates_the_published_release():
    node = Node(current="r_old")
    ret = state(node).deployed("rainbow")
    assert ret["result"] is True and ret["changes"] == {"old": "r_old", "new": "r_new"}, ret
    assert node.calls == [("install", "r_new", FLEET["rainbow"]["source"], FLEET["rainbow"]["source_hash"], "pro"),
                          ("activate", "r_new")]


def test_deployed_is_idempotent():
    node = Node(current="r_new")
    ret = state(node).deployed("rainbow")
    assert ret["result"] is True and ret["changes"] == {} and "already runs" in ret["comment"]
    assert node.calls == []


def test_deployed_without_a_published_release_is_a_no_op():
    ret = state(Node(), pillar={}).deployed("rainbow")
    assert ret["result"] is True and ret["changes"] == {} and "no release of rainbow" in ret["comment"]


def test_a_release_named_by_hand_is_found_beside_the_published_one():
    node = Node(current="r_new")
    ret = state(node).deployed("rainbow", release="r_old")
    assert ret["result"] is True, ret
    assert node.calls[0] == ("install", "r_old", "salt://releases/rainbow/r_old.tar.gz", "sha256=" + "2" * 64, "pro")


def test_a_failed_install_fails_the_state_and_does_not_switch():
    node = Node(current="r_old", fail="sha256 mismatch")
    ret = state(node).deployed("rainbow")
    assert ret == {"name": "rainbow", "result": False, "changes": {}, "comment": "sha256 mismatch"}
    assert node.current == "r_old" and [c[0] for c in node.calls] == ["install"]


@pytest.mark.parametrize(("test", "result", "comment"), [(True, None, "would remove 2"), (False, True, "removed 2")])
def test_pruned(test, result, comment):
    node = Node()
    ret = state(node, test=test).pruned("rainbow", keep=3)
    assert ret["result"] is result and ret["changes"] == {"removed": ["r_1", "r_2"]} and comment in ret["comment"]
    assert node.calls == [("prune", 3, test)]


@pytest.mark.parametrize("test", [False, True])
def test_deployed_refuses_while_a_deploy_of_its_environment_holds_the_lock(test):
    node = Node(current="r_old")
    pillar = {"release_fleet": {"rainbow": dict(FLEET["rainbow"], locked=True, fence=7)}}
    ret = state(node, test=test, pillar=pillar).deployed("rainbow")
    assert ret["result"] is False and ret["changes"] == {}, ret
    assert ret["comment"].startswith("deploy in progress") and "fence 7" in ret["comment"]
    assert node.calls == [] and node.current == "r_old"
    # Another environment's state on this node is not held by this lock.
    other = state(Node(current="r_old"), pillar=pillar).deployed("rainbow", env="test")
    assert other["result"] is True, other
