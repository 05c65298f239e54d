"""
Master side: turn an exported tree into a staged, checksummed release tarball.

build and checks run in the exported tree; the tarball holds the tree plus
the ``RELEASE.json`` manifest and is staged under
``<artifact_root>/<project>/<name>.tar.gz``, which the master's fileserver
serves as ``salt://<path of artifact_root in file_roots>/<project>/<name>.tar.gz``.
"""

import collections
import contextlib
import io
import json
import os
import stat
import tarfile
import time

import _release_sandbox as sandbox
import release_contract as contract
import release_delta as delta

OUTPUT_TAIL_LINES = 20


class ArtifactError(Exception):
    """A build, check or packaging step that failed; ``tail`` holds the output's end."""

    def __init__(self, message, tail=""):
        super().__init__(message)
        self.tail = tail


def run_commands(commands, cwd, what, timeout_s, jail=None):
    """
    Run each shell command in ``cwd`` under ``jail`` (default: the dedicated
    build user, bubblewrap when installed; see ``_release_sandbox``); the
    first non-zero exit or timeout aborts with the tail of its output.
    Returns the tail of the combined output. The tree belongs to the build
    user only while the commands run.
    """
    jail = jail or sandbox.Jail()
    try:
        sandbox.hand_over(cwd, sandbox.build_account(jail.user))
    except sandbox.SandboxError as exc:
        raise ArtifactError(f"{what}: {exc}")
    try:
        return _run_each(commands, cwd, what, timeout_s, jail)
    finally:
        sandbox.take_back(cwd)


def _run_each(commands, cwd, what, timeout_s, jail):
    tail = []
    for command in commands or []:
        try:
            code, output, note = sandbox.run(jail, command, cwd, timeout_s)
        except sandbox.SandboxError as exc:
            raise ArtifactError(f"{what}: {exc}")
        tail = (tail + output.splitlines() + ([f"[{note}]"] if note else []))[-OUTPUT_TAIL_LINES:]
        if code is None:
            raise ArtifactError(f"{what} command {command!r} ran over {timeout_s} s", "\n".join(tail))
        if code != 0:
            raise ArtifactError(f"{what} command {command!r} exited {code}", "\n".join(tail))
    return "\n".join(tail)


def package(tree, manifest_doc, dest):
    """
    Write ``dest`` (.tar.gz) from ``tree`` plus the manifest, in a stable
    order with neutral owners; returns ``(sha256, manifest)`` where the
    manifest now carries ``file_count``.
    """
    entries = _entries_in(tree)
    manifest_doc = dict(
        manifest_doc,
        file_count=sum(1 for rel in entries if not _is_real_dir(os.path.join(tree, rel))),
    )
    _write_tar(tree, entries, [_manifest_member(manifest_doc)], dest)
    return contract.sha256_file(dest), manifest_doc


def write_delta(tree, manifest_doc, new, base, base_name, dest):
    """
    Write to ``dest`` the delta of the release packaged from ``tree`` (its
    manifest ``manifest_doc``, its file list ``new``) against release
    ``base_name`` (file list ``base``): straight from the tree, so the full
    artifact is never read back. Returns ``{"unchanged": n, "sent": n}``, or
    None when a delta would not pay.
    """
    unchanged = delta.unchanged_files(new, base)
    if unchanged is None:
        return None
    entries = [rel for rel in _entries_in(tree) if rel not in unchanged]
    _write_tar(tree, entries, [_manifest_member(manifest_doc), delta.manifest_member(base_name, unchanged)], dest)
    return {"unchanged": len(unchanged), "sent": len(entries) + 1}


def _write_tar(tree, entries, extra, dest):
    """``entries`` of ``tree`` with neutral owners, then each ``(TarInfo, bytes)`` of ``extra``; atomic."""
    tmp = f"{dest}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tarfile.open(tmp, "w:gz", compresslevel=delta.COMPRESSLEVEL) as tar:
        for rel in entries:
            tar.add(os.path.join(tree, rel), arcname=rel, recursive=False, filter=_neutral)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest)


def _manifest_member(doc):
    """RELEASE.json: the same bytes in the artifact and in its delta."""
    data = json.dumps(doc, indent=2, sort_keys=True).encode()
    info = tarfile.TarInfo(contract.MANIFEST_NAME)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    return info, data


