"""
Exporting a commit's tree on the master: hostile trees built straight into a
real git repository (raw tree objects, so symlinks, duplicate names and entry
order are the attacker's) must never write outside the export folder.
"""

import os
import pathlib
import stat

import git
import pytest

import _release_source as source
from tests import gitcraft as craft
from tests.gitcraft import EXEC, FILE, LINK, TREE


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "mirror.git")
    git.Repo.init(path, bare=True)
    return path


@pytest.fixture
def canary(tmp_path):
    """A file outside the export folder an attacker wants to overwrite, and a folder to write new files in."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "flag").write_text("original")
    return folder


def _assert_canary_untouched(canary):
    assert (canary / "flag").read_text() == "original"
    assert sorted(os.listdir(canary)) == ["flag"]


def test_cve_2025_4517_tree_writes_nothing_outside(repo, tmp_path, canary):
    dest = str(tmp_path / "builds" / ("b" * 32))
    os.makedirs(os.path.dirname(dest))
    commit = craft.commit(repo, craft.cve_2025_4517_tree(repo, dest, canary))
    with pytest.raises(source.SourceError, match="refused export.*appears twice"):
        source.export(git.Repo(repo), commit, dest)
    _assert_canary_untouched(canary)
    assert os.listdir(tmp_path / "builds") == []


@pytest.mark.parametrize("target", ["../../outside", "/", "/etc", "sub/../../x", "../../outside/flag"])
@pytest.mark.parametrize("repeated", [True, False])
def test_a_link_leaving_the_tree_is_refused_and_the_tree_removed(repo, tmp_path, canary, target, repeated):
    files = craft.tree(repo, [(FILE, "flag", craft.blob(repo, "pwned"))])
    entries = [(FILE, "README", craft.blob(repo, "hi")), (LINK, "out", craft.blob(repo, target))]
    tree = craft.tree(repo, entries + ([(TREE, "out", files)] if repeated else []))
    dest = str(tmp_path / "builds" / "t")
    os.makedirs(os.path.dirname(dest))
    why = "appears twice" if repeated else "links to .*, outside the tree"
    with pytest.raises(source.SourceError, match=f"refused export: 'out' {why}"):
        source.export(git.Repo(repo), craft.commit(repo, tree), dest)
    _assert_canary_untouched(canary)
    assert not os.path.exists(dest)


def test_links_inside_the_tree_and_modes_survive(repo, tmp_path):
    sub = craft.tree(repo, [(EXEC, "run.sh", craft.blob(repo, "#!/bin/sh\n")),
                            (LINK, "up", craft.blob(repo, "../README"))])
    tree = craft.tree(repo, [(FILE, "README", craft.blob(repo, "hi")), (LINK, "link", craft.blob(repo, "README")),
                        (TREE, "sub", sub)])
    dest = str(tmp_path / "t")
    source.export(git.Repo(repo), craft.commit(repo, tree), dest)
    assert pathlib.Path(dest, "sub", "up").read_text() == "hi"
    assert os.readlink(os.path.join(dest, "link")) == "README"
    assert stat.S_IMODE(os.stat(os.path.join(dest, "sub", "run.sh")).st_mode) & 0o7022 == 0
    assert os.access(os.path.join(dest, "sub", "run.sh"), os.X_OK)
    assert not os.path.exists(os.path.join(dest, ".git"))
    assert pathlib.Path(dest, "README").read_text() == "hi"
