"""
Delta artifacts (``_utils/release_delta.py``, ``stage_delta``): what a delta
holds, that a release rebuilt from a delta and its base equals a full
unpack, and that any doubt about the base is refused.
"""

import json
import os
import random
import tarfile

import pytest

import _release_artifact as artifact
import _release_prune as prune
import release_contract as contract
import release_delta as delta
import release_unpack
from tests.snapshots import snapshot

BASE = "app_test_v1_master_2026-01-01_000000_dev"
NEW = "app_test_v2_master_2026-01-02_000000_dev"


def write_tree(root, files):
    for rel, (content, mode) in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(content)
        os.chmod(path, mode)


def app_files(count=40, changed=()):
    """Incompressible files (as real assets mostly are), the same for the same index."""
    files = {f"public/f{i:03}.txt": (os.urandom(2000) if f"public/f{i:03}.txt" in changed else
                                       random.Random(i).randbytes(2000), 0o644) for i in range(count)}
    files["bin/run"] = (b"#!/bin/sh\necho run\n", 0o755)
    files["storage/seed.txt"] = (b"seed\n", 0o644)
    return files


MANIFESTS = {}  # release -> the manifest its artifact holds


def artifact_of(tmp_path, name, files):
    """Package ``files`` as release ``name``; its tree stays at ``tree-<name>`` (a delta is made from it)."""
    tree = tmp_path / f"tree-{name}"
    write_tree(str(tree), files)
    dest = str(tmp_path / "art" / f"{name}.tar.gz")
    MANIFESTS[name] = artifact.package(str(tree), {"name": name}, dest)[1]
    return dest


def unpack(tarball, dest):
    """As a node unpacks a full artifact: the one safe extractor."""
    release_unpack.extract(tarball, dest)
    return dest


@pytest.fixture
def pair(tmp_path):
    """A base artifact unpacked as a node has it, and a new artifact with one changed file."""
    base_files = app_files()
    base_tar = artifact_of(tmp_path, BASE, base_files)
    new_tar = artifact_of(tmp_path, NEW, dict(base_files, **{"public/f007.txt": (b"changed\n", 0o644)}))
    base_dir = unpack(base_tar, str(tmp_path / BASE))
    return tmp_path, base_tar, new_tar, base_dir


def build(tmp_path, new_tar, base_tar):
    dest = str(tmp_path / "art" / f"{NEW}.delta.tar.gz")
    base = delta.member_digests(base_tar) if os.path.exists(base_tar) else None
    tree = str(tmp_path / f"tree-{NEW}")
    return dest, artifact.write_delta(tree, MANIFESTS[NEW], artifact.file_list(tree), base, BASE, dest)


def test_delta_holds_only_what_changed(pair):
    tmp_path, base_tar, new_tar, _ = pair
    dest, built = build(tmp_path, new_tar, base_tar)
    with tarfile.open(dest) as tar:
        files = sorted(m.name for m in tar if m.isreg())
        doc = json.load(tar.extractfile(delta.DELTA_MANIFEST))
    assert files == [delta.DELTA_MANIFEST, "RELEASE.json", "public/f007.txt"]
    assert doc["base"] == BASE
    assert len(doc["unchanged"]) == built["unchanged"] == 41
    assert "public/f007.txt" not in doc["unchanged"] and "RELEASE.json" not in doc["unchanged"]
    assert doc["unchanged"]["bin/run"]["mode"] == 0o755


