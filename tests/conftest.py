"""
Shared fixtures: a real git repository of the example app, and one real Salt
master with three real minions (pytest-salt-factories), shared per session.

The master serves a file_roots directory that holds links to the repository's
``_modules``, ``_runners``, ``_utils`` and ``_states`` (the Salt way of
installing), plus the artifact root; each minion gets its own deploy_to under
the session's temp dir through pillar.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_APP = os.path.join(REPO_ROOT, "examples", "rainbow")
MINION_IDS = ("web1", "web2", "web3")
APP_USER = "www-data"

for extra in ("_utils", "_runners", "_modules"):
    sys.path.insert(0, os.path.join(REPO_ROOT, extra))


def pytest_unconfigure(config):
    """
    Salt keeps a deferred console handler in this process and flushes it at
    exit, when pytest has already closed the stream it holds ("I/O operation on
    closed file" tracebacks): hand its queued records over while pytest runs.
    """
    from salt._logging import impl  # pylint: disable=import-outside-toplevel

    impl.shutdown_temp_handler()


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


# ---------------------------------------------------------------- git


def git(cwd, *args, env=None):
    full_env = dict(os.environ, GIT_AUTHOR_NAME="Test Dev", GIT_AUTHOR_EMAIL="dev@example.com",
                    GIT_COMMITTER_NAME="Test Dev", GIT_COMMITTER_EMAIL="dev@example.com")
    full_env.update(env or {})
    done = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


class AppRepo:
    """A real git repository of the example app that tests can add commits to."""

    def __init__(self, path):
        self.path = path

    def commit(self, message, files=None, remove=()):
        for rel, content in (files or {}).items():
            full = os.path.join(self.path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as handle:
                handle.write(content)
        for rel in remove:
            git(self.path, "rm", "-q", rel)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def head(self, ref="HEAD"):
        return git(self.path, "rev-parse", ref)


def make_app_repo(path):
    shutil.copytree(EXAMPLE_APP, path)
    git(path, "init", "-q", "-b", "master")
    repo = AppRepo(path)
    repo.commit("first release", {"VERSION": "1.0.0\n"})
    git(path, "tag", "v1.0.0")
    repo.commit("second release", {"VERSION": "1.1.0\n"})
    git(path, "tag", "-a", "v1.1.0", "-m", "v1.1.0")
    git(path, "checkout", "-q", "-b", "release/2.0")
    repo.commit("work for 2.0", {"VERSION": "2.0.0-dev\n"})
    git(path, "checkout", "-q", "master")
    return repo


@pytest.fixture(scope="session")
def app_repo(tmp_path_factory):
    return make_app_repo(str(tmp_path_factory.mktemp("git") / "rainbow"))


# ---------------------------------------------------------------- salt


@pytest.fixture(scope="session")
def salt_factories_default_root_dir(tmp_path_factory):
    # Short: unix socket paths must stay under ~100 bytes.
    root = tempfile.mkdtemp(prefix="sr", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def nodes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    # A regular file where a directory should be: web3's 'brittle' deploy_to cannot be created.
    (root / "blocker").write_text("not a directory\n")
    return str(root)


def make_file_root(root):
    """A file_roots base dir installed the Salt way: links to the repo's loader folders."""
    os.makedirs(root)
    for folder in ("_modules", "_runners", "_utils", "_states"):
        os.symlink(os.path.join(REPO_ROOT, folder), os.path.join(root, folder))
    os.symlink(os.path.join(REPO_ROOT, "salt", "release"), os.path.join(root, "release"))
    os.mkdir(os.path.join(root, "releases"))
    return root


@pytest.fixture(scope="session")
def file_root(tmp_path_factory):
    return make_file_root(str(tmp_path_factory.mktemp("file_root") / "base"))


def project_config(app_repo_path, **extra):
    config = {
        "repo": app_repo_path,
        "build": ["make dist"],
        "checks": ["make test"],
        "environments": {
            "test": {"target": "web*", "batch": 1},
            "pairs": {"target": "web*", "batch": 2},
            "one": {"target": "web1"},
            "nowhere": {"target": "nothing-here*"},
        },
    }
    config.update(extra)
    return config


PILLAR_TOP = "base:\n  '*':\n    - release\n"

PILLAR_RELEASE = textwrap.dedent(
    """\
    {% set node = grains['id'] %}
    release:
    {% for project in ['rainbow', 'badcheck', 'brittle', 'stale'] %}
      {{ project }}:
        {% if project == 'brittle' and node == 'web3' %}
        deploy_to: {{ nodes_root }}/blocker/{{ project }}
        {% else %}
        deploy_to: {{ nodes_root }}/{{ node }}/{{ project }}
        {% endif %}
        user: {{ app_user }}
        shared: [storage, logs]
        keep_releases: 5
    {% endfor %}
    """
)


@pytest.fixture(scope="session")
def master_release_config(app_repo, file_root, tmp_path_factory):
    return {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("state")),
        "projects": {
            "rainbow": project_config(app_repo.path),
            "badcheck": project_config(app_repo.path, checks=["echo quality gate says no; exit 3"]),
            "brittle": project_config(app_repo.path),
            "stale": project_config(app_repo.path),
        },
    }


