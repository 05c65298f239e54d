"""
Pure unit tests of release_config's refusals and its error messages: the
module loaded with its Salt dunders filled in by hand (no daemons).
"""

import importlib.util
import os

import pytest
from salt.exceptions import CommandExecutionError

from tests.conftest import REPO_ROOT

SECRET = "hunter2secret"


@pytest.fixture
def mod(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "release_config_under_test", os.path.join(REPO_ROOT, "_modules", "release_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__pillar__ = {"release": {"rainbow": {
        "shared": ["storage", "logs"], "secrets": {"pw": SECRET}, "files": {}}}}
    module.__grains__ = {"id": "web1"}
    module.__opts__ = {"file_client": "local", "id": "web1"}
    module.__salt__ = {}
    return module


def files(mod, **specs):
    mod.__pillar__["release"]["rainbow"]["files"] = specs


@pytest.mark.parametrize("target, message", [
    ("/etc/evil", "must be a relative path"),
    ("../up", "must be a relative path"),
    ("a/../../b", "must be a relative path"),
    ("storage/x.conf", "inside the shared path 'storage'"),
    ("logs", "inside the shared path 'logs'"),
    ("RELEASE.json", "would replace the release's own"),
])
def test_bad_targets_are_refused(mod, tmp_path, target, message):
    files(mod, **{target: {"contents": "x"}})
    with pytest.raises(CommandExecutionError, match=message):
        mod.render("rainbow", str(tmp_path))


@pytest.mark.parametrize("mode, message", [
    ("0660", "lets group or others write"),
    ("0646", "lets group or others write"),
    (416, "quoted octal string"),
    ("4750", "quoted octal string"),
])
def test_bad_modes_are_refused(mod, tmp_path, mode, message):
    files(mod, **{"a.conf": {"contents": "x", "mode": mode}})
    with pytest.raises(CommandExecutionError, match=message):
        mod.render("rainbow", str(tmp_path))


def test_world_readable_secret_is_refused(mod, tmp_path):
    files(mod, **{"a.conf": {"contents": SECRET, "mode": "0644"}})
    with pytest.raises(CommandExecutionError, match="holds a secret"):
        mod.render("rainbow", str(tmp_path))


def test_template_link_out_of_the_release_is_refused(mod, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    os.symlink("/etc/passwd", release / "passwd.example")
    files(mod, **{"a.conf": {"template": "passwd.example"}})
    with pytest.raises(CommandExecutionError, match="leads outside the release"):
        mod.render("rainbow", str(release))


@pytest.mark.parametrize("template, message", [
    ("{{ x " + SECRET + " }}", "Jinja syntax error at line 1: expected token"),   # quotes a token
    ("ok\n{{ {}[secrets.pw] }}", "undefined variable at line 2: 'dict object' has no attribute '***'"),
    ("{{ secrets.pw + 1 }}", "TypeError at line 1"),
])
def test_error_messages_name_the_file_never_the_secret(mod, tmp_path, template, message):
    (tmp_path / "t.example").write_text(template)
    files(mod, **{"config/t.php": {"template": "t.example"}})
    with pytest.raises(CommandExecutionError) as caught:
        mod.render("rainbow", str(tmp_path))
    text = str(caught.value)
    assert text.startswith("config/t.php: ") and message in text
    assert SECRET not in text
    # Salt logs tracebacks at debug level: no chained Jinja exception to print.
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None


def test_render_writes_files_and_returns_hashes_only(mod, tmp_path):
    (tmp_path / "db.example").write_text("pw={{ secrets.pw }} node={{ grains.id }} rel={{ release.name }}\n")
    files(mod, **{"config/db.php": {"template": "db.example"}})
    ret = mod.render("rainbow", str(tmp_path), {"name": "r1"})
    body = (tmp_path / "config" / "db.php").read_text()
    assert body == f"pw={SECRET} node=web1 rel=r1\n"
    assert SECRET not in repr(ret) and len(ret["files"]["config/db.php"]) == 64
    assert oct(os.stat(tmp_path / "config" / "db.php").st_mode & 0o777) == "0o640"
