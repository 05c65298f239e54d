"""Pure parts of the release_stack module: addresses, FastCGI encoding, Tomcat cleaning, who runs what."""

import os
import pwd
import struct

import pytest
from salt.exceptions import CommandExecutionError

import release_fastcgi as fastcgi
import release_stack as stack_mod


@pytest.fixture
def module(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_mod, "__opts__", {"cachedir": str(tmp_path / "cache")}, raising=False)
    monkeypatch.setattr(stack_mod, "__pillar__", {}, raising=False)
    return stack_mod


@pytest.mark.parametrize("spec, expected", [
    ("/run/php/php8.2-fpm.sock", "/run/php/php8.2-fpm.sock"),
    ("127.0.0.1:9000", ("127.0.0.1", 9000)),
    ("9000", ("127.0.0.1", 9000)),
    (9000, ("127.0.0.1", 9000)),
    ("[::1]:9000", ("::1", 9000)),
])
def test_address_forms(spec, expected):
    assert fastcgi.address(spec) == expected


def test_address_rejects_nonsense():
    with pytest.raises(CommandExecutionError, match="host:port"):
        fastcgi.address("localhost:http")


def test_fastcgi_pairs_use_four_byte_lengths_past_127():
    short = fastcgi.pair("A", "b")
    assert short == b"\x01\x01Ab"
    long_value = "x" * 200
    encoded = fastcgi.pair("SCRIPT_FILENAME", long_value)
    assert encoded[0] == 15
    assert struct.unpack("!I", encoded[1:5])[0] == 0x80000000 | 200
    assert encoded.endswith(long_value.encode())


def tomcat_base(tmp_path):
    base = tmp_path / "base"
    (base / "work" / "Catalina" / "localhost" / "ROOT" / "org").mkdir(parents=True)
    (base / "work" / "Catalina" / "localhost" / "ROOT" / "org" / "index_jsp.class").write_text("x")
    (base / "work" / "Catalina" / "localhost" / "other").mkdir()
    (base / "temp").mkdir()
    (base / "temp" / "upload.tmp").write_text("x")
    return base


def test_clean_removes_the_context_work_and_temp_but_nothing_else(tmp_path):
    base = tomcat_base(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    os.symlink(victim, base / "temp" / "link")
    removed = stack_mod._clean_tomcat(str(base), "ROOT")
    assert sorted(removed) == ["temp/link", "temp/upload.tmp", "work/Catalina/localhost/ROOT"]
    assert os.listdir(base / "temp") == []
    assert os.listdir(base / "work" / "Catalina" / "localhost") == ["other"]
    assert (victim / "keep").read_text() == "keep"  # the link went, not what it pointed at


def test_clean_refuses_a_linked_work_tree(tmp_path):
    base = tmp_path / "base"
    (base / "work").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "localhost" / "ROOT"
    elsewhere.mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", base / "work" / "Catalina")
    with pytest.raises(CommandExecutionError, match="not a plain directory"):
        stack_mod._clean_tomcat(str(base), "ROOT")
    assert elsewhere.is_dir()


def test_clean_of_a_fresh_base_removes_nothing(tmp_path):
    (tmp_path / "base").mkdir()
    assert stack_mod._clean_tomcat(str(tmp_path / "base"), "ROOT") == []


def test_commands_never_default_to_root():
    with pytest.raises(CommandExecutionError, match="no app user"):
        stack_mod._command_user({}, allow_root=True)
    with pytest.raises(CommandExecutionError, match="refusing"):
        stack_mod._command_user({"app_user": "root"}, allow_root=True)
    with pytest.raises(CommandExecutionError, match="use 'unit'"):
        stack_mod._command_user({"run_as": "root"}, allow_root=False)
    assert stack_mod._command_user({"run_as": "root"}, allow_root=True).pw_uid == 0
    assert stack_mod._command_user({"app_user": "www-data"}, allow_root=False).pw_name == "www-data"


def test_run_keeps_the_tail_and_fails_on_exit_code():
    me = pwd.getpwuid(os.getuid())
    done = stack_mod._run("reload", "seq 1 30; echo err >&2", me, {"environment": {"X": "1"}})
    assert done["retcode"] == 0 and done["output"].splitlines() == [str(n) for n in range(12, 31)] + ["err"]
    with pytest.raises(CommandExecutionError, match="exited 3: boom"):
        stack_mod._run("restart", "echo boom; exit 3", me, {})
    with pytest.raises(CommandExecutionError, match="ran over"):
        stack_mod._run("restart", "sleep 5", me, {"timeout": 0.3})


def test_run_gives_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    me = pwd.getpwuid(os.getuid())
    done = stack_mod._run("reload", "env", me, {"environment": {"CATALINA_BASE": "/x"}})
    assert "hunter2" not in done["output"] and "CATALINA_BASE=/x" in done["output"]


def test_reload_without_a_stack_does_nothing(module):
    assert module.reload("shop")["kind"] is None


def test_reload_names_the_known_kinds(module, monkeypatch):
    monkeypatch.setattr(module, "__pillar__", {"release": {"shop": {"stack": {"kind": "iis"}}}}, raising=False)
    with pytest.raises(CommandExecutionError, match="command, php-fpm, tomcat"):
        module.reload("shop")


def test_reload_falls_back_to_the_node_cache(module, tmp_path):
    cache = tmp_path / "cache" / "release"
    cache.mkdir(parents=True)
    (cache / "shop.json").write_text('{"user": "www-data", "stack": {"kind": "command"}}')
    with pytest.raises(CommandExecutionError, match="needs 'reload' and/or 'restart'"):
        module.reload("shop", release="shop_test_v1_master_2026-11-26_101500_ops")
