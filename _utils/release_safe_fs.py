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