class Cluster:
    """
    A running master and its minions, with the CLIs tests use. Build one with
    ``start_cluster`` from a module- or session-scoped fixture.
    """

    def __init__(self, master, minions, release_config, nodes_root, pillar_root):
        self.master = master
        self.pillar_root = pillar_root
        self.minions = minions
        self.release_config = release_config
        self.nodes_root = nodes_root
        self.salt_cli = master.salt_cli(timeout=120)
        self.salt_run_cli = master.salt_run_cli(timeout=300)

    def deploy_to(self, minion, project="rainbow"):
        return os.path.join(self.nodes_root, minion, project)

    def run(self, fun, *args):
        """``salt-run <fun> <args> --out=json``: (process result, runner return)."""
        result = self.salt_run_cli.run(fun, *args, "--out=json")
        return result, runner_return(result)


@contextlib.contextmanager
def start_cluster(salt_factories, name, file_root, release_config, pillar_sls, nodes_root,
                  minion_ids=MINION_IDS, grains=None, master_overrides=None, minion_overrides=None,
                  pillar_files=None):
    """
    Start a master ``name`` and its minions, install salt-release the Salt way
    and sync it everywhere. ``pillar_sls`` becomes the pillar's release.sls
    (``{{ nodes_root }}`` and ``{{ app_user }}`` filled in); ``pillar_files``
    are written beside it.
    """
    pillar_root = tempfile.mkdtemp(prefix="pillar-", dir=nodes_root)
    for rel, content in (pillar_files or {}).items():
        with open(os.path.join(pillar_root, rel), "w", encoding="utf-8") as handle:
            handle.write(content)
    with open(os.path.join(pillar_root, "top.sls"), "w", encoding="utf-8") as handle:
        handle.write(PILLAR_TOP)
    with open(os.path.join(pillar_root, "release.sls"), "w", encoding="utf-8") as handle:
        handle.write(pillar_sls.replace("{{ nodes_root }}", nodes_root).replace("{{ app_user }}", APP_USER))
    overrides = {
        "file_roots": {"base": [file_root]},
        "pillar_roots": {"base": [pillar_root]},
        "release": release_config,
        "open_mode": True,
        "auto_accept": True,
        "timeout": 15,
        "gather_job_timeout": 10,
        "fileserver_list_cache_time": 0,
    }
    overrides.update(master_overrides or {})
    master = salt_factories.salt_master_daemon(name, overrides=overrides)
    with master.started(start_timeout=120):
        minions = []
        for minion_id in minion_ids:
            minion_grains = {"env": "test", "role": "web"}
            minion_grains.update((grains or {}).get(minion_id, {}))
            minion_conf = {"grains": minion_grains, "log_level_logfile": "debug"}
            minion_conf.update(minion_overrides or {})
            minion = master.salt_minion_daemon(minion_id, overrides=minion_conf)
            minion.start(start_timeout=120)
            minions.append(minion)
        cluster = Cluster(master, minions, release_config, nodes_root, pillar_root)
        synced = cluster.salt_cli.run("saltutil.sync_all", minion_tgt="*")
        assert synced.returncode == 0, synced
        assert cluster.salt_run_cli.run("saltutil.sync_all").returncode == 0
        try:
            yield cluster
        finally:
            for minion in minions:
                minion.terminate()


@pytest.fixture(scope="session")
def cluster(salt_factories, file_root, nodes_root, master_release_config):
    """The shared cluster: master 'master', minions web1..web3."""
    with start_cluster(salt_factories, "master", file_root, master_release_config,
                       PILLAR_RELEASE, nodes_root) as running:
        yield running


@pytest.fixture(scope="session")
def salt_master(cluster):
    return cluster.master


@pytest.fixture(scope="session")
def salt_cli(cluster):
    return cluster.salt_cli


@pytest.fixture(scope="session")
def salt_run_cli(cluster):
    return cluster.salt_run_cli


def deploy_to(nodes_root, minion, project="rainbow"):
    return os.path.join(nodes_root, minion, project)


def runner_return(result):
    """
    The runner's return from ``salt-run --out=json``: progress events print
    their own JSON documents first, the return is the last one.
    """
    text = result.stdout.strip()
    decoder = json.JSONDecoder()
    docs, index = [], 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            break
        doc, index = decoder.raw_decode(text, index)
        docs.append(doc)
    assert docs, f"salt-run printed nothing parseable: {result.stdout!r} {result.stderr!r}"
    return docs[-1]
