"""package(): the tarball, its manifest, file count and sha256; no .git."""

import hashlib
import json
import os
import tarfile

import pytest

import _release_artifact as artifact
import release_contract as contract


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "public").mkdir(parents=True)
    (root / "public" / "index.php").write_text("<?php echo 1;\n")
    (root / "README").write_text("hi\n")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/master\n")
    os.symlink("public/index.php", root / "index-link.php")
    return root


def test_package_writes_manifest_count_and_sha256(tree, tmp_path):
    dest = tmp_path / "out" / "r.tar.gz"
    sha, manifest = artifact.package(str(tree), {"name": "r", "project": "p"}, str(dest))
    assert sha == hashlib.sha256(dest.read_bytes()).hexdigest()
    # Files and links count, folders do not: index.php, README, index-link.php.
    assert manifest == {"name": "r", "project": "p", "file_count": 3}
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        assert not any(n == ".git" or n.startswith(".git/") for n in names)
        assert set(names) == {"README", "index-link.php", "public", "public/index.php",
                              contract.MANIFEST_NAME}
        assert json.load(tar.extractfile(contract.MANIFEST_NAME)) == manifest
        assert all(m.uid == 0 and m.gid == 0 and m.uname == "" for m in tar.getmembers())
        assert tar.getmember("index-link.php").issym()
    assert [p.name for p in dest.parent.iterdir()] == ["r.tar.gz"]  # no temp file left


def test_run_commands_returns_tail_or_raises_with_it(tmp_path):
    assert artifact.run_commands(["echo one", "echo two >&2"], str(tmp_path), "build", 10) == "one\ntwo"
    with pytest.raises(artifact.ArtifactError) as caught:
        artifact.run_commands(["echo gate says no; exit 3"], str(tmp_path), "checks", 10)
    assert "exited 3" in str(caught.value)
    assert caught.value.tail == "gate says no"


def test_salt_url_needs_artifact_root_inside_file_roots(tmp_path):
    base = tmp_path / "srv"
    (base / "releases").mkdir(parents=True)
    url = artifact.salt_url(str(base / "releases"), [str(base)], "p", "n")
    assert url == "salt://releases/p/n.tar.gz"
    with pytest.raises(artifact.ArtifactError, match="not inside any base file_roots"):
        artifact.salt_url(str(tmp_path / "elsewhere"), [str(base)], "p", "n")
