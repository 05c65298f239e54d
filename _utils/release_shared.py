"""
Shared paths of a release (``shared: [data, .env]`` in the project's pillar):
each one a link from the release into ``deploy_to/shared/``, seeded from the
release's own content the first time, never overwritten after.

Standard library and Salt only (minions get it by sync).
"""

import contextlib
import logging
import os
import shutil
import stat

from salt.exceptions import CommandExecutionError

import release_node as node
import release_safe_fs as safe_fs

log = logging.getLogger(__name__)


def link_shared(release_dir, paths, settings):
    """
    Replace each shared path in the release by a link into shared/. A shared
    path that does not exist yet is seeded from the release's own content
    there (see :func:`seed_shared`); one that exists is never touched.
    """
    uid, gid = node.app_ids(settings.get("user"))
    shared = sorted((p.strip("/") for p in settings["shared"]), key=lambda p: p.count("/"))  # parents seed first
    for rel in shared:
        seed_shared(release_dir, paths["shared"], rel, uid, gid)
        if any(rel.startswith(other + "/") for other in shared):
            continue  # already shared through its parent's link: nothing of it is left in the release
        in_release = os.path.join(release_dir, rel)
        if os.path.islink(in_release) or os.path.isfile(in_release):
            os.unlink(in_release)
        elif os.path.isdir(in_release):
            shutil.rmtree(in_release)
        os.makedirs(os.path.dirname(in_release), mode=0o755, exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(paths["shared"], rel), os.path.dirname(in_release)), in_release)


def seed_shared(release_dir, shared_root, rel, uid, gid):
    """
    Create shared/<rel> when it does not exist: a copy of the release's
    folder or file at ``rel`` (plain files and folders only, never through a
    link), else an empty folder, owned by the app user. The copy is made
    under a temporary name and moved in only if the path is still free, so
    an interrupted seed is never taken for the real one. Returns True when
    it seeded something.
    """
    parent_rel, name = os.path.split(rel.strip("/"))
    # The app user owns shared/ folders: a link planted there must not carry root's mkdir/chown out.
    fd, _ = safe_fs.make_dirs(shared_root, parent_rel)
    try:
        try:
            found = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            found = None
        if found is not None:
            if stat.S_ISLNK(found.st_mode):
                raise CommandExecutionError(
                    f"shared/{rel} is a link, not a plain directory or file: refusing to go through it")
            return False
        tmp = f".{name}.seed-{os.getpid()}"
        _discard(fd, tmp)  # a leftover of an interrupted seed
        if not safe_fs.seed(release_dir, rel, fd, tmp, uid, gid):
            os.mkdir(name, 0o755, dir_fd=fd)
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
            return False
        _move_in(fd, tmp, name)
        return True
    finally:
        os.close(fd)


def _move_in(dir_fd, tmp, name):
    """Rename ``tmp`` to ``name`` unless ``name`` appeared meanwhile (then ``tmp`` goes, theirs stays)."""
    try:
        if stat.S_ISDIR(os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # fails over a non-empty folder
        else:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)  # fails if it exists
    except OSError as exc:
        log.warning("release: shared %s appeared while it was seeded, kept it: %s", name, exc)
    _discard(dir_fd, tmp)


def _discard(dir_fd, name):
    with contextlib.suppress(FileNotFoundError):
        safe_fs.remove(dir_fd, name)
