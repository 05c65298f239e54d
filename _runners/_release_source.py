"""
Master side: get a ref's tree out of git.

One bare mirror per project under ``<state_dir>/git``, updated with GitPython.
User text (the ref) never reaches git as an argument of its own: it is
validated strictly, then only used inside fully qualified names such as
``refs/heads/<ref>``, which cannot be read as an option.
"""

import os
import re
import shutil
import stat
import subprocess
import tempfile

import git

REF_CHARS = re.compile(r"^[A-Za-z0-9._/-]+$")
COMMIT_ID = re.compile(r"^[0-9a-fA-F]{7,40}$")
QUALIFIED = ("refs/heads/", "refs/tags/")
# setuid, setgid, sticky, group write, other write
SAFE_MODE_STRIP = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH


class SourceError(Exception):
    """A ref that cannot or may not be deployed."""


def validate_ref(ref):
    """
    Refuse anything but a plain branch, tag or commit name: characters outside
    ``[A-Za-z0-9._/-]``, a leading ``-`` and whatever ``git check-ref-format``
    rejects (``a..b``, ``x.lock``, ``//``...).
    """
    ref = str(ref or "")
    if not ref:
        raise SourceError("no ref given: pass ref=<branch|tag|commit>")
    if ref.startswith("-") or not REF_CHARS.match(ref):
        raise SourceError(
            f"refused ref {ref!r}: a ref may hold only [A-Za-z0-9._/-] and may not start with '-'"
        )
    # The leading '-' is already refused, so the ref cannot be taken for an option here.
    checked = subprocess.run(
        ["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True, check=False
    )
    if checked.returncode != 0:
        raise SourceError(f"refused ref {ref!r}: git check-ref-format rejects it")
    return ref


def mirror(state_dir, project):
    """The project's bare mirror under ``<state_dir>/git``, created empty when missing."""
    path = os.path.join(state_dir, "git", f"{project}.git")
    return git.Repo(path) if os.path.isdir(path) else git.Repo.init(path, bare=True, mkdir=True)


def update_mirror(state_dir, project, url):
    """Create or refresh the project's bare mirror; returns the GitPython repo."""
    repo = mirror(state_dir, project)
    try:
        repo.git.fetch(
            "--prune", "--force", "--end-of-options", url,
            "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*",
        )
    except git.GitCommandError as exc:
        raise SourceError(f"could not fetch {url}: {_last_line(exc.stderr)}")
    return repo


def resolve(repo, ref):
    """
    Resolve a validated ref to ``(commit, short, full_ref)``: ``refs/heads/x``
    and ``refs/tags/x`` name exactly one ref; a bare name must be a branch or
    a tag but not both (then the caller must say which); else a commit id,
    full or abbreviated. ``short`` is the branch or tag name (``detached``
    for a commit), ``full_ref`` what was deployed (the commit for a commit).
    """
    if ref.startswith("refs/"):
        if not ref.startswith(QUALIFIED):
            raise SourceError(f"ref {ref!r}: only refs/heads/<branch> and refs/tags/<tag> may be deployed")
        return _exact(repo, ref, ref.split("/", 2)[2])
    found = [qualified for qualified in (f"refs/heads/{ref}", f"refs/tags/{ref}") if _commit_of(repo, qualified)]
    if len(found) == 2:
        raise SourceError(f"ref {ref!r} is both a branch and a tag: pass {found[0]} or {found[1]}")
    if found:
        return _exact(repo, found[0], ref)
    commit = _commit_of(repo, ref.lower()) if COMMIT_ID.match(ref) else None
    if commit and commit.startswith(ref.lower()):
        return commit, "detached", commit
    raise SourceError(f"ref {ref!r} is not a branch, tag or commit of the repository")


def _exact(repo, qualified, short):
    commit = _commit_of(repo, qualified)
    if not commit:
        raise SourceError(f"ref {qualified!r} is not in the repository")
    return commit, short, qualified


def describe(repo, commit):
    """``git describe --tags --always`` of the commit: the release's version."""
    return repo.git.describe("--tags", "--always", commit)


def export(repo, commit, dest):
    """
    Write the tree at ``commit`` into the new folder ``dest`` (no .git) with
    git's own checkout, never through tar: git refuses to write through a
    symlink it has checked out, so a tree shaped to escape (CVE-2025-4517:
    a link chain plus a repeated name) cannot. Then every link must stay
    inside, only files, folders and links may exist, and no mode keeps
    setuid/setgid/sticky or group/other write. Any breach: ``dest`` is removed.
    """
    os.makedirs(dest, mode=0o700)
    try:
        _refuse_repeated_names(repo, commit)
        _checkout(repo, commit, dest)
        _screen_tree(dest)
    except SourceError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise SourceError(f"commit {commit[:12]}: refused export: {exc}")


def _checkout(repo, commit, dest):
    """``git read-tree`` + ``checkout-index`` into ``dest`` with a throwaway index; never touches the mirror's."""
    with tempfile.TemporaryDirectory(prefix="release-index-") as scratch:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(scratch, "index"))
        for args in (["read-tree", "--end-of-options", commit],
                     ["--work-tree", dest, "checkout-index", "--all", "--force"]):
            done = subprocess.run(["git", "--git-dir", repo.git_dir, *args], env=env, cwd=scratch,
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SourceError(f"git {args[0] if args[0] != '--work-tree' else 'checkout-index'} "
                                  f"failed: {_last_line(done.stderr)}")


def _refuse_repeated_names(repo, commit):
    """
    A path twice in one tree (a link and a folder both named ``x``) is what
    ``git fsck`` calls duplicateEntries: never made by git itself, only by
    hand, to have one entry written through the other. Refuse it outright.
    """
    listing = repo.git.ls_tree("-r", "-t", "-z", "--full-tree", "--end-of-options", commit)
    seen = set()
    for entry in filter(None, listing.split("\0")):
        path = entry.split("\t", 1)[1]
        if path in seen:
            raise SourceError(f"{path!r} appears twice in the tree (a crafted commit)")
        seen.add(path)


def _screen_tree(dest):
    """Refuse links leaving ``dest`` and anything but files, folders and links; strip risky mode bits."""
    top = os.path.realpath(dest)
    for root, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, dest)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                target = os.path.realpath(path)
                if target != top and not target.startswith(top + os.sep):
                    raise SourceError(f"{rel!r} links to {os.readlink(path)!r}, outside the tree")
            elif stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                os.chmod(path, stat.S_IMODE(info.st_mode) & ~SAFE_MODE_STRIP, follow_symlinks=False)
            else:
                raise SourceError(f"{rel!r} is not a file, folder or link")


def ref_object(repo, full_ref):
    """The object ``full_ref`` names, unpeeled: an annotated tag's own id (what a tag push's ``after`` is)."""
    try:
        return repo.git.rev_parse("--verify", "--quiet", full_ref)
    except git.GitCommandError:
        return None


def _commit_of(repo, name):
    try:
        return repo.git.rev_parse("--verify", "--quiet", f"{name}^{{commit}}")
    except git.GitCommandError:
        return None


def _last_line(text):
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "git failed"
