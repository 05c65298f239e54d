"""
Delta artifacts: a redeploy after a small change sends only what changed.

The runner writes, beside a release's full tarball, a delta tarball against
a base release (the one most nodes run), from the same exported tree. The
delta holds every member of the full tarball except the regular files that
are byte- and mode-identical in the base, plus ``DELTA_MANIFEST`` naming the base and listing each left-out
("unchanged") path with its sha256 and tar mode.

A node that has ``releases/<base>`` intact unpacks the delta (with the one
safe extractor, ``release_unpack``) into a fresh folder and hardlinks each
unchanged file from the base after checking its sha256 and mode: the
result is the same tree a full install gives. Any doubt (base missing, a
base file changed, a path that is not a plain file inside the release)
raises ``DeltaRefused`` and the node installs the full artifact.

Both sides import this file, so it stays standard library only.
"""

import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile

import release_contract as contract
import release_unpack as unpack

log = logging.getLogger(__name__)

DELTA_MANIFEST = ".release-delta.json"
# Staged beside <release>.tar.gz: the delta nodes fetch, and the file list the next delta reads.
DELTA_SUFFIX = ".delta.tar.gz"
FILES_SUFFIX = ".files.json"
# gzip level of every artifact and delta the master writes: level 1 costs a fraction of
# level 6's CPU on source text and, on already dense content, makes it barely bigger
# (docs/benchmarks.md); nodes read any level.
COMPRESSLEVEL = 1
# A delta that is not much smaller than the full artifact saves nothing worth its cost.
MAX_DELTA_RATIO = 0.5


class DeltaRefused(Exception):
    """The delta cannot be used here; the caller falls back to the full artifact."""


def side_files(folder, name):
    """The delta and file list staged beside release ``name``'s artifact."""
    return [os.path.join(folder, name + suffix) for suffix in (DELTA_SUFFIX, FILES_SUFFIX)]


def member_digests(tarball):
    """
    ``{path: (sha256, mode, size)}`` of every regular file in a tarball; None
    when the tarball holds hard-link members (a delta could drop their target).
    """
    found = {}
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            if member.islnk():
                return None
            if member.isreg():
                found[member.name] = (_digest(tar.extractfile(member)), member.mode, member.size)
    return found


def unchanged_files(new, base):
    """
    ``{path: {"sha256", "mode"}}`` of the files of release ``new`` that are
    byte- and mode-identical in ``base`` (both ``{path: (sha256, mode,
    size)}``): what a delta leaves out. None when a delta would not pay (no
    file list, or more than MAX_DELTA_RATIO of the bytes changed).
    """
    if base is None or new is None:
        return None
    unchanged = {
        path: {"sha256": digest, "mode": mode}
        for path, (digest, mode, _) in new.items()
        if tuple(base.get(path, ()))[:2] == (digest, mode)
    }
    changed_bytes = sum(size for path, (_, _, size) in new.items() if path not in unchanged)
    if changed_bytes > MAX_DELTA_RATIO * sum(size for _, _, size in new.values()):
        return None
    return unchanged


def manifest_member(base_name, unchanged):
    """The delta's own manifest, ``(TarInfo, bytes)``: its base and each left-out path."""
    doc = json.dumps({"base": base_name, "unchanged": unchanged}, sort_keys=True).encode()
    info = tarfile.TarInfo(DELTA_MANIFEST)
    info.size, info.mode = len(doc), 0o644
    return info, doc


