"""
The one tar extractor of salt-release: node install, delta, config dry run
(and the master's export). Standard library only.

It does not rely on tarfile's ``data`` filter: on Python before 3.11.13 /
3.12.11 / 3.13.4 the filter is bypassed by a chain of symlinks plus a repeated
name (CVE-2025-4517, CVE-2024-12718, CVE-2025-4138/4330) because it checks
paths with ``os.path.realpath``, which silently stops resolving past PATH_MAX.
Here every member is written by this code, into a fresh directory:

- names are relative, without ``..``, each at most once;
- parent directories are opened one by one from the target's descriptor with
  ``O_NOFOLLOW``, so nothing is ever written through a link, and files are
  created with ``O_EXCL|O_NOFOLLOW``;
- a symlink must resolve inside the tree, resolved against the tree this
  extractor built (chains included), when it is made and again at the end
  (a later link can change where an earlier one leads);
- a hardlink may only point at a regular file already extracted;
- devices and fifos are refused; modes lose setuid/setgid/sticky and
  group/other write (as the ``data`` filter would), directories are 0755.

Any refusal raises :class:`UnsafeArchive` naming the member, after removing
the target.
"""

import os
import shutil
import tarfile

MAX_LINK_HOPS = 40  # as the kernel's MAXSYMLINKS
DIR, FILE, LINK = "dir", "file", "link"


class UnsafeArchive(Exception):
    """The archive tries to leave its target, or holds something a release may not."""


def file_mode(tar_mode):
    """The mode a regular file of ``tar_mode`` gets: no special bits, no group/other write, owner rw."""
    mode = tar_mode & 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def extract(source, dest, skip=()):
    """
    Extract the tar at ``source`` (a path, or a readable stream such as
    ``git archive``'s stdout) into ``dest``, which must not exist yet.
    Members named in ``skip`` are left out. Returns how many members were
    written; on any error ``dest`` is removed and :class:`UnsafeArchive` raised.
    """
    try:
        os.mkdir(dest, 0o700)
    except OSError as exc:
        raise UnsafeArchive(f"the target {dest} must be a fresh path: {exc.strerror}")
    try:
        tree = _Tree(dest)
        try:
            count = tree.fill(source, set(skip))
        finally:
            tree.close()
        os.chmod(dest, 0o755)
        return count
    except (UnsafeArchive, tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, UnsafeArchive):
            raise
        raise UnsafeArchive(f"unreadable archive: {exc}")


def _parts(name, member):
    """A member name (or link target) as its path components, refusing absolute names and '..'."""
    if name.startswith("/"):
        raise UnsafeArchive(f"member {member!r}: absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member {member!r}: path {name!r} contains '..'")
    if "\0" in name:
        raise UnsafeArchive(f"member {member!r}: NUL in its name")
    return tuple(parts)


def _open(source):
    """A tar read from a path (any compression), or read once from a stream."""
    if hasattr(source, "read"):
        return tarfile.open(fileobj=source, mode="r|*")
    return tarfile.open(source)


