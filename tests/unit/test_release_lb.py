"""release_lb on a real upstream file, with real commands as the check and the reload."""

import multiprocessing
import signal

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load

UPSTREAM = "server 10.0.0.1:80;\nserver 10.0.0.2:80;\n"


@pytest.fixture
def lb(tmp_path):
    module = load("_modules/release_lb.py", "release_lb_under_test", opts={"cachedir": str(tmp_path / "cache")})
    upstream = tmp_path / "app.upstream"
    upstream.write_text(UPSTREAM)
    reloads = tmp_path / "reloads"
    module.test_file = str(upstream)
    module.reload = ["sh", "-c", f"echo reload >> {reloads}"]
    module.reloads = lambda: len(reloads.read_text().splitlines()) if reloads.exists() else 0
    # a check that kill -9s the process making the call, once (the undo runs the same check)
    module.killing_check = ["sh", "-c", f"test -e {tmp_path}/killed || {{ touch {tmp_path}/killed; kill -9 $PPID; }}"]
    return module


def test_drain_and_undrain_say_what_they_changed_and_who_drained(lb):
    ret = lb.drain(lb.test_file, ["10.0.0.1:80"], test_cmd=["true"], reload_cmd=lb.reload, by="p/e run 7")
    assert ret["drained"] == ["10.0.0.1:80"] and lb.reloads() == 1
    assert lb.status(lb.test_file) == {"10.0.0.1:80": True, "10.0.0.2:80": False}
    assert lb.drained_by(lb.test_file) == {"10.0.0.1:80": "p/e run 7"}
    ret = lb.undrain(lb.test_file, ["10.0.0.1:80"], test_cmd=["true"], reload_cmd=lb.reload)
    assert ret["undrained"] == ["10.0.0.1:80"] and lb.drained_by(lb.test_file) == {}
    assert lb.settle(lb.test_file) == {"result": True, "undone": None}


def test_a_failed_check_puts_the_file_and_the_record_back(lb):
    with pytest.raises(CommandExecutionError, match="configuration check failed"):
        lb.drain(lb.test_file, ["10.0.0.1:80"], test_cmd=["false"], reload_cmd=lb.reload, by="p/e run 7")
    with open(lb.test_file, encoding="utf-8") as handle:
        assert handle.read() == UPSTREAM
    assert lb.drained_by(lb.test_file) == {} and lb.reloads() == 0


def _drain_killed_at_its_check(lb):
    """A drain whose check kills -9 the process making it: killed between writing the file and the reload."""
    lb.drain(lb.test_file, ["10.0.0.1:80"], test_cmd=lb.killing_check, reload_cmd=lb.reload, by="p/e run 7")


def test_a_drain_killed_before_the_reload_is_undone_by_the_next_call(lb):
    """Hostile: the file said down (and the record said run 7 drained it) while nginx still served it."""
    child = multiprocessing.get_context("fork").Process(target=_drain_killed_at_its_check, args=(lb,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    with open(lb.test_file, encoding="utf-8") as handle:
        assert "10.0.0.1:80 down;" in handle.read(), "the killed call wrote the file"
    assert lb.reloads() == 0
    # The next call, whatever it is, puts the file back and makes nginx load it.
    assert lb.status(lb.test_file) == {"10.0.0.1:80": False, "10.0.0.2:80": False}
    with open(lb.test_file, encoding="utf-8") as handle:
        assert handle.read() == UPSTREAM
    assert lb.reloads() == 1 and lb.drained_by(lb.test_file) == {}
    assert lb.settle(lb.test_file)["undone"] is None, "undone once"


def test_an_undo_whose_reload_fails_is_tried_again(lb, tmp_path):
    broken = tmp_path / "broken"
    broken.touch()
    failing_reload = ["sh", "-c", f"test ! -e {broken}"]
    child = multiprocessing.get_context("fork").Process(
        target=lambda: lb.drain(lb.test_file, ["10.0.0.2:80"], test_cmd=lb.killing_check,
                                reload_cmd=failing_reload))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    with pytest.raises(CommandExecutionError, match="undoing a drain of 10.0.0.2:80"):
        lb.settle(lb.test_file)
    broken.unlink()
    assert lb.settle(lb.test_file)["undone"] == "drain of 10.0.0.2:80"
    assert lb.status(lb.test_file) == {"10.0.0.1:80": False, "10.0.0.2:80": False}
