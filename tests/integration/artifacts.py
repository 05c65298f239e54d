"""
Hand-made release tarballs for tests that feed ``release.install`` directly:
built member by member (so a test can put in what the runner never would),
staged under the master's artifact root with their true sha256.
"""

import datetime
import hashlib
import io
import json
import os
import tarfile
import uuid

import release_contract as contract


def fresh_name(project, version="v0"):
    """A valid, never-used release name (the author field makes it unique)."""
    built = datetime.datetime.now(datetime.timezone.utc)
    return contract.release_name(project, "test", version, "master", built, uuid.uuid4().hex[:10])


def manifest_for(name):
    fields = contract.parse_release_name(name)
    doc = {field: fields.get(field, "x") for field in contract.MANIFEST_FIELDS}
    doc.update(name=name, ref="test", commit="0" * 40, built_at="now", file_count=1)
    return doc


def file_member(name, data=b"", mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, io.BytesIO(data)


def special_member(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info, None


def stage(cluster, project, name, members, manifest=True):
    """Write ``<artifact_root>/<project>/<name>.tar.gz``; returns (salt URL, sha256)."""
    folder = os.path.join(cluster.release_config["artifact_root"], project)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        if manifest:
            tar.addfile(*file_member(contract.MANIFEST_NAME, json.dumps(manifest_for(name)).encode()))
        for info, data in members:
            tar.addfile(info, data)
    with open(path, "rb") as handle:
        sha = hashlib.sha256(handle.read()).hexdigest()
    return f"salt://releases/{project}/{name}.tar.gz", sha


def install(cluster, minion, project, name, url, sha):
    """``salt <minion> release.install ...``: the process result."""
    return cluster.salt_cli.run(
        "release.install", project, name, f"source={url}", f"source_hash={sha}", minion_tgt=minion
    )