class _Tree:
    """What has been extracted so far: a model of the tree, kept exact because only we write to it."""

    def __init__(self, dest):
        self.root = os.path.realpath(dest)
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.kinds = {(): DIR}
        self.explicit = set()
        self.links = {}

    def close(self):
        os.close(self.root_fd)

    def fill(self, source, skip):
        count = 0
        with _open(source) as tar:
            for member in tar:
                if member.name in skip:
                    continue
                count += self.add(tar, member)
        for parts in sorted(self.links):
            self._resolve(parts[:-1] + self.links[parts], "/".join(parts))
        return count

    def add(self, tar, member):
        """Write one member; returns 1, or 0 for the tree's own root entry ('./')."""
        parts = _parts(member.name, member.name)
        if not parts:
            return 0
        if parts in self.explicit or (parts in self.kinds and not (member.isdir() and self.kinds[parts] == DIR)):
            raise UnsafeArchive(f"member {member.name!r}: appears more than once")
        if member.ischr() or member.isblk():
            raise UnsafeArchive(f"member {member.name!r}: devices are not allowed")
        if member.isfifo():
            raise UnsafeArchive(f"member {member.name!r}: fifos are not allowed")
        parent_fd = self._parent(parts, member.name)
        try:
            self._write(tar, member, parts, parent_fd)
        finally:
            os.close(parent_fd)
        self.explicit.add(parts)
        return 1

    def _write(self, tar, member, parts, parent_fd):
        name = parts[-1]
        if member.isdir():
            if parts not in self.kinds:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
                self.kinds[parts] = DIR
        elif member.issym():
            self._symlink(member, parts, parent_fd)
        elif member.islnk():
            self._hardlink(member, parts, parent_fd)
        elif member.isreg():
            self._file(tar, member, name, parent_fd)
            self.kinds[parts] = FILE
        else:
            raise UnsafeArchive(f"member {member.name!r}: unsupported type {member.type!r}")
        if member.isdir():
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
            try:
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)

    def _parent(self, parts, member):
        """An open descriptor of the member's parent directory, made as needed, never through a link."""
        real = os.path.realpath(os.path.join(self.root, *parts[:-1]))
        if not (real == self.root or real.startswith(self.root + os.sep)):
            raise UnsafeArchive(f"member {member!r}: its directory resolves outside the target")
        fd = os.dup(self.root_fd)
        for depth in range(1, len(parts)):
            here, name = parts[:depth], parts[depth - 1]
            kind = self.kinds.get(here)
            if kind == LINK:
                os.close(fd)
                raise UnsafeArchive(f"member {member!r}: goes through the link {'/'.join(here)!r}")
            if kind == FILE:
                os.close(fd)
                raise UnsafeArchive(f"member {member!r}: {'/'.join(here)!r} is a file, not a directory")
            try:
                if kind is None:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    self.kinds[here] = DIR
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = inner
        return fd

    def _file(self, tar, member, name, parent_fd):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent_fd)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(tar.extractfile(member), out, 1 << 20)
            out.flush()
            os.fchmod(out.fileno(), file_mode(member.mode))
            os.utime(out.fileno(), (member.mtime, member.mtime))

    def _symlink(self, member, parts, parent_fd):
        target = member.linkname
        if not target:
            raise UnsafeArchive(f"member {member.name!r}: symlink with an empty target")
        if target.startswith("/"):
            raise UnsafeArchive(f"member {member.name!r}: symlink to the absolute path {target!r}")
        relative = tuple(p for p in target.split("/") if p not in ("", "."))
        self._resolve(parts[:-1] + relative, member.name)
        os.symlink(target, parts[-1], dir_fd=parent_fd)
        self.kinds[parts] = LINK
        self.links[parts] = relative

    def _hardlink(self, member, parts, parent_fd):
        source = _parts(member.linkname, member.name)
        if self.kinds.get(source) != FILE:
            raise UnsafeArchive(
                f"member {member.name!r}: a hardlink may only point at a regular file extracted before it, "
                f"not {member.linkname!r}"
            )
        source_fd = self._parent(source, member.name)
        try:
            os.link(source[-1], parts[-1], src_dir_fd=source_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(source_fd)
        self.kinds[parts] = FILE

    def _resolve(self, parts, member, hops=0):
        """
        Where ``parts`` (relative to the root, may hold '..') leads in the
        tree, following its links; raises when that is outside the root.
        Unknown names are taken as they are (a dangling link stays dangling).
        """
        resolved = []
        for part in parts:
            if part == "..":
                if not resolved:
                    raise UnsafeArchive(f"member {member!r}: symlink resolves outside the target")
                resolved.pop()
                continue
            resolved.append(part)
            target = self.links.get(tuple(resolved))
            if target is not None:
                if hops >= MAX_LINK_HOPS:
                    raise UnsafeArchive(f"member {member!r}: too many levels of symlinks")
                resolved = list(self._resolve(tuple(resolved[:-1]) + target, member, hops + 1))
        return tuple(resolved)

