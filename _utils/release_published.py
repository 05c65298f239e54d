"""
What the master publishes for highstate: each staged artifact's sha256 in a
file beside it, and each environment's published release (the release its
last good deploy put on every node; highstate's "fleet release").

The runner writes both; the ``release_fleet`` ext_pillar reads the published
records (and whether a deploy of the environment holds its lock) and the
``release.deployed`` state reads the checksum files through the master's
fileserver. Standard library only (synced as ``_utils`` or
installed as ``salt_release.utils.release_published``).
"""

import datetime
import json
import os

CHECKSUM_SUFFIX = ".sha256"


def checksum_path(tarball):
    return tarball + CHECKSUM_SUFFIX


def write_checksum(tarball, sha256):
    """``<name>.tar.gz.sha256`` beside the staged tarball, in ``sha256sum`` format."""
    _write_atomically(checksum_path(tarball), f"{sha256}  {os.path.basename(tarball)}\n")


def parse_checksum(text):
    """The hex digest from a checksum file's text, or None when it holds none."""
    field = (text or "").split()[:1]
    digest = field[0].lower() if field else ""
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


def _fleet_dir(state_dir):
    return os.path.join(state_dir, "fleet")


def record_published_release(state_dir, project, env, release, source, sha256, jid=None):
    """After a good deploy: ``env`` of ``project`` now runs ``release`` everywhere."""
    doc = {
        "project": project, "env": env, "release": release, "source": source,
        "source_hash": f"sha256={sha256}", "jid": jid,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
    }
    path = os.path.join(_fleet_dir(state_dir), project, f"{env}.json")
    _write_atomically(path, json.dumps(doc, indent=1, sort_keys=True))


def published_releases(state_dir, project):
    """``{env: record}`` for every environment of ``project`` with a good deploy."""
    folder = os.path.join(_fleet_dir(state_dir), project)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return {}
    found = {}
    for filename in names:
        try:
            with open(os.path.join(folder, filename), encoding="utf-8") as handle:
                doc = json.load(handle)
        except (OSError, ValueError):
            continue  # a torn or foreign file is no published release
        found[filename[: -len(".json")]] = doc
    return found


def lock_path(state_dir, project, env):
    """The deploy lock file of project+env (the default file lock; the runner's ``_release_lock``)."""
    return os.path.join(state_dir, "locks", f"{project}.{env}.lock")


def deploy_in_progress(state_dir, project, env):
    """
    ``{"locked": True, "fence": <n or None>}`` while a deploy or rollback of
    project+env holds the file lock, else None. A half-written lock counts as
    held: a deploy is taking it.
    """
    try:
        with open(lock_path(state_dir, project, env), encoding="utf-8") as handle:
            owner = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        owner = {}
    return {"locked": True, "fence": owner.get("fence") if isinstance(owner, dict) else None}


def _write_atomically(path, text):
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)  # one a dead run of this pid left
    # 0640: only the master (root) reads these; never through a link planted at the temp name.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640), "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
