"""
Install mode (b): ``pip install --target`` puts salt-release on the daemons'
PYTHONPATH, and Salt loads the runner and the minion module through the
``salt.loader`` entry point: no ``_modules`` in file_roots, no sync.
"""

import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import APP_USER, PILLAR_RELEASE, PILLAR_TOP, REPO_ROOT, project_config, runner_return

MASTER = "pip"
MINION = "pip-web1"


@pytest.fixture(scope="module")
def pip_target(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("pip-target"))
    build = tempfile.mkdtemp(prefix="sr-pip-build-")  # keep the checkout free of build/
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", target, REPO_ROOT],
        check=True, env=dict(os.environ, TMPDIR=build), cwd=build,
    )
    assert os.path.isfile(os.path.join(target, "salt_release", "runners", "release.py"))
    return target


@pytest.fixture(scope="module")
def pip_cluster(salt_factories, app_repo, nodes_root, pip_target, tmp_path_factory):
    file_root = tmp_path_factory.mktemp("pip-file-root")  # only the artifact root: no _modules
    (file_root / "releases").mkdir()
    pillar_root = tmp_path_factory.mktemp("pip-pillar")
    (pillar_root / "top.sls").write_text(PILLAR_TOP)
    (pillar_root / "release.sls").write_text(
        PILLAR_RELEASE.replace("{{ nodes_root }}", nodes_root).replace("{{ app_user }}", APP_USER)
    )
    config = {
        "artifact_root": str(file_root / "releases"),
        "state_dir": str(tmp_path_factory.mktemp("pip-state")),
        "projects": {"rainbow": project_config(app_repo.path, environments={"pip": {"target": MINION}})},
    }
    master = salt_factories.salt_master_daemon(MASTER, overrides={
        "file_roots": {"base": [str(file_root)]}, "pillar_roots": {"base": [str(pillar_root)]},
        "release": config, "open_mode": True, "auto_accept": True,
    })
    environ = dict(master.environ, PYTHONPATH=pip_target)
    # The factories share one environ dict between daemons: give these their own.
    master.environ = environ
    with master.started(start_timeout=120):
        minion = master.salt_minion_daemon(MINION)
        minion.environ = environ
        with minion.started(start_timeout=120):
            yield {
                "master": master,
                "minion": minion,
                "salt": master.salt_cli(timeout=120, environ=environ),
                "salt_run": master.salt_run_cli(timeout=300, environ=environ),
                "nodes_root": nodes_root,
            }


def test_modules_come_from_the_pip_target_not_a_sync(pip_cluster):
    for daemon in (pip_cluster["master"], pip_cluster["minion"]):
        extmods = os.path.join(daemon.config["cachedir"], "extmods")
        synced = [f for _, _, files in os.walk(extmods) for f in files if f.startswith("release")]
        assert synced == [], f"{daemon.id} has synced copies: {synced}"
    doc = pip_cluster["salt"].run("sys.doc", "release.install", minion_tgt=MINION)
    assert doc.returncode == 0
    assert "verify its sha256" in doc.data["release.install"]
    runner_doc = pip_cluster["salt_run"].run("doc.runner")
    assert runner_doc.returncode == 0
    assert "Deploy a git ref" in runner_doc.data["release.deploy"]


def test_deploy_through_the_entry_point(pip_cluster, app_repo):
    result = pip_cluster["salt_run"].run("release.deploy", "rainbow", "env=pip", "ref=v1.1.0", "--out=json")
    ret = runner_return(result)
    assert result.returncode == 0 and ret["result"] is True, (result.stdout, result.stderr)
    assert ret["commit"] == app_repo.head("v1.1.0^{commit}")
    assert list(ret["nodes"]) == [MINION]
    current = os.path.join(pip_cluster["nodes_root"], MINION, "rainbow", "current")
    assert os.readlink(current) == f"releases/{ret['release']}"


def test_a_mixed_install_runs_the_synced_module_with_the_pip_helpers(pip_cluster, pip_target):
    """
    README's promise for a pip install plus a sync: the synced loader module wins, the shared
    helpers (imported by bare name) come from the pip install. Last in this file: it adds a
    synced copy, which the first test asserts is absent.
    """
    minion = pip_cluster["minion"]
    extmods = minion.config["extension_modules"]
    for folder, name in (("modules", "release.py"), ("utils", "release_contract.py")):
        os.makedirs(os.path.join(extmods, folder), exist_ok=True)
        src = os.path.join(REPO_ROOT, f"_{folder}", name)
        with open(src, encoding="utf-8") as handle, \
                open(os.path.join(extmods, folder, name), "w", encoding="utf-8") as out:
            out.write(handle.read())
    try:
        assert pip_cluster["salt"].run("saltutil.refresh_modules", "async=False", minion_tgt=MINION).returncode == 0
        ret = pip_cluster["salt"].run("release.version", minion_tgt=MINION)
        assert ret.returncode == 0, ret
        assert ret.data["module"].startswith(os.path.join(extmods, "modules")), ret.data
        assert ret.data["helpers"]["release_contract"].startswith(pip_target), ret.data
    finally:
        for folder, name in (("modules", "release.py"), ("utils", "release_contract.py")):
            os.unlink(os.path.join(extmods, folder, name))
