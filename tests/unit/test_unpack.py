"""
The one safe extractor (``release_unpack``) against hostile tarballs built in
memory: the published CVE-2025-4517 and CVE-2024-12718 shapes and the classic
escapes. Each case checks the disk, not only the exception.
"""

import io
import os
import stat
import tarfile

import pytest

import release_unpack as unpack


def member(name, data=None, kind=tarfile.REGTYPE, link="", mode=0o644, mtime=1_700_000_000):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, mtime
    if data is not None:
        info.size = len(data)
    return info, io.BytesIO(data) if data is not None else None


def archive(tmp_path, members, name="a.tar"):
    path = str(tmp_path / name)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return path


@pytest.fixture
def layout(tmp_path):
    """outer/ holds a root-owned-looking 'flag' beside the (not yet created) target outer/dest."""
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "flag").write_text("original")
    os.utime(outer / "flag", (1000, 1000))
    os.chmod(outer / "flag", 0o600)
    return outer, str(outer / "dest")


def realpath_limit_attack(dest):
    """
    CVE-2025-4517 as CPython's test_realpath_limit_attack builds it: a chain of
    directories and symlinks whose expansion overflows PATH_MAX, so realpath()
    stops resolving and the filter sees a harmless path; then a repeated name
    turns a hardlink to outside into a writable file.
    """
    steps = "abcdefghijklmnop"
    max_path = os.pathconf(os.path.dirname(dest), "PC_PATH_MAX")
    component = "d" * ((max_path - len(dest) - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members.append(member(os.path.join(path, component), kind=tarfile.DIRTYPE, mode=0o777))
        members.append(member(os.path.join(path, step), kind=tarfile.SYMTYPE, link=component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(member(linkpath, kind=tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps))))
    members.append(member("escape", kind=tarfile.SYMTYPE, link=os.path.join(linkpath, "..")))
    members.append(member("flaglink", kind=tarfile.LNKTYPE, link=os.path.join("escape", "flag")))
    members.append(member("flaglink", b"overwrite"))
    members.append(member("escape/newfile", b"new"))
    return members


def assert_outside_untouched(outer):
    assert (outer / "flag").read_text() == "original"
    assert os.stat(outer / "flag").st_mtime == 1000
    assert stat.S_IMODE(os.stat(outer / "flag").st_mode) == 0o600
    assert sorted(os.listdir(outer)) == ["flag"], "the target must be removed and nothing added beside it"


def test_tarfile_data_filter_on_this_python_lets_cve_2025_4517_escape(tmp_path, layout):
    """Why the project does not rely on the filter: on a vulnerable Python it writes outside."""
    outer, dest = layout
    path = archive(tmp_path, realpath_limit_attack(dest))
    os.mkdir(dest)
    try:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError):
        pytest.skip("this Python's tarfile refuses CVE-2025-4517 (patched)")
    assert (outer / "flag").read_text() == "overwrite" or (outer / "newfile").exists()


def test_cve_2025_4517_is_refused(tmp_path, layout):
    outer, dest = layout
    with pytest.raises(unpack.UnsafeArchive):
        unpack.extract(archive(tmp_path, realpath_limit_attack(dest)), dest)
    assert_outside_untouched(outer)


def test_cve_2024_12718_metadata_outside_through_a_link_is_refused(tmp_path, layout):
    """A link to outside, then a directory member of the same name: tarfile would utime/chmod outside."""
    outer, dest = layout
    members = [
        member("x", kind=tarfile.SYMTYPE, link="."),
        member("x/y", kind=tarfile.SYMTYPE, link=".."),   # resolves to outer/ through the chain
        member("y", kind=tarfile.DIRTYPE, mode=0o777, mtime=1),
        member("y/flag", b"pwned", mode=0o4777),
    ]
    with pytest.raises(unpack.UnsafeArchive):
        unpack.extract(archive(tmp_path, members), dest)
    assert_outside_untouched(outer)
    assert stat.S_IMODE(os.stat(outer).st_mode) != 0o777


@pytest.mark.parametrize("label, members, message", [
    ("dotdot", [member("../flag", b"x")], "'..'"),
    ("deep dotdot", [member("a/b/../../../flag", b"x")], "'..'"),
    ("absolute", [member("/tmp/abs-unpack-test", b"x")], "absolute"),
    ("outside symlink", [member("out", kind=tarfile.SYMTYPE, link="..")], "outside"),
    ("absolute symlink", [member("out", kind=tarfile.SYMTYPE, link="/etc")], "absolute"),
    ("symlink chain", [member("a", kind=tarfile.SYMTYPE, link="."),
                       member("b", kind=tarfile.SYMTYPE, link="a/a/a/..")], "outside"),
    ("link made outside by a later link", [
        member("d1/d2/x", b"x"),
        member("a", kind=tarfile.SYMTYPE, link="d1/d2/b/../../.."),
        member("d1/d2/b", kind=tarfile.SYMTYPE, link="../.."),
    ], "outside"),
    ("write through own link", [member("in", kind=tarfile.DIRTYPE), member("l", kind=tarfile.SYMTYPE, link="in"),
                                member("l/f", b"x")], "through the link"),
    ("duplicate", [member("f", b"a"), member("f", b"b")], "more than once"),
    ("hardlink to outside", [member("h", kind=tarfile.LNKTYPE, link="../flag")], "'..'"),
    ("hardlink to absolute", [member("h", kind=tarfile.LNKTYPE, link="/etc/hostname")], "absolute"),
    ("hardlink to a link", [member("l", kind=tarfile.SYMTYPE, link="."),
                            member("h", kind=tarfile.LNKTYPE, link="l")], "regular file"),
    ("hardlink to missing", [member("h", kind=tarfile.LNKTYPE, link="nope")], "regular file"),
    ("character device", [member("null", kind=tarfile.CHRTYPE)], "device"),
    ("block device", [member("sda", kind=tarfile.BLKTYPE)], "device"),
    ("fifo", [member("pipe", kind=tarfile.FIFOTYPE)], "fifo"),
])
def test_classic_escapes_are_refused(tmp_path, layout, label, members, message):
    outer, dest = layout
    with pytest.raises(unpack.UnsafeArchive, match=message) as caught:
        unpack.extract(archive(tmp_path, members), dest)
    assert "member" in str(caught.value), label
    assert_outside_untouched(outer)
    assert not os.path.exists("/tmp/abs-unpack-test")


def test_the_target_must_be_fresh(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(unpack.UnsafeArchive, match="fresh"):
        unpack.extract(archive(tmp_path, [member("f", b"x")]), str(dest))
    assert os.listdir(dest) == []


def test_a_good_tree_comes_out_whole_with_safe_modes(tmp_path):
    members = [
        member("./", kind=tarfile.DIRTYPE, mode=0o777),
        member("bin/run", b"#!/bin/sh\n", mode=0o4775),
        member("public/index.html", b"hi", mode=0o666),
        member("public", kind=tarfile.DIRTYPE, mode=0o777),
        member("web", kind=tarfile.SYMTYPE, link="public"),
        member("public/again.html", kind=tarfile.LNKTYPE, link="public/index.html"),
        member("dangling", kind=tarfile.SYMTYPE, link="public/later/x"),
    ]
    dest = str(tmp_path / "dest")
    assert unpack.extract(archive(tmp_path, members), dest) == 6
    with open(os.path.join(dest, "web/index.html")) as served:
        assert served.read() == "hi"
    assert stat.S_IMODE(os.stat(os.path.join(dest, "bin/run")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(dest, "public/index.html")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(dest, "public")).st_mode) == 0o755
    assert os.stat(os.path.join(dest, "public/index.html")).st_mtime == 1_700_000_000
    assert os.path.samefile(os.path.join(dest, "public/again.html"), os.path.join(dest, "public/index.html"))
    assert os.readlink(os.path.join(dest, "dangling")) == "public/later/x"


def test_skip_and_stream(tmp_path):
    path = archive(tmp_path, [member("keep", b"k"), member("skip.json", b"s")])
    dest = str(tmp_path / "dest")
    with open(path, "rb") as stream:
        unpack.extract(stream, dest, skip=("skip.json",))
    assert os.listdir(dest) == ["keep"]


@pytest.mark.parametrize("tar_mode, installed", [(0o644, 0o644), (0o755, 0o755), (0o4777, 0o755),
                                                 (0o400, 0o600), (0o611, 0o600), (0o777, 0o755)])
def test_file_mode(tar_mode, installed):
    assert unpack.file_mode(tar_mode) == installed
