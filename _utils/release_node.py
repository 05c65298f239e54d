"""
What every node-side module shares: the project's settings and the node's
cache, the release layout under ``deploy_to``, fetching an artifact with its
sha256 checked, the app user's ids, and building a release tree (from a delta
or the full artifact, through the one safe extractor).

The config dry run (``release_config.check``) builds the tree once into
``deploy_to/.staging/<name>`` beside a record of the artifact's sha256;
``release.install`` of the same name and sha256 moves that tree into place
instead of fetching and unpacking again.

Standard library and Salt only. Loader dunders are passed in (``opts``,
``salt``, ``pillar``): this is a plain module, not a loader module.
"""

import json
import logging
import os
import pwd
import shutil
import stat
import time

from salt.exceptions import CommandExecutionError

import release_contract as contract
import release_delta as delta
import release_meta as meta
import release_unpack as unpack

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
STAGING_DIR = ".staging"
# A .partial or staged tree younger than this may belong to a deploy running now.
PARTIAL_MIN_AGE_S = 600
# deploy_to must lie strictly below these: a release tree there would mix with the system's own files.
SYSTEM_DIRS = frozenset((
    "/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc",
    "/sys", "/run", "/var", "/home", "/root", "/tmp", "/opt", "/srv", "/mnt", "/media",
))


# ---------------------------------------------------------------- settings and cache


def check_project(project):
    if not project or "/" in project or project.startswith("."):
        raise CommandExecutionError(f"bad project name: {project!r}")


def _cache_path(opts, project):
    return os.path.join(opts["cachedir"], "release", f"{project}.json")


