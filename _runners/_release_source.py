"""
Master side: get a ref's tree out of git.

One bare mirror per project under ``<state_dir>/git``, updated with GitPython.
User text (the ref) never reaches git as an argument of its own: it is
validated strictly, then only used inside fully qualified names such as
``refs/heads/<ref>``, which cannot be read as an option.
"""

import io
import os
import re
import subprocess
import tarfile

import git

REF_CHARS = re.compile(r"^[A-Za-z0-9._/-]+$")
COMMIT_ID = re.compile(r"^[0-9a-fA-F]{7,40}$")


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
    Resolve a validated ref to ``(commit, branch)``: a branch first, then a
    tag, then a commit id; ``branch`` is ``detached`` for a bare commit.
    """
    for qualified in (f"refs/heads/{ref}", f"refs/tags/{ref}"):
        commit = _commit_of(repo, qualified)
        if commit:
            return commit, ref
    if COMMIT_ID.match(ref):
        commit = _commit_of(repo, ref.lower())
        if commit:
            return commit, "detached"
    raise SourceError(f"ref {ref!r} is not a branch, tag or commit of the repository")


def describe(repo, commit):
    """``git describe --tags --always`` of the commit: the release's version."""
    return repo.git.describe("--tags", "--always", commit)


def export(repo, commit, dest):
    """Write the tree at ``commit`` into ``dest`` (no .git), refusing links that leave it."""
    stream = io.BytesIO()
    repo.archive(stream, treeish=commit, format="tar")
    stream.seek(0)
    os.makedirs(dest)
    try:
        with tarfile.open(fileobj=stream) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.TarError as exc:
        raise SourceError(f"commit {commit[:12]} holds a path that may not be exported: {exc}")


def _commit_of(repo, name):
    try:
        return repo.git.rev_parse("--verify", "--quiet", f"{name}^{{commit}}")
    except git.GitCommandError:
        return None


def _last_line(text):
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "git failed"
