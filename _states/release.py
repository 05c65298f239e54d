"""
Keep a node on its environment's release (``release.deployed``) and its
releases folder trimmed (``release.pruned``), for highstate.

The release to run, its source and its sha256 come from the ``release_fleet``
pillar (see ``_pillar/release_fleet.py``) unless given; a release named by
hand is fetched from the master's staged artifacts, and its hash read from
the ``<name>.tar.gz.sha256`` file the runner stages beside it. The minion's
``release.install`` checks the downloaded tarball against that hash, so the
node runs exactly the artifact the master serves.

.. code-block:: yaml

    rainbow:
      release.deployed: []          # whatever the fleet runs

    rainbow-pinned:
      release.deployed:
        - name: rainbow
        - release: rainbow_test_1.1.0_master_2026-11-26_101500_alice
"""

import posixpath

from salt.exceptions import CommandExecutionError

import release_health as health_lib
import release_published as published

__virtualname__ = "release"


def __virtual__():
    if "release.install" not in __salt__:
        return (False, "release state: the release execution module is not loaded")
    return __virtualname__


def deployed(name, release=None, source=None, source_hash=None, env=None):
    """
    Make ``current`` of project ``name`` point at ``release`` (default: the
    fleet release from pillar), as the runner would on one node: install
    (fetch, sha256, unpack, render the config from pillar), switch, reload
    the stack (``release.activate``), run the environment's health check
    against this node (pillar ``release_fleet:<name>:health``) and record the
    release as healthy here. A failed check switches back to the release the
    node ran, if any. The comment and changes say what was read back from
    the node. No load balancer is touched. Idempotent; ``test=True`` says what
    would be done. While a deploy of the environment holds its lock (pillar
    ``release_fleet:<name>:locked``) it changes nothing and fails: "deploy in
    progress".

    name
        The project.
    release
        The release name; default ``release_fleet:<name>:release`` from pillar.
    source, source_hash
        Where to fetch the tarball and its ``sha256``; default the master's staged
        artifact and the checksum file beside it.
    env
        The environment named in the node's events; default the fleet record's.
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    try:
        target = _target(name, release, source, source_hash, env)
        if target is None:
            ret.update(result=True, comment=f"no release of {name} has been deployed to this node's environment yet")
            return ret
        if target.get("locked"):
            ret["comment"] = (f"deploy in progress: {target['env']} of {name} is locked by a deploy or rollback "
                              f"(fence {target.get('fence')}); nothing changed, apply again when it is done")
            return ret
        old = __salt__["release.current"](name)
        if old == target["release"]:
            ret.update(result=True, comment=f"{name} already runs {old}")
            return ret
        if __opts__["test"]:
            ret.update(result=None, changes={"old": old, "new": target["release"]}, comment=_plan(name, target, old))
            return ret
        ret.update(_roll_out(name, target, old))
    except CommandExecutionError as exc:
        ret["comment"] = str(exc)
    return ret


def _plan(project, target, old):
    """What ``deployed`` would do here, step by step (``test=True``)."""
    name = target["release"]
    installed = name in __salt__["release.list"](project)["releases"]
    steps = [f"{name} is installed" if installed else f"would install {name} from {target['source']}",
             f"switch {project} from {old} to {name}", "reload its stack"]
    if target["health_url"]:
        steps.append(f"check {target['health_url']}")
    return "; ".join(steps)


def _roll_out(project, target, old):
    """
    Install, switch + reload, check and confirm on this node; the state's
    result, changes and comment, from what the node says afterwards.
    """
    name, done = target["release"], []
    installed = __salt__["release.install"](project, name, target["source"], target["source_hash"],
                                            env=target["env"])
    done.append(f"installed {name} ({installed.get('transfer', 'already there')})" if installed.get("changed")
                else f"{name} was installed")
    activated = __salt__["release.activate"](project, name, env=target["env"])
    done.append(f"switched from {old}" + (", stack reloaded" if activated.get("reload") else ""))
    healthy, said = _check(project, target)
    if said:
        done.append(said)
    running = __salt__["release.current"](project)
    if healthy and running == name:
        __salt__["release.confirm"](project, name, env=target["env"])
        done.append(f"current reads back {running}")
        return {"result": True, "changes": {"old": old, "new": running}, "comment": f"{project}: " + "; ".join(done)}
    if old and running == name:
        done.append(_switch_back(project, old, target["env"]))
        running = __salt__["release.current"](project)
    done.append(f"current reads back {running}")
    changes = {"old": old, "new": running} if running != old else {}
    return {"result": False, "changes": changes, "comment": f"{project}: " + "; ".join(done)}


def _switch_back(project, old, env):
    """Back to the release the node ran before (switch + reload), marking the one left bad, as the runner does."""
    try:
        __salt__["release.activate"](project, old, env=env, rollback=True, force=True)
    except CommandExecutionError as exc:
        return f"could not switch back to {old}: {exc}"
    return f"switched back to {old}"


def _check(project, target):
    """``(ok, what to say)``: the environment's health check against this node (ok when it has none)."""
    url = target["health_url"]
    if not url:
        return True, None
    ok, problem = health_lib.check(target["health"], url, target["release"])
    return ok, f"health check {url} passed" if ok else f"health check failed: {problem}"


