"""
Exporting a commit's tree on the master: hostile trees built straight into a
real git repository (raw tree objects, so symlinks, duplicate names and entry
order are the attacker's) must never write outside the export folder.
"""

import os
import pathlib
import stat
import subprocess

import git
import pytest

import _release_source as source

LINK, TREE, FILE, EXEC = "120000", "40000", "100644", "100755"


def _git(repo, *args, data=None):
    done = subprocess.run(["git", "-C", repo, *args], input=data, capture_output=True, check=True)
    return done.stdout.decode().strip()


def _blob(repo, content):
    return _git(repo, "hash-object", "-w", "--stdin", data=content.encode())


def _tree(repo, entries):
    """A raw tree object from (mode, name, sha) in the given order, duplicates allowed."""
    raw = b"".join(f"{mode} {name}".encode() + b"\0" + bytes.fromhex(sha) for mode, name, sha in entries)
    return _git(repo, "hash-object", "-w", "-t", "tree", "--literally", "--stdin", data=raw)


def _commit(repo, tree):
    env = dict(os.environ, GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@x", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@x")
    return subprocess.run(["git", "-C", repo, "commit-tree", tree, "-m", "hostile"], env=env,
                          capture_output=True, check=True).stdout.decode().strip()


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


def _cve_2025_4517_tree(repo, dest, canary):
    """
    The published CVE-2025-4517 shape as a git tree: a chain of symlinks
    whose expansion exceeds PATH_MAX (so ``os.path.realpath`` stops resolving
    and the ``data`` filter believes the path stays inside), then a repeated
    name: ``escape`` as a symlink through that chain, and ``escape`` as a
    tree whose files land wherever the link points.
    """
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - len(dest) - 1) // (len(steps) + 1))
    empty = _blob(repo, "x")
    # innermost: p/lll -> ../ * 16 (points back at dest); wrap trees letter by letter
    chain = _tree(repo, [(LINK, "l" * 254, _blob(repo, os.path.join(*[".."] * len(steps))))])
    for letter in reversed(steps[1:]):
        chain = _tree(repo, [(TREE, letter, chain)])
    # real dirs ddd/ddd/... each holding the next letter as a symlink to ddd
    nested = _tree(repo, [(FILE, "keep", empty)])
    for letter in reversed(steps[1:]):
        nested = _tree(repo, [(TREE, component, nested), (LINK, letter, _blob(repo, component))])
    up = len([p for p in dest.split(os.sep) if p])
    target = os.path.join(*steps, "l" * 254, *[".."] * up, str(canary).lstrip("/"))
    escape = _tree(repo, [(FILE, "flag", _blob(repo, "pwned")), (FILE, "newfile", _blob(repo, "new"))])
    return _tree(repo, [
        (TREE, component, nested), (LINK, "a", _blob(repo, component)), (TREE, "a", chain),
        (LINK, "escape", _blob(repo, target)), (TREE, "escape", escape),
    ])


def _assert_canary_untouched(canary):
    assert (canary / "flag").read_text() == "original"
    assert sorted(os.listdir(canary)) == ["flag"]


def test_cve_2025_4517_tree_writes_nothing_outside(repo, tmp_path, canary):
    dest = str(tmp_path / "builds" / ("b" * 32))
    os.makedirs(os.path.dirname(dest))
    commit = _commit(repo, _cve_2025_4517_tree(repo, dest, canary))
    with pytest.raises(source.SourceError, match="refused export.*appears twice"):
        source.export(git.Repo(repo), commit, dest)
    _assert_canary_untouched(canary)
    assert os.listdir(tmp_path / "builds") == []


@pytest.mark.parametrize("target", ["../../outside", "/", "/etc", "sub/../../x", "../../outside/flag"])
@pytest.mark.parametrize("repeated", [True, False])
def test_a_link_leaving_the_tree_is_refused_and_the_tree_removed(repo, tmp_path, canary, target, repeated):
    files = _tree(repo, [(FILE, "flag", _blob(repo, "pwned"))])
    entries = [(FILE, "README", _blob(repo, "hi")), (LINK, "out", _blob(repo, target))]
    tree = _tree(repo, entries + ([(TREE, "out", files)] if repeated else []))
    dest = str(tmp_path / "builds" / "t")
    os.makedirs(os.path.dirname(dest))
    why = "appears twice" if repeated else "links to .*, outside the tree"
    with pytest.raises(source.SourceError, match=f"refused export: 'out' {why}"):
        source.export(git.Repo(repo), _commit(repo, tree), dest)
    _assert_canary_untouched(canary)
    assert not os.path.exists(dest)


def test_links_inside_the_tree_and_modes_survive(repo, tmp_path):
    sub = _tree(repo, [(EXEC, "run.sh", _blob(repo, "#!/bin/sh\n")), (LINK, "up", _blob(repo, "../README"))])
    tree = _tree(repo, [(FILE, "README", _blob(repo, "hi")), (LINK, "link", _blob(repo, "README")),
                        (TREE, "sub", sub)])
    dest = str(tmp_path / "t")
    source.export(git.Repo(repo), _commit(repo, tree), dest)
    assert pathlib.Path(dest, "sub", "up").read_text() == "hi"
    assert os.readlink(os.path.join(dest, "link")) == "README"
    assert stat.S_IMODE(os.stat(os.path.join(dest, "sub", "run.sh")).st_mode) & 0o7022 == 0
    assert os.access(os.path.join(dest, "sub", "run.sh"), os.X_OK)
    assert not os.path.exists(os.path.join(dest, ".git"))
    assert pathlib.Path(dest, "README").read_text() == "hi"