def read_cache(opts, project):
    """What this node recorded for the project (settings of the last install, current, history...)."""
    try:
        with open(_cache_path(opts, project), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def remember(opts, project, settings=None, **state):
    """Merge settings and node state (current, previous, fence...) into the cache, atomically."""
    cached = read_cache(opts, project)
    cached.update(settings or {})
    cached.update(state)
    path = _cache_path(opts, project)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(cached, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def project_view(opts, pillar, project):
    """``release:<project>`` from pillar, each key falling back to the cache (the master may be down)."""
    check_project(project)
    found = dict(read_cache(opts, project))
    found.update((pillar.get("release") or {}).get(project) or {})
    return found


def settings(opts, pillar, project):
    """The node's settings of a project: deploy_to, user, shared, keep_releases, stack, webroot."""
    view = project_view(opts, pillar, project)
    deploy_to = view.get("deploy_to")
    if not deploy_to:
        raise CommandExecutionError(
            f"no release:{project}:deploy_to in this node's pillar and no record of an earlier install"
        )
    check_deploy_to(project, deploy_to, view.get("user"))
    shared = view.get("shared") or []
    for path in shared:
        check_relative(path, "shared path")
    webroot = view.get("webroot")
    if webroot:
        check_relative(webroot, f"release:{project}:webroot")
    return {
        "deploy_to": deploy_to, "user": view.get("user"), "shared": list(shared),
        "keep_releases": int(view.get("keep_releases", 5)), "stack": view.get("stack"),
        "webroot": webroot or None,
    }


def check_deploy_to(project, deploy_to, user):
    """
    Refuse a ``deploy_to`` where root's installs would land among system
    files, or whose existing folders the app user could swap for a link.
    """
    key = f"release:{project}:deploy_to"
    if (not isinstance(deploy_to, str) or not os.path.isabs(deploy_to) or deploy_to.startswith("//")
            or os.path.normpath(deploy_to) != deploy_to):
        raise CommandExecutionError(
            f"{key} must be an absolute, normalised path (no '..', '.', '//' or trailing '/'), got {deploy_to!r}"
        )
    if deploy_to in SYSTEM_DIRS:
        raise CommandExecutionError(
            f"{key} is {deploy_to}, a system directory: use a folder below it, such as /srv/www/{project}"
        )
    app_uid = app_ids(user)[0] if user else None
    for prefix in _prefixes(deploy_to):
        problem = _unsafe_component(prefix, app_uid)
        if problem:
            raise CommandExecutionError(f"{key}: {prefix} {problem}; root's installs would follow its links")


def _prefixes(path):
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _unsafe_component(path, app_uid):
    """Why the app user (or anyone) could replace what lies below ``path``, or None."""
    try:
        found = os.lstat(path)
        if stat.S_ISLNK(found.st_mode):
            if app_uid and found.st_uid == app_uid:
                return "is a link owned by the app user"
            found = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if app_uid and found.st_uid == app_uid:
        return "is owned by the app user"
    if found.st_mode & 0o022 and not found.st_mode & stat.S_ISVTX:
        return "is group or other writable without the sticky bit"
    return None


# ---------------------------------------------------------------- secrets


def secret_values(pillar, project):
    """Every leaf string of ``release:<project>:secrets``, longest first, to scrub from messages."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif value is not None and len(str(value)) >= 3:
            found.append(str(value))

    walk(((pillar.get("release") or {}).get(project) or {}).get("secrets") or {})
    return sorted(set(found), key=len, reverse=True)


def scrub(text, values):
    """``text`` with every secret value replaced by ``***``."""
    text = str(text)
    for value in values:
        text = text.replace(value, "***")
    return text


def check_relative(path, what):
    parts = str(path).split("/")
    if not path or os.path.isabs(path) or ".." in parts:
        raise CommandExecutionError(f"{what} must be relative and stay inside the release: {path!r}")


def app_ids(user):
    """(uid, gid) of the app user; the running user's when none is set."""
    if not user:
        return os.getuid(), os.getgid()
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CommandExecutionError(f"app user '{user}' does not exist on this node") from None
    return entry.pw_uid, entry.pw_gid


# ---------------------------------------------------------------- events


def reported(loader, project, env, phase, release, work, summary=None, timed=True):
    """
    Run ``work()``, time it and report the phase on the master's bus, failed
    or not (nothing when masterless). ``loader`` is ``(__opts__, __salt__,
    __pillar__)``; ``summary(result or None)`` gives the event's extra keys;
    ``timed`` adds ``duration_s`` to the result. An error leaves with the
    project's secrets scrubbed, whatever raised it.
    """
    opts, salt, pillar = loader
    summary = summary or (lambda result: {})
    started = time.monotonic()

    def fire(result, error=None):
        data = contract.phase_event(release, error is None, time.monotonic() - started, error, **summary(result))
        problem = contract.send_phase(opts, salt, project, env, phase, data)
        if problem:
            log.warning("release: %s", problem)

    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - whatever raised, its text leaves scrubbed
        text = str(exc) if isinstance(exc, CommandExecutionError) else f"{type(exc).__name__}: {exc}"
        message = scrub(text, secret_values(pillar, project))
        fire(None, error=message)
        raise CommandExecutionError(message) from None
    if timed:
        result["duration_s"] = round(time.monotonic() - started, 3)
    fire(result)
    return result


# ---------------------------------------------------------------- layout


def paths(node_settings):
    root = node_settings["deploy_to"]
    return {
        "root": root,
        "releases": os.path.join(root, "releases"),
        "shared": os.path.join(root, "shared"),
        "current": os.path.join(root, "current"),
        "staging": os.path.join(root, STAGING_DIR),
    }


def ensure_layout(node_settings):
    found = paths(node_settings)
    for key in ("root", "releases", "shared"):
        try:
            os.makedirs(found[key], mode=0o755, exist_ok=True)
        except OSError as exc:
            raise CommandExecutionError(f"cannot create {found[key]}: {exc.strerror}")
        if not os.access(found[key], os.W_OK):
            raise CommandExecutionError(f"{found[key]} is not writable")
    return found


def current_name(paths):
    """The release ``current`` points at, or None."""
    if not os.path.islink(paths["current"]):
        return None
    return os.path.basename(os.readlink(paths["current"]).rstrip("/"))


def release_names(paths):
    try:
        entries = os.listdir(paths["releases"])
    except FileNotFoundError:
        return []
    names = [
        e for e in entries  # an interrupted install's <name>.partial parses as a name too: never a release
        if contract.is_release_name(e) and not e.endswith(PARTIAL_SUFFIX)
        and os.path.isdir(os.path.join(paths["releases"], e))
    ]
    return sorted(names, key=contract.release_sort_key)


def remove_releases(releases_dir, entries):
    """
    Rename each entry out of the release namespace first, then delete it: a
    half-deleted folder is never taken for a release. An entry that cannot be
    renamed is kept. Its meta folder goes with it.
    """
    removed = []
    for entry in entries:
        doomed = os.path.join(releases_dir, f".{entry}.pruning")
        try:
            os.rename(os.path.join(releases_dir, entry), doomed)
        except OSError as exc:
            log.warning("release: kept %s, could not move it aside: %s", entry, exc)
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        meta.remove(os.path.dirname(releases_dir), [entry])
        removed.append(entry)
    return removed


def stale_partials(releases_dir):
    """Leftovers of interrupted installs (``<release>.partial``) old enough not to be in use."""
    found = []
    for entry in sorted(os.listdir(releases_dir)) if os.path.isdir(releases_dir) else []:
        path = os.path.join(releases_dir, entry)
        if (entry.endswith(PARTIAL_SUFFIX) and contract.is_release_name(entry[: -len(PARTIAL_SUFFIX)])
                and time.time() - os.lstat(path).st_mtime > PARTIAL_MIN_AGE_S):
            found.append(entry)
    return found


# ---------------------------------------------------------------- artifacts


def read_manifest(release_dir, name):
    path = os.path.join(release_dir, contract.MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CommandExecutionError(f"release {name} has no readable {contract.MANIFEST_NAME}: {exc}")
    problems = contract.validate_manifest(manifest, name)
    if problems:
        raise CommandExecutionError(f"release {name}: " + "; ".join(problems))
    return manifest


def served_path(node_settings):
    """What the web server serves: ``current``, or its ``webroot`` subfolder."""
    current = paths(node_settings)["current"]
    return os.path.join(current, node_settings["webroot"]) if node_settings.get("webroot") else current


def check_webroot(release_dir, node_settings, name):
    """Refuse a release without its ``webroot`` folder: once switched, the web server would serve nothing."""
    webroot = node_settings.get("webroot")
    if webroot and not os.path.isdir(os.path.join(release_dir, webroot)):
        raise CommandExecutionError(f"release {name} has no folder {webroot!r} (webroot): nothing would be served")


def protect(release_dir):
    """
    Code belongs to the deploying user (root) and is read-only to everyone
    else: the app user can read it and write only through shared/ links.
    """
    uid, gid = os.getuid(), os.getgid()
    for root, dirs, files in os.walk(release_dir):
        for entry in [root] + [os.path.join(root, f) for f in files + dirs]:
            os.lchown(entry, uid, gid)
            if not os.path.islink(entry):
                os.chmod(entry, os.lstat(entry).st_mode & 0o755)


def sha256_of(source_hash):
    """The hex digest of ``source_hash`` ('sha256=<hex>' or '<hex>'; the CLI may type digits as int)."""
    return str(source_hash).split("=", 1)[-1].lower()


def fetch_verified(salt, source, source_hash):
    """The local path of ``source`` (salt:// or http) once its sha256 is the expected one."""
    archive = salt["cp.cache_file"](source)
    if not archive:
        where = "from the master" if str(source).startswith("salt://") else "over HTTP"
        raise CommandExecutionError(f"could not fetch {source} {where}")
    expected, actual = sha256_of(source_hash), contract.sha256_file(archive)
    if actual != expected:
        raise CommandExecutionError(
            f"checksum mismatch for {os.path.basename(archive)}: expected sha256 {expected}, got {actual}"
        )
    return archive


def unpack_into(archive, dest):
    """Extract ``archive`` into the fresh path ``dest`` with the safe extractor."""
    try:
        unpack.extract(archive, dest)
    except unpack.UnsafeArchive as exc:
        raise CommandExecutionError(f"refused to unpack {os.path.basename(archive)}: {exc}") from None


def build_tree(salt, node_paths, node_settings, dest, source, source_hash, offer):
    """
    The release's files in the fresh path ``dest``: from the delta ``offer``
    and the installed base when it checks out, else from the full artifact.
    Returns why the delta was not used (None when it was).
    """
    fetch = lambda src, sha: fetch_verified(salt, src, sha)  # noqa: E731
    not_delta = delta.try_apply(offer or {}, node_paths["releases"], dest, fetch,
                                (CommandExecutionError,), skip=node_settings["shared"])
    if not_delta:
        unpack_into(fetch_verified(salt, source, source_hash), dest)
    return not_delta


# ---------------------------------------------------------------- one unpack per node


def stage(salt, node_settings, name, source, source_hash, offer=None):
    """
    Build release ``name`` into ``deploy_to/.staging/<name>`` (root only) for
    the config dry run, recording its sha256 for :func:`take_staged`.
    Returns the tree's path.
    """
    node_paths = paths(node_settings)
    staging = node_paths["staging"]
    os.makedirs(staging, mode=0o700, exist_ok=True)
    _drop_stale(staging, keep=name)
    tree, record = os.path.join(staging, name), os.path.join(staging, f"{name}.json")
    _remove(tree, record)
    not_delta = build_tree(salt, node_paths, node_settings, tree, source, source_hash, offer)
    with open(record, "x", encoding="utf-8") as handle:
        json.dump({"sha256": sha256_of(source_hash), "delta_refused": not_delta}, handle)
    return tree


def take_staged(node_paths, name, source_hash, dest):
    """
    Move the tree the dry run staged for ``name`` to ``dest`` when it was
    built from this very artifact; returns its record ({sha256,
    delta_refused}), or None (then nothing was moved).
    """
    tree = os.path.join(node_paths["staging"], name)
    record_path = f"{tree}.json"
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    try:
        if record.get("sha256") != sha256_of(source_hash) or not os.path.isdir(tree):
            return None
        os.rename(tree, dest)
    except OSError:
        return None
    finally:
        _remove(tree, record_path)
    return record


def unstage(node_paths, name):
    """Remove what the dry run staged for ``name`` (it failed: no install follows)."""
    tree = os.path.join(node_paths["staging"], name)
    _remove(tree, f"{tree}.json")


def _drop_stale(staging, keep):
    for entry in os.listdir(staging):
        path = os.path.join(staging, entry)
        stem = entry[:-5] if entry.endswith(".json") else entry
        if stem != keep and time.time() - os.lstat(path).st_mtime > PARTIAL_MIN_AGE_S:
            _remove(path)


def _remove(*found):
    for path in found:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
