"""The release states (_states/release.py) with the dunders Salt's loader would give them."""

import http.server
import threading

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load

FLEET = {"rainbow": {"env": "pro", "release": "r_new", "source": "salt://releases/rainbow/r_new.tar.gz",
                     "source_hash": "sha256=" + "1" * 64}}


class Node:
    """A node's release module: records calls, holds ``current``."""

    def __init__(self, current=None, fail=None, installed=()):
        self.current, self.fail, self.calls = current, fail, []
        self.installed = list(installed)

    def functions(self):
        return {
            "release.current": lambda project: self.current,
            "release.list": lambda project: {"releases": self.installed, "current": self.current},
            "release.install": self.install,
            "release.activate": self.activate,
            "release.confirm": self.confirm,
            "release.prune": self.prune,
            "cp.get_file_str": self.checksum,
            "grains.items": lambda: {"id": "web1", "web": {"addr": "127.0.0.1"}},
        }

    @staticmethod
    def checksum(path):
        return "2" * 64 + "  r_old.tar.gz\n" if path.endswith("r_old.tar.gz.sha256") else None

    def install(self, project, name, source, source_hash, env=None):
        self.calls.append(("install", name, source, source_hash, env))
        if self.fail:
            raise CommandExecutionError(self.fail)
        self.installed.append(name)
        return {"result": True, "release": name, "changed": True, "transfer": "full"}

    def activate(self, project, name, env=None, **kwargs):
        self.calls.append(("activate", name, *sorted(kwargs)))
        previous, self.current = self.current, name
        return {"result": True, "release": name, "previous": previous, "reload": {"result": True}}

    def confirm(self, project, release, env=None):
        self.calls.append(("confirm", release))

    def prune(self, project, keep=None, test=False):
        self.calls.append(("prune", keep, test))
        return {"removed": ["r_1", "r_2"], "kept": ["r_new"]}


def state(node, test=False, pillar=None):
    return load("_states/release.py", "release_state", salt=node.functions(), opts={"test": test},
                pillar={"release_fleet": FLEET} if pillar is None else pillar)


@pytest.fixture
def app():
    """A real HTTP server answering /health with whatever ``app.release`` is."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"serving {server.release}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.release = "r_new"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def with_health(server):
    health = {"url": f"http://{{host}}:{server.server_port}/{{project}}/health?node={{minion}}", "retries": 1,
              "interval_s": 0}
    return {"release_fleet": {"rainbow": dict(FLEET["rainbow"], health=health, host_grain="web:addr")}}


def test_deployed_with_test_says_what_would_change_and_changes_nothing(app):
    node = Node(current="r_old")
    ret = state(node, test=True, pillar=with_health(app)).deployed("rainbow")
    port = app.server_port
    assert ret == {"name": "rainbow", "result": None, "changes": {"old": "r_old", "new": "r_new"},
                   "comment": f"would install r_new from {FLEET['rainbow']['source']}; switch rainbow from r_old "
                              f"to r_new; reload its stack; check http://127.0.0.1:{port}/rainbow/health?node=web1"}
    assert node.calls == [] and node.current == "r_old"


def test_deployed_installs_activates_and_confirms_the_published_release():
    node = Node(current="r_old")
    ret = state(node).deployed("rainbow")
    assert ret["result"] is True and ret["changes"] == {"old": "r_old", "new": "r_new"}, ret
    assert node.calls == [("install", "r_new", FLEET["rainbow"]["source"], FLEET["rainbow"]["source_hash"], "pro"),
                          ("activate", "r_new"), ("confirm", "r_new")]
    assert ret["comment"] == ("rainbow: installed r_new (full); switched from r_old, stack reloaded; "
                              "current reads back r_new")


def test_a_node_without_the_host_grain_fails_before_any_change(app):
    pillar = with_health(app)
    pillar["release_fleet"]["rainbow"]["host_grain"] = "nosuch"
    node = Node(current="r_old")
    ret = state(node, pillar=pillar).deployed("rainbow")
    assert ret["result"] is False and "no 'nosuch' grain on this node" in ret["comment"], ret
    assert node.calls == []


def test_deployed_checks_the_nodes_health_before_it_confirms(app):
    node = Node(current="r_old")
    ret = state(node, pillar=with_health(app)).deployed("rainbow")
    assert ret["result"] is True and ret["changes"] == {"old": "r_old", "new": "r_new"}, ret
    assert f"health check http://127.0.0.1:{app.server_port}/rainbow/health?node=web1 passed" in ret["comment"]
    assert node.calls[-1] == ("confirm", "r_new")


def test_a_failed_health_check_switches_back_and_fails(app):
    app.release = "r_old"  # the app still serves the old code after the switch
    node = Node(current="r_old")
    ret = state(node, pillar=with_health(app)).deployed("rainbow")
    assert ret["result"] is False and ret["changes"] == {}, ret
    assert "health check failed" in ret["comment"] and "expected 'r_new'" in ret["comment"], ret
    assert ret["comment"].endswith("switched back to r_old; current reads back r_old"), ret
    assert node.current == "r_old" and ("activate", "r_old", "force", "rollback") in node.calls
    assert ("confirm", "r_new") not in node.calls


def test_a_new_node_that_fails_its_health_check_says_so_and_keeps_the_release(app):
    app.release = "something else"
    node = Node(current=None)
    ret = state(node, pillar=with_health(app)).deployed("rainbow")
    assert ret["result"] is False and ret["changes"] == {"old": None, "new": "r_new"}, ret
    assert "health check failed" in ret["comment"] and ret["comment"].endswith("current reads back r_new")


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
    assert ret["result"] is True and ret["changes"] == {"old": "r_new", "new": "r_old"}, ret
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
