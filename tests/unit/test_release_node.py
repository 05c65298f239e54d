"""
The node side in process: ``release.install``, ``release.activate`` and
``release.list`` (Salt dunders filled in by hand, artifacts built in a temp
dir) return what the contract says, and the config dry run's staged tree is
what install uses: one fetch and one unpack per node.
"""

import importlib.util
import io
import json
import os
import tarfile

import pytest
from salt.exceptions import CommandExecutionError

import release_contract as contract
import release_node as node
from tests.conftest import REPO_ROOT

NAME = "rainbow_test_v1.0.0_master_2026-11-26_101500_ops"
NEWER = "rainbow_test_v1.1.0_master_2026-11-27_101500_ops"


def artifact(tmp_path, name, extra=()):
    fields = contract.parse_release_name(name)
    manifest = {field: fields.get(field, "x") for field in contract.MANIFEST_FIELDS} | {"name": name}
    path = str(tmp_path / f"{name}.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for member, data in [(contract.MANIFEST_NAME, json.dumps(manifest).encode()),
                             ("index.html", name.encode())] + list(extra):
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path, contract.sha256_file(path)


@pytest.fixture
def release(tmp_path):
    spec = importlib.util.spec_from_file_location("release_under_test", os.path.join(REPO_ROOT, "_modules",
                                                                                      "release.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fetched = []
    module.__opts__ = {"cachedir": str(tmp_path / "cache"), "file_client": "local", "id": "web1"}
    module.__pillar__ = {"release": {"rainbow": {"deploy_to": str(tmp_path / "srv"), "shared": ["storage"]}}}
    module.__salt__ = {"cp.cache_file": lambda source: fetched.append(source) or source,
                       "release_config.render": lambda *args, **kwargs: {"result": True, "files": {}}}
    module.fetched = fetched
    return module


def test_install_activate_list_return_the_contract_shapes(release, tmp_path):
    path, sha = artifact(tmp_path, NAME)
    installed = release.install("rainbow", NAME, source=path, source_hash=sha)
    assert contract.validate_return("install", installed) == [], installed
    assert installed["transfer"] == "full" and installed["changed"] is True
    again = release.install("rainbow", NAME, source=path, source_hash=sha)
    assert contract.validate_return("install", again) == [] and again["changed"] is False
    activated = release.activate("rainbow", NAME)
    assert contract.validate_return("activate", activated) == [], activated
    listed = release.list_("rainbow")
    assert contract.validate_return("list", listed) == [], listed
    assert listed["current"] == NAME and os.readlink(str(tmp_path / "srv" / "current")) == f"releases/{NAME}"


def test_install_reuses_the_dry_runs_staged_tree(release, tmp_path):
    path, sha = artifact(tmp_path, NAME)
    settings = node.settings(release.__opts__, release.__pillar__, "rainbow")
    tree = node.stage(release.__salt__, settings, NAME, path, sha)
    assert oct(os.stat(os.path.dirname(tree)).st_mode & 0o777) == "0o700"
    installed = release.install("rainbow", NAME, source=path, source_hash=sha)
    assert installed["staged"] is True and release.fetched == [path], "one fetch per node, not two"
    assert not os.path.exists(tree) and os.listdir(os.path.dirname(tree)) == []
    with open(tmp_path / "srv" / "releases" / NAME / "index.html") as served:
        assert served.read() == NAME


def test_a_staged_tree_of_another_artifact_is_not_used(release, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    path, sha = artifact(tmp_path / "one", NAME)
    other, other_sha = artifact(tmp_path / "two", NAME, [("extra.txt", b"other")])
    settings = node.settings(release.__opts__, release.__pillar__, "rainbow")
    node.stage(release.__salt__, settings, NAME, path, sha)
    installed = release.install("rainbow", NAME, source=other, source_hash=other_sha)
    assert installed["staged"] is False and release.fetched == [path, other]
    assert os.path.isfile(tmp_path / "srv" / "releases" / NAME / "extra.txt")
    assert os.listdir(tmp_path / "srv" / node.STAGING_DIR) == [], "the unused staged tree is dropped"


def test_hostile_artifact_leaves_nothing(release, tmp_path):
    path, sha = artifact(tmp_path, NEWER, [("../escaped", b"x")])
    with pytest.raises(CommandExecutionError, match="refused to unpack .*'..'"):
        release.install("rainbow", NEWER, source=path, source_hash=sha)
    assert not os.path.exists(tmp_path / "srv" / "escaped")
    assert os.listdir(tmp_path / "srv" / "releases") == []


def test_settings_fall_back_to_the_cache(release, tmp_path):
    node.remember(release.__opts__, "rainbow", {"deploy_to": "/srv/cached", "user": "www-data"}, current="x")
    assert node.settings(release.__opts__, {}, "rainbow")["deploy_to"] == "/srv/cached"
    assert node.project_view(release.__opts__, {}, "rainbow")["user"] == "www-data"
    with pytest.raises(CommandExecutionError, match="bad project name"):
        node.settings(release.__opts__, {}, "../etc")


def reload_failing_for(release, bad_names, calls):
    def reload(project, release=None):
        calls.append(release)
        if release in bad_names:
            raise CommandExecutionError(f"app says no to {release}")
        return {"result": True}
    release.__salt__["release_stack.reload"] = reload
    release.__pillar__["release"]["rainbow"]["stack"] = {"kind": "command", "reload_cmd": "true"}


def installed(release, tmp_path, *names):
    for name in names:
        path, sha = artifact(tmp_path, name)
        release.install("rainbow", name, source=path, source_hash=sha)


def test_a_failed_reload_switches_back_and_reloads_the_old_release(release, tmp_path):
    calls = []
    reload_failing_for(release, {NEWER}, calls)
    installed(release, tmp_path, NAME, NEWER)
    release.activate("rainbow", NAME)
    with pytest.raises(CommandExecutionError) as caught:
        release.activate("rainbow", NEWER)
    assert str(caught.value) == (f"reload failed on {NEWER}: app says no to {NEWER}; "
                                 f"switched back to {NAME} and reloaded: ok")
    assert os.readlink(str(tmp_path / "srv" / "current")) == f"releases/{NAME}"
    assert calls == [NAME, NEWER, NAME]
    assert release.current("rainbow") == NAME and release.list_("rainbow")["bad"] == []


def test_a_failed_reload_back_is_reported_too(release, tmp_path):
    calls = []
    reload_failing_for(release, {NAME, NEWER}, calls)
    installed(release, tmp_path, NAME, NEWER)
    with pytest.raises(CommandExecutionError):
        release.activate("rainbow", NAME)  # the first release: nothing to go back to, the error as is
    assert release.current("rainbow") == NAME
    with pytest.raises(CommandExecutionError, match=f"switched back to {NAME} and reloaded: failed: app says no"):
        release.activate("rainbow", NEWER)
    assert os.readlink(str(tmp_path / "srv" / "current")) == f"releases/{NAME}"


def test_fences_are_kept_per_environment(release, tmp_path):
    installed(release, tmp_path, NAME)
    release.activate("rainbow", NAME, env="test", fence=3)
    release.activate("rainbow", NAME, env="pro", fence=1)  # another environment's lock: its own numbers
    with pytest.raises(CommandExecutionError, match="stale deploy refused: fence 2 is older than 3"):
        release.activate("rainbow", NAME, env="test", fence=2)
    release.activate("rainbow", NAME, env="pro", fence=2)
    with pytest.raises(CommandExecutionError, match="older than 3"):
        release.activate("rainbow", NAME, fence=2)  # no environment named: held to the highest of all


@pytest.mark.parametrize("old", [5, "5", "junk", None])
def test_an_old_per_project_fence_is_read_safely(release, tmp_path, old):
    installed(release, tmp_path, NAME)
    node.remember(release.__opts__, "rainbow", {}, fence=old)
    release.activate("rainbow", NAME, env="test", fence=1)  # an environment starts its own fences
    if old in (5, "5"):
        with pytest.raises(CommandExecutionError, match="older than 5"):
            release.activate("rainbow", NAME, fence=4)  # a call without env still honours it
    else:
        release.activate("rainbow", NAME, fence=1)


def test_rollback_goes_only_to_a_confirmed_release(release, tmp_path):
    staged = "rainbow_test_v1.2.0_master_2026-11-28_101500_ops"
    installed(release, tmp_path, NAME, NEWER, staged)
    release.activate("rainbow", NAME)
    with pytest.raises(CommandExecutionError, match="is not what this node runs"):
        release.confirm("rainbow", NEWER)
    release.confirm("rainbow", NAME, env="test")
    release.activate("rainbow", NEWER)
    listed = release.list_("rainbow")
    assert listed["rollback_target"] == NAME, listed  # not the newer, never-run 'staged'
    release.rollback("rainbow")
    assert release.current("rainbow") == NAME and release.list_("rainbow")["bad"] == [NEWER]
    with pytest.raises(CommandExecutionError, match="no release that passed its health check here to go back to"):
        release.rollback("rainbow")  # NEWER is bad, 'staged' never ran
    assert release.current("rainbow") == NAME


def test_rollback_never_goes_to_a_release_the_master_marked_bad(release, tmp_path):
    newest = "rainbow_test_v1.2.0_master_2026-11-28_101500_ops"
    installed(release, tmp_path, NAME, NEWER, newest)
    for name in (NAME, NEWER, newest):
        release.activate("rainbow", name)
        release.confirm("rainbow", name)
    with pytest.raises(CommandExecutionError, match="no release that passed its health check"):
        release.rollback("rainbow", avoid=[NEWER, NAME])
    release.rollback("rainbow", avoid=[NEWER])
    assert release.current("rainbow") == NAME