def salt_url(artifact_root, file_roots, project, name):
    """The salt:// URL of a staged artifact; artifact_root must sit inside a base file_roots dir."""
    root = os.path.realpath(artifact_root)
    for base in file_roots:
        base = os.path.realpath(base)
        if root == base or root.startswith(base + os.sep):
            rel = os.path.relpath(root, base)
            parts = [] if rel == "." else rel.split(os.sep)
            return "salt://" + "/".join(parts + [project, f"{name}.tar.gz"])
    raise ArtifactError(
        f"artifact_root {artifact_root} is not inside any base file_roots directory "
        f"({', '.join(file_roots) or 'none configured'}): minions could not fetch it"
    )


def stage_delta(tarball, tree, manifest_doc, currents, url_of):
    """
    Stage ``<name>.delta.tar.gz`` of the release packaged from ``tree`` (its
    manifest ``manifest_doc``) beside its staged ``tarball``, against the
    release most nodes run (``currents``: minion -> release or None); nodes
    fetch it from ``url_of("<name>.delta")``, the URL scheme of the full
    artifact's (``url_of(name)``: salt:// or the HTTP artifact base). Returns
    the install kwargs that offer it (``delta_source``, ``delta_hash``,
    ``base``) and a line saying what was done; no offer when no delta pays.
    Also leaves ``<name>.files.json`` (each file's sha256, mode, size) for the
    next release's delta, so no artifact has to be read back.
    """
    name, folder = manifest_doc["name"], os.path.dirname(tarball)
    dest, files = delta.side_files(folder, name)
    new = file_list(tree)
    if new is not None:
        _write_json(files, new)
    running = collections.Counter(r for r in currents.values() if r and r != name)
    if not running:
        return {}, "no delta: no node runs an earlier release"
    base = running.most_common(1)[0][0]
    try:
        built = write_delta(tree, manifest_doc, new, _base_files(folder, base), base, dest)
    except (OSError, EOFError, ValueError, tarfile.TarError) as exc:  # a damaged base: send the full artifact
        built, why = None, f"could not build it ({exc})"
    else:
        why = "its artifact is gone, or the delta would not pay"
    if built is None:
        return {}, f"no delta against {base}: {why}"
    os.chmod(dest, 0o640)
    offer = {
        "delta_source": url_of(f"{name}.delta"),
        "delta_hash": contract.sha256_file(dest),
        "base": base,
    }
    size, full = os.path.getsize(dest), os.path.getsize(tarball)
    return offer, (f"delta against {base}: {built['sent']} entries sent, {built['unchanged']} carried over "
                   f"({size} of {full} bytes, {100.0 * size / full:.1f}%)")


def file_list(tree):
    """
    ``{path: (sha256, mode, size)}`` of the regular files ``package`` puts in
    the tarball; None when the tree has hard links (the tarball then holds
    link members whose target a delta could leave out).
    """
    found = {}
    for rel in _entries_in(tree):
        info = os.lstat(os.path.join(tree, rel))
        if stat.S_ISREG(info.st_mode):
            if info.st_nlink > 1:
                return None
            found[rel] = (contract.sha256_file(os.path.join(tree, rel)), stat.S_IMODE(info.st_mode), info.st_size)
    return found


def _base_files(folder, base):
    """The base release's file list: its side file, else read back from its artifact (None without one)."""
    try:
        with open(delta.side_files(folder, base)[1], encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        tarball = os.path.join(folder, f"{base}.tar.gz")
        return delta.member_digests(tarball) if os.path.isfile(tarball) else None


def _write_json(path, doc):
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # one a dead run of this pid left
    # 0640 like every published file: only the master's fileserver (root) reads it.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640), "w") as handle:
        json.dump(doc, handle, sort_keys=True)
    os.replace(tmp, path)


def _entries_in(tree):
    """Every path below ``tree`` (folders too, links not followed), sorted; no .git."""
    found = []
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if d != ".git"]
        found.extend(os.path.relpath(os.path.join(root, name), tree) for name in dirs + files)
    return sorted(found)


def _is_real_dir(path):
    return os.path.isdir(path) and not os.path.islink(path)


def _neutral(info):
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
