"""
Node-side defences in process (run as root, app user www-data): deploy_to
validation, the settings cache written only after a good install, no mkdir
or chown through a link the app user planted in shared/, scoped templates
and secrets scrubbed from stack output and errors.
"""

import importlib.util
import os
import pwd
import shutil

import pytest
from salt.exceptions import CommandExecutionError

import release_node as node
import release_safe_fs as safe_fs
import release_shared as shared_paths
import release_stack as stack_mod
from tests.conftest import REPO_ROOT
from tests.unit.test_release_node import NAME, NEWER, artifact

APP = "www-data"
SECRET = "s3cr3t-value-9f1"
OTHER_SECRET = "other-project-secret-77"


def load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_safety", os.path.join(REPO_ROOT, "_modules", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("deploy_to, message", [
    ("/", "a system directory"),
    ("/srv", "a system directory"),
    ("/var", "a system directory"),
    ("srv/www/app", "absolute, normalised"),
    ("/srv/www/../../etc/app", "absolute, normalised"),
    ("/srv/www/app/", "absolute, normalised"),
    ("/srv/./www/app", "absolute, normalised"),
    ("//srv/www/app", "absolute, normalised"),
])
def test_bad_deploy_to_is_refused_naming_the_key(deploy_to, message):
    with pytest.raises(CommandExecutionError, match=message) as caught:
        node.check_deploy_to("rainbow", deploy_to, APP)
    assert "release:rainbow:deploy_to" in str(caught.value)


def test_deploy_to_strictly_below_a_system_directory_is_accepted():
    node.check_deploy_to("rainbow", "/srv/www/rainbow", APP)
    node.check_deploy_to("rainbow", "/var/www/rainbow", APP)


def test_deploy_to_under_a_folder_of_the_app_user_is_refused(tmp_path):
    owned = tmp_path / "owned"
    owned.mkdir()
    shutil.chown(owned, APP)
    with pytest.raises(CommandExecutionError, match="is owned by the app user"):
        node.check_deploy_to("rainbow", str(owned / "app"), APP)
    node.check_deploy_to("rainbow", str(owned / "app"), None)  # no app user: nothing to fear from one


def test_deploy_to_under_a_group_writable_folder_is_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o775)
    with pytest.raises(CommandExecutionError, match="group or other writable without the sticky bit"):
        node.check_deploy_to("rainbow", str(loose / "app"), APP)
    os.chmod(loose, 0o1777)
    node.check_deploy_to("rainbow", str(loose / "app"), APP)


@pytest.fixture
def release(tmp_path):
    module = load("release")
    module.__opts__ = {"cachedir": str(tmp_path / "cache"), "file_client": "local", "id": "web1"}
    module.__pillar__ = {"release": {"rainbow": {
        "deploy_to": str(tmp_path / "srv"), "shared": ["storage", "storage/cache"], "user": APP,
        "secrets": {"pw": SECRET}}}}
    module.__salt__ = {"cp.cache_file": lambda source: source,
                       "release_config.render": lambda *args, **kwargs: {"result": True, "files": {}}}
    return module


def test_a_failed_install_keeps_the_cached_settings(release, tmp_path):
    path, sha = artifact(tmp_path, NAME)
    release.install("rainbow", NAME, source=path, source_hash=sha)
    release.activate("rainbow", NAME)
    release.__pillar__["release"]["rainbow"]["deploy_to"] = "/"
    newer, newer_sha = artifact(tmp_path, NEWER)
    with pytest.raises(CommandExecutionError, match="release:rainbow:deploy_to is /, a system directory"):
        release.install("rainbow", NEWER, source=newer, source_hash=newer_sha)
    assert not any(os.path.lexists(p) for p in ("/releases", "/shared", "/current", "/.stack"))
    assert node.read_cache(release.__opts__, "rainbow")["deploy_to"] == str(tmp_path / "srv")
    release.__pillar__ = {}  # salt-call --local: the cache alone
    assert release.list_("rainbow")["current"] == NAME


