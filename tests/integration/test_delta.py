"""
Delta transfer on a real cluster (master "m8", minions m8-web1..2).

What the master served a node is read from the node's cp cache: every
salt:// file a minion fetches lands there under files/base/<path>, and the
release module fetches nothing else. So "sent" below is the size of the
files that appeared in that cache for the release.
"""

import os
import random
import shutil
import textwrap

import pytest

from tests.conftest import make_app_repo, make_file_root, project_config, start_cluster
from tests.snapshots import snapshot

MINIONS = ("m8-web1", "m8-web2")

PILLAR = textwrap.dedent(
    """\
    release:
      rainbow:
        deploy_to: {{ nodes_root }}/{{ grains['id'] }}/rainbow
        user: {{ app_user }}
        shared: [storage, logs]
    """
)


@pytest.fixture(scope="module")
def m8(salt_factories, tmp_path_factory):
    root = tmp_path_factory.mktemp("m8")
    repo = make_app_repo(str(root / "rainbow"))
    # Some weight, incompressible like real images and minified assets, so a delta has something to save.
    rng = random.Random(8)
    repo.commit("assets", {f"public/assets/a{i:02}.txt": rng.randbytes(6000).hex() for i in range(40)})
    file_root = make_file_root(str(root / "base"))
    config = {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": str(root / "state"),
        "projects": {"rainbow": project_config(repo.path, environments={"test": {"target": "m8-web*"}})},
    }
    nodes_root = str(root / "nodes")
    os.mkdir(nodes_root)
    with start_cluster(salt_factories, "m8", file_root, config, PILLAR, nodes_root, minion_ids=MINIONS) as cluster:
        cluster.repo = repo
        yield cluster


def deploy(m8):
    res, ret = m8.run("release.deploy", "rainbow", "env=test", "ref=master")
    assert ret["result"] and res.returncode == 0, ret
    return ret["release"]


def served(m8, minion, release):
    """Which artifacts of ``release`` the master served ``minion``, with their sizes."""
    folder = os.path.join(m8.minions[MINIONS.index(minion)].config["cachedir"], "files", "base", "releases", "rainbow")
    return {
        name: os.path.getsize(os.path.join(folder, name))
        for name in os.listdir(folder) if name.startswith(release + ".")
    }


def full_size(m8, release):
    return os.path.getsize(os.path.join(m8.release_config["artifact_root"], "rainbow", f"{release}.tar.gz"))


def release_dir(m8, minion, release):
    return os.path.join(m8.deploy_to(minion), "releases", release)


def test_one_file_change_sends_a_delta_and_a_tampered_base_gets_the_full_artifact(m8):
    first = deploy(m8)
    assert served(m8, "m8-web1", first) == {f"{first}.tar.gz": full_size(m8, first)}

    # web2's copy of the base was changed on the node: it must not be carried over.
    with open(os.path.join(release_dir(m8, "m8-web2", first), "public", "assets", "a07.txt"), "a") as handle:
        handle.write("tampered")
    m8.repo.commit("one file changes", {"public/assets/a03.txt": "new content\n"})
    second = deploy(m8)

    delta_name = f"{second}.delta.tar.gz"
    assert served(m8, "m8-web1", second).keys() == {delta_name}
    sent = served(m8, "m8-web1", second)[delta_name]
    full = full_size(m8, second)
    print(f"one-file change: web1 was sent {sent} bytes, "
          f"the full artifact is {full} bytes ({100.0 * sent / full:.2f}%)")
    assert sent < 0.05 * full
    # web2 fetched the delta, found its base changed, and fell back to the full artifact.
    assert served(m8, "m8-web2", second) == {delta_name: sent, f"{second}.tar.gz": full}

    delta_built, full_built = (snapshot(release_dir(m8, m, second)) for m in MINIONS)
    assert delta_built == full_built
    assert delta_built["public/assets/a03.txt"][2] == b"new content\n"
    assert b"tampered" not in delta_built["public/assets/a07.txt"][2]
    # web1 shares unchanged files with its base; web2, installed whole, does not.
    web1_asset = os.path.join(release_dir(m8, "m8-web1", second), "public", "assets", "a10.txt")
    assert os.stat(web1_asset).st_nlink == 2
    for minion in MINIONS:
        assert os.readlink(os.path.join(m8.deploy_to(minion), "current")) == f"releases/{second}"


def test_a_node_without_the_base_installs_the_full_artifact(m8):
    listed = m8.salt_cli.run("release.list", "rainbow", minion_tgt="m8-web1").data
    base = listed["current"]
    older = listed["releases"][0]
    # web2 goes back to the older release and loses the base, so the base stays web1's.
    assert m8.salt_cli.run("release.activate", "rainbow", older, minion_tgt="m8-web2").returncode == 0
    shutil.rmtree(release_dir(m8, "m8-web2", base))
    m8.repo.commit("another file changes", {"public/assets/a04.txt": "newer content\n"})
    third = deploy(m8)

    assert served(m8, "m8-web1", third).keys() == {f"{third}.delta.tar.gz"}
    assert served(m8, "m8-web2", third) == {f"{third}.tar.gz": full_size(m8, third)}
    assert snapshot(release_dir(m8, "m8-web1", third)) == snapshot(release_dir(m8, "m8-web2", third))
