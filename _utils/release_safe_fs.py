"""
Creating and removing files under a directory an unprivileged user owns, as
root, without following a link they may have planted: every step goes
through directory descriptors opened with ``O_NOFOLLOW``.

Standard library and Salt only.
"""

import os
import secrets
import stat

from salt.exceptions import CommandExecutionError


def open_dir(dir_fd, name):
    """Open a directory below ``dir_fd`` without following a link (the app user owns these trees)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CommandExecutionError(f"{name} is not a plain directory, refusing to go through it: {exc}")


def remove(dir_fd, name):
    """rm -rf of one entry, by descriptors: a link is removed, never followed."""
    if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def write_atomically(out, text, tmp=None):
    """
    Write ``text`` to ``out`` through a new temp file beside it: O_EXCL|O_NOFOLLOW,
    so a link or file another user planted at the temp name is refused, never
    followed (the master runs as root; the report or metrics folder may be
    another user's). Readers see the old file or the new one, never a part.
    """
    tmp = tmp or f"{out}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def clean_below(base, parts, names):
    """Remove ``names`` (None: everything) in base/parts...; returns what went."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            inner = open_dir(fd, part)
            os.close(fd)
            fd = inner
            if fd is None:
                return []
        removed = []
        for name in os.listdir(fd) if names is None else names:
            try:
                remove(fd, name)
            except FileNotFoundError:
                continue
            removed.append("/".join(parts + (name,)))
        return removed
    finally:
        if fd is not None:
            os.close(fd)


def make_dirs(base, rel, mode=0o755):
    """
    Open base/rel as a directory, creating the missing parts (owned by the
    caller), never through a link. Returns ``(fd, created)``: the caller
    closes ``fd``; ``created`` says whether the last part was made now.
    """
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    created = False
    try:
        for part in [p for p in rel.split("/") if p not in ("", ".")]:
            try:
                os.mkdir(part, mode, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            inner = open_dir(fd, part)
            os.close(fd)
            fd = inner
            if fd is None:
                raise CommandExecutionError(f"{part} vanished while creating {rel} in {base}")
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return fd, created


def seed(src_root, rel, dst_fd, name, uid, gid):
    """
    Copy what the release holds at ``src_root/rel`` to ``name`` in ``dst_fd``
    (a new shared path), owned by ``uid:gid``: a folder as a folder, a file
    as a file. Only plain files and folders are copied and no link is ever
    followed, on either side: a link in the release, at ``rel``, above it or
    inside it, is left out (the unpack already refused links leading out of
    the release). Returns False when there was nothing to copy (no plain
    file or folder at ``rel``). ``name`` must not exist: it is created with
    O_EXCL / mkdir, never replaced.
    """
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    parent = _open_below(src_root, parts[:-1])
    if parent is None:
        return False
    try:
        found = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISREG(found.st_mode):
            _copy_file(parent, parts[-1], dst_fd, name, uid, gid)
        elif stat.S_ISDIR(found.st_mode):
            _copy_dir(parent, parts[-1], dst_fd, name, uid, gid)
        else:
            return False
    except FileNotFoundError:
        return False
    finally:
        os.close(parent)
    return True


def _open_below(root, parts):
    """A descriptor of root/parts..., None when a part is missing or is not a plain folder."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    for part in parts:
        try:
            inner = open_dir(fd, part)
        except CommandExecutionError:
            inner = None
        os.close(fd)
        if inner is None:
            return None
        fd = inner
    return fd


def _copy_file(src_fd, src_name, dst_fd, name, uid, gid):
    source = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=src_fd)
    try:
        mode = os.fstat(source).st_mode & 0o755 | 0o600
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dst_fd)
        try:
            os.fchown(target, uid, gid)
            while True:
                chunk = os.read(source, 1 << 20)
                if not chunk:
                    break
                os.write(target, chunk)
            os.fchmod(target, mode)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _copy_dir(src_fd, src_name, dst_fd, name, uid, gid):
    source = os.open(src_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src_fd)
    try:
        mode = os.fstat(source).st_mode & 0o755 | 0o700
        os.mkdir(name, 0o700, dir_fd=dst_fd)
        target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dst_fd)
        try:
            os.fchown(target, uid, gid)
            for entry in os.scandir(source):
                if entry.is_dir(follow_symlinks=False):
                    _copy_dir(source, entry.name, target, entry.name, uid, gid)
                elif entry.is_file(follow_symlinks=False):
                    _copy_file(source, entry.name, target, entry.name, uid, gid)
            os.fchmod(target, mode)
        finally:
            os.close(target)
    finally:
        os.close(source)