def test_install_never_makes_or_chowns_through_a_link_in_shared(release, tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir(mode=0o700)
    path, sha = artifact(tmp_path, NAME)
    release.install("rainbow", NAME, source=path, source_hash=sha)
    storage = tmp_path / "srv" / "shared" / "storage"
    assert pwd.getpwuid(os.stat(storage).st_uid).pw_name == APP
    os.symlink(str(canary), storage / "planted")  # what the app user can do in its own folder
    release.__pillar__["release"]["rainbow"]["shared"].append("storage/planted/sub")
    newer, newer_sha = artifact(tmp_path, NEWER)
    with pytest.raises(CommandExecutionError, match="not a plain directory"):
        release.install("rainbow", NEWER, source=newer, source_hash=newer_sha)
    assert os.listdir(canary) == [] and os.stat(canary).st_uid == 0
    assert oct(os.stat(canary).st_mode & 0o777) == "0o700"


def test_make_dirs_refuses_a_link_anywhere_on_the_way(tmp_path):
    (tmp_path / "base").mkdir()
    os.symlink("/etc", tmp_path / "base" / "link")
    with pytest.raises(CommandExecutionError, match="not a plain directory"):
        safe_fs.make_dirs(str(tmp_path / "base"), "link/new")
    fd, created = safe_fs.make_dirs(str(tmp_path / "base"), "a/b")
    os.close(fd)
    assert created and (tmp_path / "base" / "a" / "b").is_dir()


def test_errors_leaving_a_phase_are_scrubbed(release, tmp_path):
    def work():
        raise ValueError(f"could not parse {SECRET}")

    with pytest.raises(CommandExecutionError) as caught:
        node.reported((release.__opts__, {}, release.__pillar__), "rainbow", None, "install", NAME, work)
    assert SECRET not in str(caught.value) and "ValueError: could not parse ***" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_stack_command_output_and_failure_are_scrubbed(tmp_path, monkeypatch):
    stack = {"kind": "command", "reload": f"echo pw={SECRET}", "run_as": APP}
    pillar = {"release": {"shop": {"user": APP, "stack": stack, "secrets": {"db": {"pw": SECRET}}}}}
    monkeypatch.setattr(stack_mod, "__opts__", {"cachedir": str(tmp_path / "cache")}, raising=False)
    monkeypatch.setattr(stack_mod, "__pillar__", pillar, raising=False)
    done = stack_mod.reload("shop")
    assert done["steps"][0]["output"] == "pw=***"
    stack["reload"] = f"echo pw={SECRET}; exit 3"
    with pytest.raises(CommandExecutionError) as caught:
        stack_mod.reload("shop")
    assert "exited 3" in str(caught.value) and SECRET not in str(caught.value)


@pytest.fixture
def config(tmp_path):
    module = load("release_config")
    module.__pillar__ = {
        "release": {"rainbow": {"secrets": {"pw": SECRET}, "files": {}},
                    "other": {"secrets": {"pw": OTHER_SECRET}}},
        "mail": {"host": "smtp.example"},
    }
    module.__grains__ = {"id": "web1"}
    module.__opts__ = {"file_client": "local", "id": "web1"}
    module.__salt__ = {}
    return module


def test_a_template_cannot_reach_another_projects_secret(config, tmp_path):
    (tmp_path / "t.example").write_text("pw={{ pillar.release.other.secrets.pw }}\n")
    config.__pillar__["release"]["rainbow"]["files"] = {"config/t.php": {"template": "t.example"}}
    with pytest.raises(CommandExecutionError, match="undefined variable") as caught:
        config.render("rainbow", str(tmp_path))
    assert OTHER_SECRET not in str(caught.value)
    assert not (tmp_path / "config" / "t.php").exists()


def test_top_level_pillar_only_when_listed_in_context_pillar(config, tmp_path):
    (tmp_path / "t.example").write_text("{{ pillar.release.rainbow.secrets.pw }}@{{ pillar.mail.host }}\n")
    conf = config.__pillar__["release"]["rainbow"]
    conf["files"] = {"t.conf": {"template": "t.example"}}
    with pytest.raises(CommandExecutionError, match="undefined variable"):
        config.render("rainbow", str(tmp_path))
    conf["context_pillar"] = ["mail"]
    config.render("rainbow", str(tmp_path))
    assert (tmp_path / "t.conf").read_text() == f"{SECRET}@smtp.example\n"


# ---------------------------------------------------------------- seeding shared paths


def _release_tree(root):
    """A release tree whose data/ holds a file, a folder, links out (/etc, ..) and a link to a sibling."""
    data = root / "data"
    (data / "pages").mkdir(parents=True)
    (data / "pages" / "start.txt").write_text("shipped\n")
    (root / "public").mkdir()
    (root / "public" / "index.html").write_text("page\n")
    os.symlink("/etc", data / "etc")
    os.symlink("..", data / "up")
    os.symlink("../public/index.html", data / "page.html")
    (root / ".env").write_text("KEY=1\n")
    os.symlink("public", root / "alias")
    return root


def test_seed_copies_plain_files_only_and_follows_no_link(tmp_path):
    tree = _release_tree(tmp_path / "release")
    shared = tmp_path / "shared"
    shared.mkdir()
    uid, gid = node.app_ids(APP)
    assert shared_paths.seed_shared(str(tree), str(shared), "data", uid, gid) is True
    assert sorted(p.relative_to(shared).as_posix() for p in shared.rglob("*")) == [
        "data", "data/pages", "data/pages/start.txt"]
    assert (shared / "data" / "pages" / "start.txt").read_text() == "shipped\n"
    assert all(os.lstat(p).st_uid == uid for p in [shared / "data", *shared.rglob("*")])
    assert shared_paths.seed_shared(str(tree), str(shared), ".env", uid, gid) is True  # a file is seeded as a file
    assert (shared / ".env").read_text() == "KEY=1\n" and os.stat(shared / ".env").st_uid == uid
    # A path that is a link in the release (alias -> public), or missing: an empty folder, nothing read.
    assert shared_paths.seed_shared(str(tree), str(shared), "alias", uid, gid) is False
    assert shared_paths.seed_shared(str(tree), str(shared), "alias/sub", uid, gid) is False
    assert shared_paths.seed_shared(str(tree), str(shared), "nosuch", uid, gid) is False
    assert os.listdir(shared / "alias") == ["sub"] and os.listdir(shared / "alias" / "sub") == []
    assert os.listdir(shared / "nosuch") == []
    assert not [n for n in os.listdir(shared) if ".seed-" in n]


def test_seed_never_touches_an_existing_shared_path(tmp_path):
    tree = _release_tree(tmp_path / "release")
    shared = tmp_path / "shared"
    (shared / "data" / "pages").mkdir(parents=True)
    (shared / "data" / "pages" / "start.txt").write_text("the app's own\n")
    before = {p: (p.read_bytes() if p.is_file() else None, os.lstat(p)) for p in shared.rglob("*")}
    assert shared_paths.seed_shared(str(tree), str(shared), "data", 0, 0) is False
    assert {p: (p.read_bytes() if p.is_file() else None, os.lstat(p)) for p in shared.rglob("*")} == before
    os.symlink("/etc", shared / "planted")
    with pytest.raises(CommandExecutionError, match="is a link"):
        shared_paths.seed_shared(str(tree), str(shared), "planted", 0, 0)


def test_install_seeds_and_keeps_metadata_out_of_the_release(release, tmp_path):
    release.__pillar__["release"]["rainbow"]["shared"] = ["storage"]
    path, sha = artifact(tmp_path, NAME, extra=[("storage/seed.txt", b"seeded\n")])
    release.install("rainbow", NAME, source=path, source_hash=sha)
    srv = tmp_path / "srv"
    assert (srv / "shared" / "storage" / "seed.txt").read_text() == "seeded\n"
    assert sorted(os.listdir(srv / "meta" / NAME)) == [".artifact.sha256", "RELEASE.json"]
    assert not {"RELEASE.json", ".artifact.sha256"} & set(os.listdir(srv / "releases" / NAME))
    # Upgrade path: a release of the old layout (metadata in its root) is still known by its hash.
    for name in os.listdir(srv / "meta" / NAME):
        os.rename(srv / "meta" / NAME / name, srv / "releases" / NAME / name)
    os.rmdir(srv / "meta" / NAME)
    assert release.install("rainbow", NAME, source=path, source_hash=sha)["changed"] is False
