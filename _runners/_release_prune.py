"""
Master side of pruning: after a good deploy, the staged artifacts (tarball,
checksum, delta files) of an environment's releases that no node keeps any
more are dropped from the artifact root. (Which releases a node keeps is the
node's own ``release_retention``.)
"""

import os

import release_contract as contract
import release_delta as delta

TARBALL_SUFFIX = ".tar.gz"


def prune_artifacts(artifact_root, project, env, still_used):
    """
    Remove the staged tarballs (and checksum files) of ``env``'s releases of
    ``project`` that no node has any more; other environments' artifacts and
    files that are not release tarballs stay. Returns the release names removed.
    """
    folder = os.path.join(artifact_root, project)
    removed = []
    for name in _staged_releases(folder):
        fields = contract.parse_release_name(name)
        if fields["env"] != contract.sanitize_field(env) or name in still_used:
            continue
        tarball = os.path.join(folder, name + TARBALL_SUFFIX)
        for path in [tarball + ".sha256", tarball] + delta.side_files(folder, name):
            if os.path.exists(path):
                os.unlink(path)
        removed.append(name)
    return removed


def _staged_releases(folder):
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    # A delta's name ends in .tar.gz too, and "<release>.delta" parses as a release (dots are allowed).
    tarballs = [e for e in entries if e.endswith(TARBALL_SUFFIX) and not e.endswith(delta.DELTA_SUFFIX)]
    names = (e[: -len(TARBALL_SUFFIX)] for e in tarballs)
    return [n for n in names if contract.is_release_name(n)]
