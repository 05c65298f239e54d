"""
A release's metadata, kept beside the release and outside every tree a web
server serves::

    deploy_to/
      releases/<name>/          the release's files only
      meta/<name>/              RELEASE.json          the manifest
                                .config.sha256.json   rendered config files and their sha256
                                .artifact.sha256      the artifact the release came from

Why ``deploy_to/meta/`` rather than ``releases/<name>.meta``: ``releases/``
then holds nothing but release trees (listing, delta bases and pruning see
only those), and no web root under ``current`` or ``releases/`` reaches it.

Releases installed by salt-release before this layout kept these files in
their own root: every read falls back to ``releases/<name>/<file>``.

Standard library and Salt only.
"""

import json
import os
import shutil
import time

from salt.exceptions import CommandExecutionError

import release_contract as contract

META_DIR = "meta"
MANIFEST = contract.MANIFEST_NAME
CONFIG_INDEX = ".config.sha256.json"
ARTIFACT_HASH = ".artifact.sha256"
PARTIAL_SUFFIX = ".partial"
# A meta folder without its release, younger than this, may belong to an install running now.
ORPHAN_MIN_AGE_S = 600


def root(deploy_to):
    return os.path.join(deploy_to, META_DIR)


def folder(deploy_to, name):
    return os.path.join(root(deploy_to), name)


def locate(deploy_to, name, filename):
    """Where ``filename`` of release ``name`` is: its meta folder, else the old place in the release root."""
    path = os.path.join(folder(deploy_to, name), filename)
    if os.path.lexists(path):
        return path
    return os.path.join(deploy_to, "releases", name, filename)


def read_text(deploy_to, name, filename):
    """The file's text, stripped; None when it is missing or unreadable."""
    try:
        with open(locate(deploy_to, name, filename), encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


def read_json(deploy_to, name, filename):
    """The file's JSON; {} when it is missing or unreadable."""
    text = read_text(deploy_to, name, filename)
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def begin(deploy_to, name):
    """A fresh ``meta/<name>.partial`` (root's, 0755) for an install to fill; returns its path."""
    partial = folder(deploy_to, name) + PARTIAL_SUFFIX
    os.makedirs(root(deploy_to), mode=0o755, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    os.mkdir(partial, 0o755)
    return partial


def write(meta_dir, filename, text):
    """Write one metadata file (0644), never through a link or into an existing file."""
    path = os.path.join(meta_dir, filename)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o644)
        handle.write(text)


def take_manifest(tree, meta_dir):
    """Move the manifest the artifact carries out of the release tree into its meta folder."""
    try:
        os.rename(os.path.join(tree, MANIFEST), os.path.join(meta_dir, MANIFEST))
    except OSError as exc:
        raise CommandExecutionError(f"could not move {MANIFEST} out of the release: {exc.strerror}") from None


def commit(deploy_to, name):
    """``meta/<name>.partial`` becomes ``meta/<name>`` (a leftover of a removed release is replaced)."""
    final = folder(deploy_to, name)
    remove(deploy_to, [name])
    os.rename(final + PARTIAL_SUFFIX, final)


def remove(deploy_to, names):
    """Remove the meta folders of ``names`` (renamed aside first, like releases)."""
    for name in names:
        path = folder(deploy_to, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        doomed = os.path.join(root(deploy_to), f".{name}.pruning")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def orphans(deploy_to, installed):
    """Meta folders whose release is not installed, old enough not to belong to an install running now."""
    base = root(deploy_to)
    found = []
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        stem = entry[: -len(PARTIAL_SUFFIX)] if entry.endswith(PARTIAL_SUFFIX) else entry
        if (contract.is_release_name(stem) and entry not in installed
                and time.time() - os.lstat(os.path.join(base, entry)).st_mtime > ORPHAN_MIN_AGE_S):
            found.append(entry)
    return found