def apply(delta_tarball, base_name, base_dir, dest, skip=()):
    """
    Rebuild a release in the fresh folder ``dest`` from the delta and the
    installed base release ``base_dir``. Paths under ``skip`` (the node's
    shared paths, replaced by links into shared/ afterwards) are not carried.

    Unchanged files are hardlinked: the new release shares their inodes with
    the base. That is safe because release code is root-owned and read-only,
    and nothing writes release files in place (the install only unlinks or
    replaces them); copy instead if you ever add an in-place writer.
    """
    with tarfile.open(delta_tarball, "r:*") as tar:
        doc = _read_manifest(tar, base_name)
    try:
        unpack.extract(delta_tarball, dest, skip=(DELTA_MANIFEST,))
    except unpack.UnsafeArchive as exc:
        raise DeltaRefused(f"delta refused to unpack: {exc}")
    for rel, want in sorted(doc["unchanged"].items()):
        if not _under(rel, skip):
            _carry(base_dir, dest, rel, want)
    return len(doc["unchanged"])


def try_apply(offer, releases_dir, dest, fetch, errors, skip=()):
    """
    Build ``dest`` from the delta ``offer`` (``delta_source``, ``delta_hash``,
    ``base``) and ``releases_dir/<base>``; returns None when it did, else why
    not, with ``dest`` removed so the caller can unpack the full artifact
    there. ``fetch(source, sha256)`` gives the local path of a verified file
    and raises one of ``errors`` when it cannot.
    """
    base = offer.get("base")
    if not (offer.get("delta_source") and offer.get("delta_hash")):
        return "no delta offered"
    if not contract.is_release_name(base) or not os.path.isdir(os.path.join(releases_dir, base)):
        return f"base release {base} is not installed here"
    try:
        apply(fetch(offer["delta_source"], offer["delta_hash"]), base, os.path.join(releases_dir, base), dest, skip)
    except (DeltaRefused, OSError) + tuple(errors) as exc:
        if os.path.isdir(dest):
            shutil.rmtree(dest, ignore_errors=True)
        log.warning("release: delta against %s not used, the full artifact is: %s", base, exc)
        return str(exc)
    return None


def _read_manifest(tar, base_name):
    try:
        doc = json.load(tar.extractfile(DELTA_MANIFEST))
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaRefused(f"the delta has no readable {DELTA_MANIFEST}: {exc}")
    if not isinstance(doc, dict) or doc.get("base") != base_name or not isinstance(doc.get("unchanged"), dict):
        raise DeltaRefused(f"the delta is not against base {base_name}")
    return doc


def _carry(base_dir, dest, rel, want):
    """Hardlink (or copy, across devices) one verified base file into the new release."""
    parts = rel.split("/")
    if os.path.isabs(rel) or ".." in parts or "" in parts:
        raise DeltaRefused(f"unsafe path in the delta manifest: {rel!r}")
    src, dst = os.path.join(base_dir, rel), os.path.join(dest, rel)
    # No link anywhere on the way: a shared/ link in the base would lead to app-writable files.
    if os.path.realpath(src) != os.path.join(os.path.realpath(base_dir), rel):
        raise DeltaRefused(f"{rel} in the base release is reached through a link")
    if os.path.realpath(os.path.dirname(dst)) != os.path.join(os.path.realpath(dest), *parts[:-1]):
        raise DeltaRefused(f"{rel} would land outside the new release")
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise DeltaRefused(f"{rel} is missing from the base release: {exc.strerror}")
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DeltaRefused(f"{rel} in the base release is not a regular file")
        if _digest(handle) != want["sha256"] or stat.S_IMODE(info.st_mode) != installed_mode(want["mode"]):
            raise DeltaRefused(f"{rel} in the base release differs from the artifact (changed on the node?)")
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another filesystem, so copy
            raise DeltaRefused(f"cannot link {rel}: {exc.strerror}")
        _copy(src, dst)


def installed_mode(tar_mode):
    """The mode a regular file of ``tar_mode`` has after the extractor and the install's 0o755 mask."""
    return unpack.file_mode(tar_mode) & 0o755


def _copy(src, dst):
    with open(src, "rb") as reader, open(dst, "xb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            writer.write(block)
    os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode))


def _under(rel, prefixes):
    return any(rel == p.rstrip("/") or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def _digest(handle):
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