def _health_url(project, health, host_grain):
    """This node's health URL (None without a health check); a missing host grain fails before any change."""
    if not health:
        return None
    grain = host_grain or health_lib.DEFAULT_HOST_GRAIN
    # grains.items, not __grains__: the loader's __grains__ is a context object, not a dict.
    grains = __salt__["grains.items"]()
    host = health_lib.grain_value(grains, grain)
    if not host:
        raise CommandExecutionError(f"no '{grain}' grain on this node for the health check of {project}")
    return health_lib.url_for(health, host, grains.get("id"), project)


def _target(project, release, source, source_hash, env):
    """What to run: ``{release, source, source_hash, env, locked, fence, health, health_url}``, or None."""
    fleet = (__pillar__.get("release_fleet") or {}).get(project) or {}
    release = release or fleet.get("release")
    if not release:
        return None
    same = release == fleet.get("release")
    if not source:
        source = fleet.get("source") if same else _beside(fleet.get("source"), release)
    if not source:
        raise CommandExecutionError(
            f"cannot tell where {release} is staged: give source= (no fleet release of {project} in pillar)"
        )
    if not source_hash:
        source_hash = fleet.get("source_hash") if same else _staged_hash(source)
    env = env or fleet.get("env")
    # A deploy of this environment in progress owns the node (pillar, see _pillar/release_fleet.py).
    locked = bool(fleet.get("locked")) and env == fleet.get("env")
    return {"release": release, "source": source, "source_hash": source_hash, "env": env,
            "locked": locked, "fence": fleet.get("fence"), "health": fleet.get("health"),
            "health_url": _health_url(project, fleet.get("health"), fleet.get("host_grain"))}


def _beside(fleet_source, release):
    """The staged tarball of ``release``: in the same folder as the fleet release's."""
    if not fleet_source:
        return None
    return posixpath.join(posixpath.dirname(fleet_source), f"{release}.tar.gz")


def _staged_hash(source):
    text = __salt__["cp.get_file_str"](published.checksum_path(source))
    digest = published.parse_checksum(text or "")
    if not digest:
        raise CommandExecutionError(
            f"no checksum for {source} on the master ({published.checksum_path(source)}): give source_hash="
        )
    return f"sha256={digest}"


def pruned(name, keep=None):
    """
    Keep at most ``keep`` releases of project ``name`` on the node (default
    its pillar ``keep_releases``), never ``current`` or the rollback target;
    ``test=True`` lists what would go.

    .. code-block:: yaml

        rainbow-retention:
          release.pruned:
            - name: rainbow
            - keep: 3
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    try:
        outcome = __salt__["release.prune"](name, keep=keep, test=__opts__["test"])
    except CommandExecutionError as exc:
        ret["comment"] = str(exc)
        return ret
    removed = outcome["removed"]
    if not removed:
        ret.update(result=True, comment=f"{name}: nothing to prune ({len(outcome['kept'])} kept)")
    elif __opts__["test"]:
        ret.update(result=None, changes={"removed": removed}, comment=f"{name}: would remove {len(removed)}")
    else:
        ret.update(result=True, changes={"removed": removed}, comment=f"{name}: removed {len(removed)}")
    return ret
