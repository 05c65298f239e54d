"""
The contract between the salt-release runner (master) and the release
execution module (minions): release names, the manifest, event tags, the
returns of ``release.list``, ``release.install`` and ``release.activate``
and the per-node entry of a runner return.

Both sides import this one file, so it must stay standard library only: it is
synced to minions with ``saltutil.sync_all`` (``_utils``) or installed with
pip as ``salt_release.utils.release_contract``.
"""

import datetime
import hashlib
import re

MANIFEST_NAME = "RELEASE.json"
MANIFEST_FIELDS = (
    "name",
    "project",
    "env",
    "ref",
    "commit",
    "version",
    "branch",
    "author",
    "built_at",
    "file_count",
)

# A release name is project_env_version_branch_timestamp_author. The timestamp
# is UTC "YYYY-MM-DD_HHMMSS" (no colon: colons break scp, rsync and PATH lists),
# so a name always splits into seven "_"-separated fields.
TIMESTAMP_FORMAT = "%Y-%m-%d_%H%M%S"
_FIELD = r"[A-Za-z0-9.-]+"
NAME_PATTERN = re.compile(
    rf"^(?P<project>{_FIELD})_(?P<env>{_FIELD})_(?P<version>{_FIELD})_"
    rf"(?P<branch>{_FIELD})_(?P<timestamp>\d{{4}}-\d{{2}}-\d{{2}}_\d{{6}})_"
    rf"(?P<author>{_FIELD})$"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")

TAG_PREFIX = "release"


def sanitize_field(value):
    """
    Reduce one name field to ``[A-Za-z0-9.-]``: every other run of characters
    becomes one ``-``; leading dots and dashes go (no hidden files, no options).
    """
    cleaned = _UNSAFE.sub("-", str(value)).strip("-").lstrip(".-")
    return cleaned or "unknown"


def release_name(project, env, version, branch, built_at, author):
    """
    Build the release name from its fields; ``built_at`` is an aware or naive
    UTC datetime.
    """
    fields = [project, env, version, branch]
    stamp = built_at.strftime(TIMESTAMP_FORMAT)
    return "_".join([sanitize_field(f) for f in fields] + [stamp, sanitize_field(author)])


def parse_release_name(name):
    """
    Split a release name into its fields; None when ``name`` is not one
    (so a stray folder under releases/ is never taken for a release).
    """
    match = NAME_PATTERN.match(name or "")
    if not match:
        return None
    fields = match.groupdict()
    try:
        datetime.datetime.strptime(fields["timestamp"], TIMESTAMP_FORMAT)
    except ValueError:
        return None
    return fields


def is_release_name(name):
    return parse_release_name(name) is not None


def release_sort_key(name):
    """Oldest first: by build timestamp, then by name, the same on every host."""
    return (parse_release_name(name)["timestamp"], name)


def sha256_file(path):
    """The sha256 of a file, hex: how artifacts are named and checked on both sides."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_manifest(manifest, expected_name):
    """
    Return a list of problems with a release manifest (empty when it is good).
    """
    if not isinstance(manifest, dict):
        return ["the manifest is not a JSON object"]
    problems = [f"the manifest lacks '{f}'" for f in MANIFEST_FIELDS if f not in manifest]
    if manifest.get("name") != expected_name:
        problems.append(
            f"the manifest names release '{manifest.get('name')}', expected '{expected_name}'"
        )
    return problems


def event_tag(project, env, *parts):
    """
    ``release/<project>/<env>/<part>/...``; node phases use
    ``event_tag(project, env, minion, phase)``.
    """
    for part in (project, env) + parts:
        if not part or "/" in str(part):
            raise ValueError(f"bad event tag part: {part!r}")
    return "/".join((TAG_PREFIX, str(project), str(env)) + tuple(str(p) for p in parts))


def phase_event(release, result, duration_s, error=None, **extra):
    """The data of a node phase event: what the node ran, how it went, how long."""
    data = {
        "release": release,
        "result": bool(result),
        "duration_s": round(float(duration_s), 3),
        "error": error,
    }
    data.update(extra)
    return data


def send_phase(opts, salt_functions, project, env, phase, data):
    """
    Fire a node phase on the master's bus with the minion's ``event.send``
    (``salt_functions`` is the module's ``__salt__``); nothing when the minion
    runs masterless. Returns a problem text instead of raising: a lost event
    must never fail the phase it reports.
    """
    if opts.get("file_client") == "local" or opts.get("master_type") == "disable":
        return None
    tag = event_tag(project, env or "manual", opts["id"], phase)
    try:
        salt_functions["event.send"](tag, data)
    except Exception as exc:  # noqa: BLE001  (any transport error: see the docstring)
        return f"could not send event {tag}: {exc}"
    return None


def node_result(result, release=None, previous=None, error=None, **extra):
    """One node's entry in a runner return: ``{result, release, previous, error}``."""
    entry = {"result": bool(result), "release": release, "previous": previous, "error": error}
    entry.update(extra)
    return entry


# ---------------------------------------------------------------- node returns

# Keys every return of the node function has ({key: allowed types}); the
# builders below are the only way the node module makes them, and the runner
# may check what it got with validate_return().
RETURN_KEYS = {
    "list": {"releases": (list,), "current": (str, type(None)), "previous": (str, type(None)),
             "bad": (list,), "rollback_target": (str, type(None))},
    "install": {"result": (bool,), "release": (str,), "changed": (bool,), "path": (str,)},
    "activate": {"result": (bool,), "release": (str,), "previous": (str, type(None)), "changed": (bool,)},
}
# Keys a return may have besides: how an install got its files, the stack reload after a switch.
OPTIONAL_KEYS = {
    "list": {"served": (str,)},
    "install": {"transfer": (str,), "delta_refused": (str,), "base": (str,), "staged": (bool,),
                "duration_s": (int, float)},
    "activate": {"reload": (dict,), "duration_s": (int, float)},
}
TRANSFERS = ("full", "delta")


def list_return(releases, current, previous, bad, rollback_target):
    """``release.list``: installed releases oldest first, current, previous, bad ones, rollback target."""
    return {"releases": list(releases), "current": current, "previous": previous, "bad": list(bad),
            "rollback_target": rollback_target}


def install_return(release, path, changed, transfer=None, **detail):
    """
    ``release.install``: when it changed, ``transfer`` (full or delta) says how
    the files came, ``staged`` that the config dry run's tree was reused.
    """
    ret = {"result": True, "release": release, "changed": bool(changed), "path": path}
    if transfer:
        ret["transfer"] = transfer
        ret.update({k: v for k, v in detail.items() if v is not None})
    return ret


def activate_return(release, previous):
    """``release.activate``: the release switched to and the one it replaced (same: nothing changed)."""
    return {"result": True, "release": release, "previous": previous, "changed": previous != release}


def validate_return(kind, ret):
    """Problems with a node return of ``kind`` (list, install, activate); empty when it is good."""
    if not isinstance(ret, dict):
        return [f"a {kind} return must be a mapping, got {type(ret).__name__}"]
    required, optional = RETURN_KEYS[kind], OPTIONAL_KEYS[kind]
    problems = [f"{kind} return lacks '{key}'" for key in required if key not in ret]
    for key, value in ret.items():
        allowed = required.get(key) or optional.get(key)
        if allowed is None:
            problems.append(f"{kind} return has an unknown key '{key}'")
        elif not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            problems.append(f"{kind} return's '{key}' is a {type(value).__name__}")
    if kind == "install" and ret.get("transfer") not in (None,) + TRANSFERS:
        problems.append(f"install return's transfer is {ret['transfer']!r}")
    return problems
