"""
``release.install`` on a real minion refuses hostile tarballs: nothing is
written outside the release, no ``releases/<name>`` is left behind and
``current`` does not move. The tarballs are staged by the test under the
master's artifact root with a correct sha256, so only their contents are wrong.
"""

import os
import tarfile
import uuid

import pytest

from tests.integration import artifacts

PROJECT = "stale"
MINION = "web1"


@pytest.fixture(scope="module")
def node(cluster):
    """web1 with one good release installed and current."""
    name = artifacts.fresh_name(PROJECT, "v1")
    url, sha = artifacts.stage(cluster, PROJECT, name, [artifacts.file_member("index.html", b"ok\n")])
    assert artifacts.install(cluster, MINION, PROJECT, name, url, sha).returncode == 0
    activated = cluster.salt_cli.run("release.activate", PROJECT, name, minion_tgt=MINION)
    assert activated.returncode == 0, activated
    return cluster.deploy_to(MINION, PROJECT), name


def _escapes(tmp_path):
    """(label, members, the path outside the release each would write)."""
    outside = str(tmp_path / f"outside-{uuid.uuid4().hex}")
    os.makedirs(outside)
    deep = "../" * 12
    return [
        ("dotdot", [artifacts.file_member(f"{deep}{outside[1:]}/dotdot", b"x")], f"{outside}/dotdot"),
        ("absolute", [artifacts.file_member(f"{outside}/absolute", b"x")], f"{outside}/absolute"),
        ("outside symlink, then write through it", [
            artifacts.special_member("out", tarfile.SYMTYPE, outside),
            artifacts.file_member("out/through-link", b"x"),
        ], f"{outside}/through-link"),
        ("relative symlink leaving the tree", [
            artifacts.special_member("up", tarfile.SYMTYPE, f"{deep}{outside[1:]}"),
            artifacts.file_member("up/through-rel-link", b"x"),
        ], f"{outside}/through-rel-link"),
        ("hardlink to a file outside", [
            artifacts.special_member("hard", tarfile.LNKTYPE, "/etc/hostname"),
        ], None),
        ("character device", [artifacts.special_member("null", tarfile.CHRTYPE)], None),
        ("fifo", [artifacts.special_member("pipe", tarfile.FIFOTYPE)], None),
    ]


def _assert_untouched(deploy_to, good, name):
    assert os.readlink(os.path.join(deploy_to, "current")) == os.path.join("releases", good)
    releases = os.listdir(os.path.join(deploy_to, "releases"))
    assert name not in releases and f"{name}.partial" not in releases, releases


@pytest.mark.parametrize("case", range(7), ids=lambda i: ["dotdot", "absolute", "symlink", "relsymlink",
                                                            "hardlink", "device", "fifo"][i])
def test_hostile_tarball_is_refused(cluster, node, tmp_path, case):
    deploy_to, good = node
    label, members, escape = _escapes(tmp_path)[case]
    name = artifacts.fresh_name(PROJECT, "evil")
    url, sha = artifacts.stage(cluster, PROJECT, name, members)
    result = artifacts.install(cluster, MINION, PROJECT, name, url, sha)
    assert result.returncode != 0, (label, result)
    assert "refused to unpack" in str(result.data), (label, result.data)
    if escape:
        assert not os.path.lexists(escape), label
    _assert_untouched(deploy_to, good, name)


def test_checksum_mismatch_is_refused_before_unpacking(cluster, node, tmp_path):
    deploy_to, good = node
    outside = tmp_path / "never"
    name = artifacts.fresh_name(PROJECT, "mismatch")
    # Hostile contents too: had it been unpacked, the error would be about them.
    url, sha = artifacts.stage(cluster, PROJECT, name, [artifacts.file_member(str(outside), b"x")])
    result = artifacts.install(cluster, MINION, PROJECT, name, url, "f" * 64)
    assert result.returncode != 0
    assert f"checksum mismatch for {name}.tar.gz: expected sha256 {'f' * 64}, got {sha}" in str(result.data)
    assert not outside.exists()
    _assert_untouched(deploy_to, good, name)


def test_valid_artifact_installed_twice_changes_nothing(cluster, node):
    deploy_to, good = node
    name = artifacts.fresh_name(PROJECT, "v2")
    url, sha = artifacts.stage(cluster, PROJECT, name, [artifacts.file_member("index.html", b"v2\n")])
    first = artifacts.install(cluster, MINION, PROJECT, name, url, sha)
    assert first.returncode == 0 and first.data["changed"] is True, first
    release_dir = os.path.join(deploy_to, "releases", name)
    stamp = os.stat(release_dir).st_mtime_ns
    again = artifacts.install(cluster, MINION, PROJECT, name, url, sha)
    assert again.returncode == 0 and again.data["changed"] is False, again
    assert os.stat(release_dir).st_mtime_ns == stamp
    # The same name from a different artifact is refused, not replaced.
    other_url, other_sha = artifacts.stage(cluster, PROJECT, artifacts.fresh_name(PROJECT, "v3"), [])
    other = artifacts.install(cluster, MINION, PROJECT, name, other_url, other_sha)
    assert other.returncode != 0 and "different artifact" in str(other.data)
    assert os.readlink(os.path.join(deploy_to, "current")) == os.path.join("releases", good)
