"""
The ``current`` switch is atomic: readers never see ``current/`` missing.

``test_readers_never_see_current_missing`` is a unit-level test of the real
switch code: it loads ``_modules/release.py`` with importlib, gives it
``__opts__``/``__pillar__``/``__salt__`` dicts and calls its ``activate``
1,000 times on a real minion's deploy_to (two releases installed there by
Salt), because 1,000 ``salt`` calls would take minutes. The other tests drive
``release.activate`` over Salt.
"""

import importlib.util
import os
import threading

import pytest

from tests.conftest import REPO_ROOT
from tests.integration import artifacts

PROJECT = "stale"
SWITCHES = 1000


def load_release_module(cachedir, minion_id, pillar):
    spec = importlib.util.spec_from_file_location(
        "release_module_under_test", os.path.join(REPO_ROOT, "_modules", "release.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # file_client local: the module skips the event bus, as under salt-call --local.
    module.__opts__ = {"cachedir": cachedir, "id": minion_id, "file_client": "local"}
    module.__pillar__ = pillar
    module.__salt__ = {}
    return module


def install_release(cluster, minion, version):
    name = artifacts.fresh_name(PROJECT, version)
    body = f"{version}\n".encode()
    url, sha = artifacts.stage(cluster, PROJECT, name, [artifacts.file_member("index.html", body)])
    installed = artifacts.install(cluster, minion, PROJECT, name, url, sha)
    assert installed.returncode == 0, installed
    return name


def activate(cluster, minion, name):
    return cluster.salt_cli.run("release.activate", PROJECT, name, minion_tgt=minion)


@pytest.fixture(scope="module")
def two_releases(cluster):
    minion = "web2"
    names = [install_release(cluster, minion, v) for v in ("va", "vb")]
    assert activate(cluster, minion, names[0]).returncode == 0
    return minion, names


def test_readers_never_see_current_missing(cluster, two_releases, tmp_path):
    minion, names = two_releases
    deploy_to = cluster.deploy_to(minion, PROJECT)
    pillar = {"release": {PROJECT: {"deploy_to": deploy_to, "user": "www-data", "shared": []}}}
    module = load_release_module(str(tmp_path), minion, pillar)
    target = os.path.join(deploy_to, "current", "index.html")
    stop = threading.Event()
    reads, misses, seen = [0, 0], [], set()

    def reader(slot):
        while not stop.is_set():
            try:
                with open(target, "rb") as handle:
                    seen.add(handle.read())
            except OSError as exc:
                misses.append(exc)
            reads[slot] += 1

    threads = [threading.Thread(target=reader, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    try:
        for number in range(SWITCHES):
            ret = module.activate(PROJECT, names[(number + 1) % 2], env="test")
            assert ret["changed"] is True
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(f"\n{SWITCHES} switches, {sum(reads)} reads, {len(misses)} misses")
    assert misses == []
    assert seen == {b"va\n", b"vb\n"}
    assert os.readlink(os.path.join(deploy_to, "current")) == os.path.join("releases", names[0])
    # No temp links left behind in deploy_to.
    assert sorted(os.listdir(deploy_to)) == ["current", "meta", "releases", "shared"]


def test_activate_over_salt_switches_and_returns_the_previous(cluster, two_releases):
    minion, names = two_releases
    before = os.readlink(os.path.join(cluster.deploy_to(minion, PROJECT), "current"))
    previous = os.path.basename(before)
    other = names[1] if previous == names[0] else names[0]
    result = activate(cluster, minion, other)
    assert result.returncode == 0, result
    assert result.data["previous"] == previous and result.data["changed"] is True
    assert os.readlink(os.path.join(cluster.deploy_to(minion, PROJECT), "current")) == f"releases/{other}"
    again = activate(cluster, minion, other)
    assert again.returncode == 0 and again.data["changed"] is False


def test_activate_refuses_a_current_that_is_a_real_directory(cluster):
    minion = "web3"
    name = install_release(cluster, minion, "vdir")
    current = os.path.join(cluster.deploy_to(minion, PROJECT), "current")
    os.makedirs(current)
    with open(os.path.join(current, "precious.txt"), "w") as handle:
        handle.write("rsync days\n")
    result = activate(cluster, minion, name)
    assert result.returncode != 0
    assert "is a real directory, not a symlink" in str(result.data), result.data
    assert os.path.isdir(current) and not os.path.islink(current)
    with open(os.path.join(current, "precious.txt")) as handle:
        assert handle.read() == "rsync days\n"


def test_activate_refuses_a_release_that_is_not_installed(cluster, two_releases):
    minion, _ = two_releases
    missing = artifacts.fresh_name(PROJECT, "never")
    result = activate(cluster, minion, missing)
    assert result.returncode != 0 and "is not installed on this node" in str(result.data)
