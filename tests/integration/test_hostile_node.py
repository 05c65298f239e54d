"""
Hostile input on a node (issue 12, findings 5-7), on a real master and a
root minion with the app user www-data, judged by the filesystem and every
sink: a ``deploy_to`` of ``/`` or under the app user's folder is refused
with nothing created; a failed install keeps the cached settings that
``salt-call --local`` needs; a link the app user planted in shared/ carries
no mkdir or chown out; a template cannot read another project's secret;
a failing stack command's output reaches no return, log or job cache with
the secret in it.

Own cluster: master "m12n", minion "m12n-web1".
"""

import json
import os
import pwd
import shutil
import subprocess
import uuid

import pytest

from tests.conftest import REPO_ROOT, make_app_repo, project_config, runner_return, start_cluster

MINION = "m12n-web1"
APP = "www-data"
ALPHA_SECRET = "ALPHA-" + uuid.uuid4().hex
OTHER_SECRET = "OTHER-" + uuid.uuid4().hex
ROOT_LAYOUT = ("/releases", "/meta", "/shared", "/current", "/.stack", "/.staging")


@pytest.fixture(scope="module")
def m12(salt_factories, nodes_root, tmp_path_factory):
    repo = make_app_repo(str(tmp_path_factory.mktemp("m12_git") / "alpha"))
    repo.commit("config template", {"config/app.conf.example": "pw={{ secrets.pw }}\n", "VERSION": "3.0.0\n"})
    subprocess.run(["git", "-C", repo.path, "tag", "v3.0.0"], check=True)
    repo.commit("next", {"VERSION": "3.1.0\n"})
    subprocess.run(["git", "-C", repo.path, "tag", "v3.1.0"], check=True)
    subprocess.run(["git", "-C", repo.path, "checkout", "-q", "-b", "leak"], check=True)
    repo.commit("reads another project's secret",
                {"config/leak.example": "stolen={{ pillar.release.other.secrets.pw }}\n"})
    subprocess.run(["git", "-C", repo.path, "checkout", "-q", "master"], check=True)
    file_root = tmp_path_factory.mktemp("m12_files")
    for folder in ("_modules", "_runners", "_utils", "_states"):
        os.symlink(os.path.join(REPO_ROOT, folder), file_root / folder)
    (file_root / "releases").mkdir()
    config = {
        "artifact_root": str(file_root / "releases"),
        "state_dir": str(tmp_path_factory.mktemp("m12_state")),
        "projects": {"alpha": project_config(repo.path, environments={"test": {"target": MINION}})},
    }
    with start_cluster(salt_factories, "m12n", str(file_root), config, "", nodes_root,
                       minion_ids=(MINION,)) as cluster:
        cluster.good = os.path.join(nodes_root, MINION, "alpha")
        cluster.outputs = []
        write_pillar(cluster)
        yield cluster


def alpha_pillar(cluster, **changes):
    alpha = {
        "deploy_to": cluster.good, "user": APP, "shared": ["storage"],
        "files": {"config/app.conf": {"template": "config/app.conf.example"}},
        "secrets": {"pw": ALPHA_SECRET},
        "stack": {"kind": "command", "reload": "true", "run_as": "root"},
    }
    alpha.update(changes)
    return alpha


def write_pillar(cluster, **changes):
    """The release pillar (JSON is YAML): project alpha, and project other with its own secret."""
    other = {"deploy_to": cluster.good + "-other", "user": APP, "secrets": {"pw": OTHER_SECRET}}
    pillar = {"release": {"alpha": alpha_pillar(cluster, **changes), "other": other}}
    with open(os.path.join(cluster.pillar_root, "release.sls"), "w", encoding="utf-8") as handle:
        json.dump(pillar, handle)
    done = cluster.salt_cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt=MINION)
    assert done.returncode == 0, done


def deploy(cluster, ref):
    result = cluster.salt_run_cli.run("release.deploy", "alpha", "env=test", f"ref={ref}",
                                      "--out=json", "--log-level=debug")
    cluster.outputs.append(result.stdout + result.stderr)
    return result, runner_return(result)


