"""Ref validation: user text never becomes a git option or a path trick."""

import subprocess

import pytest

import _release_source as source


@pytest.mark.parametrize(
    "ref",
    [
        "--upload-pack=touch${IFS}/tmp/x",
        "--upload-pack=touch /tmp/x",
        "-x",
        "a..b",
        "x.lock",
        "has space",
        "tab\there",
        "semi;colon",
        "dollar$x",
        "back`tick`",
        "new\nline",
        "a//b",
        "trailing/",
        "/leading",
        "dot/.hidden",
        "ref~1",
        "ref^",
        "a:b",
        "",
        None,
    ],
)
def test_refused_refs(ref):
    with pytest.raises(source.SourceError, match="ref"):
        source.validate_ref(ref)


@pytest.mark.parametrize(
    "ref", ["master", "v1.0.0", "release/2.0", "feature/a-b_c", "0123abc", "a" * 40]
)
def test_plain_refs_pass_unchanged(ref):
    assert source.validate_ref(ref) == ref


def test_the_option_refusal_says_why():
    with pytest.raises(source.SourceError, match=r"may not start with '-'"):
        source.validate_ref("--upload-pack=touch${IFS}/tmp/x")
    with pytest.raises(source.SourceError, match="check-ref-format"):
        source.validate_ref("a..b")


# ---------------------------------------------------------------- exact refs (real git)


@pytest.fixture
def clash(tmp_path):
    """A mirror where a branch and a tag are both named v1.1.0, on different commits."""
    origin = str(tmp_path / "origin")

    def git(*args):
        return subprocess.run(["git", "-C", origin, *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    subprocess.run(["git", "init", "-q", "-b", "main", origin], check=True)
    git("-c", "user.name=a", "-c", "user.email=a@x", "commit", "-q", "--allow-empty", "-m", "one")
    git("tag", "-a", "-m", "release", "v1.1.0")
    git("-c", "user.name=a", "-c", "user.email=a@x", "commit", "-q", "--allow-empty", "-m", "two")
    git("branch", "v1.1.0")
    repo = source.update_mirror(str(tmp_path / "state"), "rainbow", origin)
    return repo, git("rev-parse", "refs/tags/v1.1.0^{commit}"), git("rev-parse", "refs/heads/v1.1.0")


def test_a_bare_name_that_is_both_branch_and_tag_is_refused_naming_both(clash):
    repo, _, _ = clash
    with pytest.raises(source.SourceError, match=r"refs/heads/v1\.1\.0.*refs/tags/v1\.1\.0"):
        source.resolve(repo, "v1.1.0")


def test_full_refs_pick_their_own_kind(clash):
    repo, tag_commit, branch_commit = clash
    assert tag_commit != branch_commit
    assert source.resolve(repo, "refs/tags/v1.1.0") == (tag_commit, "v1.1.0", "refs/tags/v1.1.0")
    assert source.resolve(repo, "refs/heads/v1.1.0") == (branch_commit, "v1.1.0", "refs/heads/v1.1.0")


def test_bare_names_and_commits_resolve_to_their_full_ref(clash):
    repo, tag_commit, branch_commit = clash
    assert source.resolve(repo, "main") == (branch_commit, "main", "refs/heads/main")
    assert source.resolve(repo, tag_commit[:10]) == (tag_commit, "detached", tag_commit)
    assert source.resolve(repo, tag_commit) == (tag_commit, "detached", tag_commit)


@pytest.mark.parametrize("ref", ["refs/heads/nope", "refs/tags/nope", "refs/remotes/origin/main",
                                 "refs/notes/x", "nope", "deadbeef00"])
def test_unknown_or_foreign_refs_are_refused(clash, ref):
    with pytest.raises(source.SourceError, match="ref"):
        source.resolve(clash[0], ref)
