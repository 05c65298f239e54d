"""
``release.install`` on a real minion refuses hostile tarballs: nothing is
written outside the release, no ``releases/<name>`` is left behind and
``current`` does not move. The tarballs are staged by the test under the
master's artifact root with a correct sha256, so only their contents are wrong.
"""

import json
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


# ---------------------------------------------------------------- CVE-2025-4517 on a real node


def _realpath_limit_attack(dest, victim_dir, flag, newfile):
    """
    CPython's test_realpath_limit_attack (CVE-2025-4517), aimed from ``dest``
    (where the node extracts) at ``victim_dir``: a dir/symlink chain whose
    expansion overflows PATH_MAX, a link out of it, a hardlink to ``flag``
    through that link, then the hardlink's name again as a file (overwrite),
    and a new file through the link.
    """
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(os.path.dirname(dest), "PC_PATH_MAX") - len(dest) - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        info = tarfile.TarInfo(os.path.join(path, component))
        info.type, info.mode = tarfile.DIRTYPE, 0o777
        members.append((info, None))
        members.append(artifacts.special_member(os.path.join(path, step), tarfile.SYMTYPE, component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    up = os.path.relpath(victim_dir, os.path.dirname(dest))
    members += [
        artifacts.special_member(linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps))),
        artifacts.special_member("escape", tarfile.SYMTYPE, os.path.join(linkpath, "..", up)),
        artifacts.special_member("flaglink", tarfile.LNKTYPE, os.path.join("escape", flag)),
        artifacts.file_member("flaglink", b"overwritten by the artifact"),
        artifacts.file_member(f"escape/{newfile}", b"written by the artifact"),
    ]
    return members


def _victim(deploy_to):
    """A file beside deploy_to (outside it) and the listing of that folder, to compare after."""
    victim_dir = os.path.dirname(deploy_to)
    flag = f"flag-{uuid.uuid4().hex}"
    with open(os.path.join(victim_dir, flag), "w") as handle:
        handle.write("original")
    return victim_dir, flag, f"new-{uuid.uuid4().hex}"


def _assert_victim_untouched(victim_dir, flag, newfile, before):
    with open(os.path.join(victim_dir, flag)) as handle:
        assert handle.read() == "original"
    assert not os.path.lexists(os.path.join(victim_dir, newfile))
    assert sorted(os.listdir(victim_dir)) == before


def test_cve_2025_4517_artifact_is_refused_by_install(cluster, node):
    deploy_to, good = node
    victim_dir, flag, newfile = _victim(deploy_to)
    before = sorted(os.listdir(victim_dir))
    name = artifacts.fresh_name(PROJECT, "cve")
    dest = os.path.join(deploy_to, "releases", f"{name}.partial")
    url, sha = artifacts.stage(cluster, PROJECT, name, _realpath_limit_attack(dest, victim_dir, flag, newfile))
    result = artifacts.install(cluster, MINION, PROJECT, name, url, sha)
    # On main (tarfile's data filter, Python 3.11.7) this wrote both files beside deploy_to.
    _assert_victim_untouched(victim_dir, flag, newfile, before)
    assert result.returncode != 0, result
    assert "refused to unpack" in str(result.data), result.data
    _assert_untouched(deploy_to, good, name)


def test_cve_2025_4517_delta_is_refused_and_the_full_artifact_used(cluster, node):
    """The delta path uses the same extractor: a hostile delta is refused, the good full artifact installs."""
    deploy_to, good = node
    victim_dir, flag, newfile = _victim(deploy_to)
    before = sorted(os.listdir(victim_dir))
    name = artifacts.fresh_name(PROJECT, "delta")
    url, sha = artifacts.stage(cluster, PROJECT, name, [artifacts.file_member("index.html", b"full\n")])
    dest = os.path.join(deploy_to, "releases", f"{name}.partial")
    doc = json.dumps({"base": good, "unchanged": {}}).encode()
    hostile = [artifacts.file_member(".release-delta.json", doc)] + _realpath_limit_attack(
        dest, victim_dir, flag, newfile)
    delta_url, delta_sha = artifacts.stage(cluster, PROJECT, f"{name}.delta", hostile)
    result = cluster.salt_cli.run(
        "release.install", PROJECT, name, f"source={url}", f"source_hash={sha}", f"delta_source={delta_url}",
        f"delta_hash={delta_sha}", f"base={good}", minion_tgt=MINION,
    )
    _assert_victim_untouched(victim_dir, flag, newfile, before)
    assert result.returncode == 0, result
    assert result.data["transfer"] == "full" and "refused" in result.data["delta_refused"], result.data
    with open(os.path.join(deploy_to, "releases", name, "index.html")) as handle:
        assert handle.read() == "full\n"
    assert os.readlink(os.path.join(deploy_to, "current")) == os.path.join("releases", good)