def test_release_from_delta_equals_full_unpack(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    dest, _ = build(tmp_path, new_tar, base_tar)
    rebuilt = str(tmp_path / "rebuilt")
    carried = delta.apply(dest, BASE, base_dir, rebuilt)
    full = unpack(new_tar, str(tmp_path / "full"))
    assert carried == 41
    assert snapshot(rebuilt) == snapshot(full)
    # Unchanged files share the base's inode (hardlinks), changed ones do not.
    assert os.stat(os.path.join(rebuilt, "bin/run")).st_ino == os.stat(os.path.join(base_dir, "bin/run")).st_ino
    assert os.stat(os.path.join(rebuilt, "public/f007.txt")).st_nlink == 1


def test_shared_paths_are_not_carried(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    dest, _ = build(tmp_path, new_tar, base_tar)
    rebuilt = str(tmp_path / "rebuilt")
    delta.apply(dest, BASE, base_dir, rebuilt, skip=["storage"])
    assert not os.path.exists(os.path.join(rebuilt, "storage", "seed.txt"))
    assert os.path.isfile(os.path.join(rebuilt, "bin", "run"))


def test_tampered_base_file_is_refused(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    dest, _ = build(tmp_path, new_tar, base_tar)
    with open(os.path.join(base_dir, "public/f001.txt"), "ab") as handle:
        handle.write(b"<?php evil(); ?>")
    with pytest.raises(delta.DeltaRefused, match="f001.txt in the base release differs"):
        delta.apply(dest, BASE, base_dir, str(tmp_path / "rebuilt"))


def test_base_file_with_another_mode_is_refused(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    dest, _ = build(tmp_path, new_tar, base_tar)
    os.chmod(os.path.join(base_dir, "public/f002.txt"), 0o755)
    with pytest.raises(delta.DeltaRefused, match="differs"):
        delta.apply(dest, BASE, base_dir, str(tmp_path / "rebuilt"))


def test_base_file_reached_through_a_link_is_refused(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    dest, _ = build(tmp_path, new_tar, base_tar)
    elsewhere = tmp_path / "shared-storage"
    elsewhere.mkdir()
    (elsewhere / "seed.txt").write_bytes(b"seed\n")
    storage = os.path.join(base_dir, "storage")
    os.unlink(os.path.join(storage, "seed.txt"))
    os.rmdir(storage)
    os.symlink(str(elsewhere), storage)
    with pytest.raises(delta.DeltaRefused, match="through a link"):
        delta.apply(dest, BASE, base_dir, str(tmp_path / "rebuilt"))


def test_missing_base_file_and_wrong_base_are_refused(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    dest, _ = build(tmp_path, new_tar, base_tar)
    with pytest.raises(delta.DeltaRefused, match="not against base"):
        delta.apply(dest, NEW, base_dir, str(tmp_path / "rebuilt-1"))
    os.unlink(os.path.join(base_dir, "bin/run"))
    with pytest.raises(delta.DeltaRefused, match="missing from the base"):
        delta.apply(dest, BASE, base_dir, str(tmp_path / "rebuilt-2"))


def test_a_mode_change_alone_is_sent(tmp_path):
    files = app_files()
    base_tar = artifact_of(tmp_path, BASE, files)
    new_tar = artifact_of(tmp_path, NEW, dict(files, **{"public/f003.txt": (files["public/f003.txt"][0], 0o755)}))
    dest, _ = build(tmp_path, new_tar, base_tar)
    with tarfile.open(dest) as tar:
        assert "public/f003.txt" in tar.getnames()


def test_no_delta_when_it_would_not_pay_or_the_base_is_gone(tmp_path):
    files = app_files(count=40)
    base_tar = artifact_of(tmp_path, BASE, files)
    changed = [f"public/f{i:03}.txt" for i in range(40)]
    new_tar = artifact_of(tmp_path, NEW, app_files(count=40, changed=changed))
    assert build(tmp_path, new_tar, base_tar)[1] is None
    assert not os.path.exists(str(tmp_path / "art" / f"{NEW}.delta.tar.gz"))
    assert build(tmp_path, new_tar, str(tmp_path / "gone.tar.gz"))[1] is None


def salt_urls(tmp_path):
    """What the deploy passes as ``url_of``: artifacts under ``<tmp_path>/art`` served as salt://art/."""
    return lambda name: artifact.salt_url(str(tmp_path), [str(tmp_path)], "art", name)


def test_the_delta_is_offered_from_where_the_full_artifact_is(pair):
    """With an HTTP artifact base, nodes fetch the delta over HTTP too, not through the master's fileserver."""
    tmp_path, _, new_tar, _ = pair
    offer, _ = artifact.stage_delta(new_tar, str(tmp_path / f"tree-{NEW}"), MANIFESTS[NEW], {"a": BASE},
                                    lambda name: f"https://artifacts.example/app/{name}.tar.gz")
    assert offer["delta_source"] == f"https://artifacts.example/app/{NEW}.delta.tar.gz"


def test_stage_delta_offers_the_release_most_nodes_run(pair):
    tmp_path, base_tar, new_tar, _ = pair
    urls = salt_urls(tmp_path)
    currents = {"a": BASE, "b": BASE, "c": "app_test_v0_master_2025-01-01_000000_dev", "d": None}
    offer, said = artifact.stage_delta(new_tar, str(tmp_path / f"tree-{NEW}"), MANIFESTS[NEW], currents, urls)
    assert offer["base"] == BASE
    assert offer["delta_source"] == f"salt://art/{NEW}.delta.tar.gz"
    assert offer["delta_hash"] == contract.sha256_file(str(tmp_path / "art" / f"{NEW}.delta.tar.gz"))
    assert "41 carried over" in said
    nobody_older = {"a": None, "b": NEW}
    assert artifact.stage_delta(new_tar, str(tmp_path / f"tree-{NEW}"), MANIFESTS[NEW], nobody_older, urls) == (
        {}, "no delta: no node runs an earlier release")


def test_the_delta_is_written_from_the_tree_without_reading_the_full_artifact_back(pair):
    tmp_path, base_tar, new_tar, base_dir = pair
    with open(new_tar, "r+b") as handle:  # what a deploy would pay to decompress: make it unreadable
        handle.truncate(10)
    dest, built = build(tmp_path, new_tar, base_tar)
    assert built == {"unchanged": 41, "sent": 5}  # 3 folders, the changed file, RELEASE.json
    rebuilt = str(tmp_path / "rebuilt")
    delta.apply(dest, BASE, base_dir, rebuilt)
    with tarfile.open(dest) as tar:
        assert json.load(tar.extractfile("RELEASE.json")) == MANIFESTS[NEW]
    with open(os.path.join(rebuilt, "public/f007.txt"), "rb") as handle:
        assert handle.read() == b"changed\n"


def test_the_file_list_left_beside_the_artifact_matches_the_tarball(pair):
    """The next delta reads this side file instead of decompressing the base artifact."""
    tmp_path, _, new_tar, _ = pair
    artifact.stage_delta(new_tar, str(tmp_path / f"tree-{NEW}"), MANIFESTS[NEW], {}, salt_urls(tmp_path))
    with open(tmp_path / "art" / f"{NEW}.files.json", encoding="utf-8") as handle:
        side = {path: tuple(row) for path, row in json.load(handle).items()}
    from_tar = delta.member_digests(new_tar)
    from_tar.pop("RELEASE.json")
    assert side == from_tar


def test_a_tree_with_hard_links_gets_no_file_list(tmp_path):
    write_tree(str(tmp_path), app_files(count=2))
    os.link(tmp_path / "bin" / "run", tmp_path / "bin" / "again")
    assert artifact.file_list(str(tmp_path)) is None


def test_pruning_a_release_takes_its_side_files_and_spares_the_deltas_of_kept_ones(pair):
    tmp_path, base_tar, new_tar, _ = pair
    urls = salt_urls(tmp_path)
    artifact.stage_delta(base_tar, str(tmp_path / f"tree-{BASE}"), MANIFESTS[BASE], {}, urls)
    artifact.stage_delta(new_tar, str(tmp_path / f"tree-{NEW}"), MANIFESTS[NEW], {"a": BASE}, urls)
    folder = str(tmp_path / "art")
    assert prune.prune_artifacts(str(tmp_path), "art", "test", {NEW}) == [BASE]
    assert sorted(os.listdir(folder)) == sorted(
        [f"{NEW}.tar.gz", f"{NEW}{delta.DELTA_SUFFIX}", f"{NEW}{delta.FILES_SUFFIX}"])