def current(cluster):
    link = os.path.join(cluster.good, "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def holders(root, needle):
    """The files at or under ``root`` that hold ``needle``."""
    found = []
    walked = [(os.path.dirname(root), [], [os.path.basename(root)])] if os.path.isfile(root) else os.walk(root)
    for folder, _, files in walked:
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as handle:
                    if needle.encode() in handle.read():
                        found.append(path)
    return found


def local_call(cluster, *args):
    done = cluster.minions[0].salt_call_cli(timeout=120).run("--local", *args)
    assert done.returncode == 0, done
    return done.data


def test_good_deploys(m12):
    names = []
    for ref in ("v3.0.0", "v3.1.0"):
        result, ret = deploy(m12, ref)
        assert result.returncode == 0 and ret["retcode"] == 0, ret
        names.append(ret["release"])
        assert current(m12) == ret["release"]
    m12.names = names


def test_deploy_to_root_is_refused_and_local_rollback_still_works(m12):
    assert not any(os.path.lexists(p) for p in ROOT_LAYOUT), "the machine already has a root layout"
    write_pillar(m12, deploy_to="/")
    try:
        result, ret = deploy(m12, "master")
        assert result.returncode != 0 and ret["retcode"] != 0, ret
        assert "release:alpha:deploy_to" in json.dumps(ret), ret
        assert not any(os.path.lexists(p) for p in ROOT_LAYOUT)
        assert current(m12) == m12.names[-1]
        # The cached settings are still the good install's: the node works with the master out of the loop.
        assert local_call(m12, "release.list", "alpha")["current"] == m12.names[-1]
        rolled = local_call(m12, "release.rollback", "alpha")
        assert rolled["release"] == m12.names[0] and current(m12) == m12.names[0]
    finally:
        write_pillar(m12)


def test_deploy_to_under_a_folder_of_the_app_user_is_refused(m12, tmp_path):
    owned = tmp_path / "owned"
    owned.mkdir()
    shutil.chown(owned, APP)
    write_pillar(m12, deploy_to=str(owned / "alpha"))
    try:
        result, ret = deploy(m12, "master")
        assert result.returncode != 0 and "is owned by the app user" in json.dumps(ret), ret
        assert os.listdir(owned) == []
    finally:
        write_pillar(m12)


@pytest.fixture
def canaries():
    """A root-only file and folder in /etc that a planted link points at."""
    tag = uuid.uuid4().hex[:8]
    folder, file = f"/etc/salt-release-canary-dir-{tag}", f"/etc/salt-release-canary-{tag}"
    os.mkdir(folder, 0o700)
    with open(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        handle.write("canary\n")
    yield folder, file
    shutil.rmtree(folder, ignore_errors=True)
    os.unlink(file)


def test_links_planted_in_shared_carry_nothing_out(m12, canaries):
    folder, file = canaries
    storage = os.path.join(m12.good, "shared", "storage")
    assert os.stat(storage).st_uid != 0, "shared/storage should belong to the app user"
    # What www-data can do in its own folder (made by root and handed over: pytest's 0700 temp root
    # keeps www-data from walking there itself).
    app = pwd.getpwnam(APP)
    for name, target in (("planted", folder), ("x", file)):
        os.symlink(target, os.path.join(storage, name))
        os.lchown(os.path.join(storage, name), app.pw_uid, app.pw_gid)
    before = [(os.stat(p).st_uid, os.stat(p).st_gid, os.stat(p).st_mode) for p in (folder, file)]
    write_pillar(m12, shared=["storage", "storage/planted/sub", "storage/x"])
    try:
        result, ret = deploy(m12, "master")
        assert result.returncode != 0 and "not a plain directory" in json.dumps(ret), ret
        assert [(os.stat(p).st_uid, os.stat(p).st_gid, os.stat(p).st_mode) for p in (folder, file)] == before
        assert os.listdir(folder) == []
        with open(file, encoding="utf-8") as handle:
            assert handle.read() == "canary\n"
    finally:
        write_pillar(m12)
        for name in ("planted", "x"):
            os.unlink(os.path.join(storage, name))


def test_a_template_cannot_read_another_projects_secret(m12):
    files = dict(alpha_pillar(m12)["files"], **{"config/leak.php": {"template": "config/leak.example"}})
    write_pillar(m12, files=files)
    try:
        result, ret = deploy(m12, "leak")
        text = json.dumps(ret) + result.stdout + result.stderr
        assert result.returncode != 0 and "undefined variable" in text, ret
        assert OTHER_SECRET not in text
        assert holders(m12.good, OTHER_SECRET) == []
    finally:
        write_pillar(m12)


def test_a_failing_stack_command_leaks_no_secret(m12):
    conf = os.path.join(m12.good, "current", "config", "app.conf")
    write_pillar(m12, stack={"kind": "command", "reload": f"cat {conf}; exit 3", "run_as": "root"})
    try:
        result, ret = deploy(m12, "master")
    finally:
        write_pillar(m12)
    text = json.dumps(ret) + result.stdout + result.stderr
    assert result.returncode != 0 and "exited 3" in text and "pw=***" in text, ret
    assert holders(m12.good, ALPHA_SECRET), "the secret should have been rendered on the node"
    assert not any(ALPHA_SECRET in out for out in m12.outputs)
    minion_log = m12.minions[0].config["log_file"]
    assert os.path.getsize(minion_log) > 0
    master = m12.master.config
    for path in (minion_log, os.path.join(master["cachedir"], "jobs"), m12.release_config["state_dir"]):
        assert holders(path, ALPHA_SECRET) == [], path
