"""Ref validation: user text never becomes a git option or a path trick."""

import _release_source as source
import pytest


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
