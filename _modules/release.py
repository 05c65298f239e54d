"""
Install and switch releases on a node.

A node keeps its releases under ``deploy_to``::

    deploy_to/
      releases/<release name>/   one folder per release, code read-only to the app user
      shared/<path>/             state that outlives releases, writable by the app user
      current -> releases/<name> switched atomically (temp symlink + rename(2))

The node's settings come from pillar ``release:<project>`` (deploy_to, user,
shared, keep_releases) and are kept in the minion's cache at install time, so
``salt-call --local release.list <project>`` works with the master down.

Fetching, sha256 checks, the one safe unpack and the settings cache live in
``release_node`` (shared with ``release_config`` and ``release_stack``); the
return shapes in ``release_contract``. Standard library and Salt: minions
receive it by ``saltutil.sync_all`` or from the ``salt_release`` pip package.
"""

import json
import logging
import os
import shutil
import time

from salt.exceptions import CommandExecutionError

import release_contract as contract
import release_fence as fence_lib
import release_meta as meta
import release_node as node
import release_retention as retention
import release_shared as shared_paths

log = logging.getLogger(__name__)

__virtualname__ = "release"

PARTIAL_SUFFIX = node.PARTIAL_SUFFIX


def __virtual__():
    return __virtualname__


# ---------------------------------------------------------------- settings


def _settings(project):
    """The node's view of a project: pillar first, else what the last install recorded."""
    return node.settings(__opts__, __pillar__, project)


def _read_cache(project):
    return node.read_cache(__opts__, project)


def _remember(project, settings, **state):
    node.remember(__opts__, project, settings, **state)


def _check_name(name):
    if not contract.is_release_name(name):
        raise CommandExecutionError(
            f"'{name}' is not a release name (project_env_version_branch_YYYY-MM-DD_HHMMSS_author)"
        )


# ---------------------------------------------------------------- events


def _reported(project, env, phase, release):
    """Wrap a phase: run ``work``, time it and report it on the bus, failed or not."""
    loader = (__opts__, __salt__, __pillar__)
    return lambda work: node.reported(loader, project, env, phase, release, work, _event_extra)


def _event_extra(result):
    return {k: result[k] for k in ("previous", "changed") if k in (result or {})}


# ---------------------------------------------------------------- install


def _unpacked_release(paths, name, source, source_hash, settings, delta_offer=None):
    """
    The release's files in releases/<name>.partial (the config dry run's
    staged tree when it was built from this artifact, else from the delta or
    the full artifact), made ready, then renamed in place. Returns how the
    files came, for the install's return.
    """
    target = os.path.join(paths["releases"], name)
    partial = target + PARTIAL_SUFFIX
    if os.path.lexists(partial):
        shutil.rmtree(partial)  # a leftover of an interrupted install of this very release
    staged = node.take_staged(paths, name, source_hash, partial)
    if staged:
        not_delta = staged.get("delta_refused")
    else:
        not_delta = node.build_tree(__salt__, paths, settings, partial, source, source_hash, delta_offer)
    try:
        _make_ready(partial, paths, settings, name, source_hash)
        meta.commit(paths["root"], name)
        os.rename(partial, target)
    except (OSError, CommandExecutionError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        meta.remove(paths["root"], [name, name + PARTIAL_SUFFIX])
        if isinstance(exc, CommandExecutionError):
            raise
        raise CommandExecutionError(f"could not install {name}: {exc}")
    if not_delta:
        return {"transfer": "full", "delta_refused": not_delta, "staged": bool(staged)}
    return {"transfer": "delta", "base": (delta_offer or {}).get("base"), "staged": bool(staged)}


def _make_ready(partial, paths, settings, name, source_hash):
    """
    Check the manifest, link shared paths, protect the code, render config;
    the manifest, the config index and the artifact's hash go to the
    release's meta folder (``meta/<name>.partial`` until the install ends).
    """
    manifest = node.read_manifest(partial, name)
    node.check_webroot(partial, settings, name)
    meta_dir = meta.begin(paths["root"], name)
    meta.take_manifest(partial, meta_dir)
    shared_paths.link_shared(partial, paths, settings)
    node.protect(partial)
    # Config rendered into the release itself, so a rollback brings its config back.
    rendered = __salt__["release_config.render"](manifest["project"], partial, manifest, env=manifest["env"])
    if rendered.get("files"):
        meta.write(meta_dir, meta.CONFIG_INDEX, json.dumps(rendered["files"], indent=1, sort_keys=True))
    # The full artifact's hash, verified above or rebuilt file by file from a verified delta.
    meta.write(meta_dir, meta.ARTIFACT_HASH, source_hash + "\n")


def _check_fence(project, env, fence):
    """Refuse a deploy older than the last one of its project+env on this node (see release_fence)."""
    try:
        fences = fence_lib.advance(_read_cache(project), project, env, fence)
    except fence_lib.StaleFence as exc:
        raise CommandExecutionError(str(exc))
    if fences is not None:
        _remember(project, {}, fences=fences)


def _installed_hash(paths, name):
    return meta.read_text(paths["root"], name, meta.ARTIFACT_HASH)


def install(project, name, source, source_hash, env=None, fence=None,
            delta_source=None, delta_hash=None, base=None, **kwargs):
    """
    Fetch a release tarball, verify its sha256 and unpack it safely into
    ``releases/<name>``, linking the shared paths. Installing the same name and
    checksum again changes nothing; a bad artifact changes nothing.

    With ``delta_source``/``delta_hash``/``base`` (offered by the runner) a
    node that has ``releases/<base>`` fetches only the delta and carries the
    unchanged files over from the base after checking each one; on any doubt
    it installs the full artifact. The return's ``transfer`` says which.

    CLI Example:

    .. code-block:: bash

        salt 'web*' release.install rainbow rainbow_test_v1.1.0_master_2026-11-26_101500_ops \\
            source=salt://releases/rainbow/rainbow_test_v1.1.0_master_2026-11-26_101500_ops.tar.gz \\
            source_hash=<sha256>
    """

    def work():
        _check_name(name)
        settings = _settings(project)
        paths = node.ensure_layout(settings)
        _check_fence(project, env, fence)
        target = os.path.join(paths["releases"], name)
        expected = node.sha256_of(source_hash)
        if os.path.isdir(target):
            if _installed_hash(paths, name) != expected:
                raise CommandExecutionError(
                    f"release {name} is already installed from a different artifact; refusing to replace it"
                )
            result = contract.install_return(name, target, changed=False)
        else:
            offer = {"delta_source": delta_source, "delta_hash": delta_hash, "base": base}
            result = contract.install_return(name, target, True, **_unpacked_release(
                paths, name, source, expected, settings, offer))
        # Only now: a failed install must leave the settings that rollback (--local) relies on.
        _remember(project, settings)
        return result

    return _reported(project, env, "install", name)(work)


# ---------------------------------------------------------------- activate


def _switch(paths, name):
    """
    Point ``current`` at releases/<name> with a temp symlink renamed over it:
    readers see the old or the new release, never a missing one.
    """
    current = paths["current"]
    if os.path.lexists(current) and not os.path.islink(current):
        raise CommandExecutionError(
            f"{current} is a real directory, not a symlink: move it aside by hand "
            "(for example into releases/) before the first switch; it is never removed automatically"
        )
    link_target = os.path.join("releases", name)
    tmp = os.path.join(paths["root"], f".current.{os.getpid()}.{time.monotonic_ns()}")
    os.symlink(link_target, tmp)
    try:
        os.replace(tmp, current)
    except OSError as exc:
        os.unlink(tmp)
        raise CommandExecutionError(f"could not switch {current}: {exc}")
    if os.readlink(current) != link_target:
        raise CommandExecutionError(f"{current} points at {os.readlink(current)} after the switch")


def activate(project, name, env=None, fence=None, rollback=False, force=False, **kwargs):
    """
    Switch ``current`` to an installed release and reload the stack, as one
    unit: when the reload fails after the switch, ``current`` goes back to
    the previous release, the stack is reloaded again and the error says
    both, so the node ends on its old release. Returns the previous one.
    ``fence`` (passed by the runner) refuses a switch from a deploy older than
    the last one of this environment that touched this node. ``rollback=True``
    marks the release switched away from as bad; a bad release is only
    switched to again with ``force=True`` (which clears its mark).

    CLI Example:

    .. code-block:: bash

        salt 'web*' release.activate rainbow rainbow_test_v1.1.0_master_2026-11-26_101500_ops
    """

    def work():
        _check_name(name)
        settings = _settings(project)
        paths = node.paths(settings)
        _check_fence(project, env, fence)
        if not os.path.isdir(os.path.join(paths["releases"], name)):
            raise CommandExecutionError(f"release {name} is not installed on this node")
        cached = _read_cache(project)
        if name in cached.get("bad", []) and not force:
            raise CommandExecutionError(
                f"release {name} is marked bad on this node (it was rolled back from): pass force=True to run it again"
            )
        previous = node.current_name(paths)
        if previous != name:
            bad = [b for b in cached.get("bad", []) if b != name] + ([previous] if rollback and previous else [])
            _switch_and_remember(project, settings, paths, name, previous, bad)
        result = contract.activate_return(name, previous)
        # After every real switch, and again until one succeeded for this release.
        if settings["stack"] and (previous != name or _read_cache(project).get("reloaded") != name):
            result["reload"] = _reload_or_switch_back(project, env, settings, paths, name, previous, cached)
        return result

    return _reported(project, env, "activate", name)(work)


def _switch_and_remember(project, settings, paths, name, previous, bad):
    _switch(paths, name)
    _remember(project, settings, current=name, previous=previous, bad=bad)


def _reload(project, env, name):
    result = _reported(project, env, "reload", name)(lambda: __salt__["release_stack.reload"](project, release=name))
    _remember(project, {}, reloaded=name)
    return result


def _reload_or_switch_back(project, env, settings, paths, name, previous, before):
    """Reload the stack on ``name``; on failure go back to ``previous`` (its cache state too) and reload that."""
    try:
        return _reload(project, env, name)
    except CommandExecutionError as exc:
        failed = f"reload failed on {name}: {exc}"
        if not previous or previous == name:
            raise
    _switch(paths, previous)
    _remember(project, settings, current=previous, previous=before.get("previous"), bad=before.get("bad", []))
    try:
        _reload(project, env, previous)
        back = "ok"
    except CommandExecutionError as exc:
        back = f"failed: {exc}"
    raise CommandExecutionError(f"{failed}; switched back to {previous} and reloaded: {back}")


def confirm(project, release, env=None):
    """
    Record that ``release`` passed its health check on this node (the runner
    calls it after a good verify; without a health check a good activate
    counts). Default and emergency rollback targets come only from these
    confirmed releases. Refused unless ``release`` is what ``current`` runs.

    CLI Example:

    .. code-block:: bash

        salt 'web*' release.confirm rainbow rainbow_test_v1.1.0_master_2026-11-26_101500_ops env=test
    """
    _check_name(release)
    running = node.current_name(node.paths(_settings(project)))
    if running != release:
        raise CommandExecutionError(f"{release} is not what this node runs ({running}): not confirmed")
    cached = _read_cache(project)
    _remember(project, {}, good=retention.remember_good(retention.seed_good(cached), release),
              bad=[b for b in cached.get("bad", []) if b != release])
    return {"result": True, "project": project, "env": env, "release": release, "confirmed": True}


def rollback(project, to=None, env=None, fence=None, avoid=None, **kwargs):
    """
    Switch back to the release this node most recently ran and confirmed
    healthy (``release.confirm``; never one marked bad here or named in
    ``avoid``, the master's bad marks; never one only installed), or to the
    installed release ``to``; the release left is marked bad. Works with the
    master down (``salt-call --local``): it reads only this node's releases
    folder and cache.

    CLI Example:

    .. code-block:: bash

        salt-call --local release.rollback rainbow
        salt 'web1' release.rollback rainbow to=rainbow_test_v1.0.0_master_2026-11-26_101500_ops
    """
    state = list_(project)
    target = to or retention.rollback_target(state["releases"], state["current"], _read_cache(project).get("good"),
                                             state["bad"] + list(avoid or []))
    if not target:
        raise CommandExecutionError(
            f"{project}: no release that passed its health check here to go back to from {state['current']}"
        )
    if target not in state["releases"]:
        raise CommandExecutionError(f"release {target} is not installed on this node")
    return activate(project, target, env=env, fence=fence, rollback=True, force=bool(to))


def prune(project, keep=None, test=False):
    """
    Remove old releases: keep ``keep`` (default pillar ``keep_releases``,
    else 5), the newest confirmed healthy first, then the newest unconfirmed,
    bad ones last; never remove ``current`` or the rollback target;
    folders that are not releases are left alone; ``.partial`` leftovers of
    interrupted installs are removed once older than ten minutes. A removed
    release's meta folder goes with it; one left without its release (an
    interrupted install) is removed once older than ten minutes
    (``meta_removed``). Returns what was (with ``test=True``: would be) removed.

    CLI Example:

    .. code-block:: bash

        salt 'web*' release.prune rainbow keep=3
    """
    settings = _settings(project)
    keep = int(keep if keep is not None else settings["keep_releases"])
    state = list_(project)
    try:
        doomed = retention.prunable(state["releases"], state["current"], keep, [state["rollback_target"]],
                                    good=_read_cache(project).get("good"), bad=state["bad"])
    except ValueError as exc:
        raise CommandExecutionError(str(exc))
    paths = node.paths(settings)
    partials = node.stale_partials(paths["releases"])
    removed = doomed + partials if test else node.remove_releases(paths["releases"], doomed + partials)
    orphans = meta.orphans(paths["root"], node.release_names(paths))
    if not test:
        meta.remove(paths["root"], orphans)
    return {
        "result": True, "removed": removed, "test": bool(test), "meta_removed": orphans,
        "kept": [n for n in state["releases"] if n not in removed],
        "current": state["current"], "rollback_target": state["rollback_target"],
    }


# ---------------------------------------------------------------- queries


def list_(project, avoid=None):
    """
    The releases on this node, oldest to newest, which one is current, the
    one before it, those marked bad, the default rollback target (the
    newest confirmed healthy one, see ``release.confirm``, that is neither
    marked bad here nor named in ``avoid``, the master's bad marks) and
    ``served``, the folder the web server should serve (``current``, or its
    pillar ``webroot`` subfolder).

    CLI Example:

    .. code-block:: bash

        salt-call --local release.list rainbow
    """
    settings = _settings(project)
    paths = node.paths(settings)
    releases, current = node.release_names(paths), node.current_name(paths)
    cached = _read_cache(project)
    bad = [b for b in cached.get("bad", []) if b in releases]
    found = contract.list_return(releases, current, cached.get("previous"), bad,
                                 retention.rollback_target(releases, current, cached.get("good"),
                                                           bad + list(avoid or [])))
    found["served"] = node.served_path(settings)
    return found


def current(project):
    """
    The release ``current`` points at (None before the first switch).

    CLI Example:

    .. code-block:: bash

        salt 'web*' release.current rainbow
    """
    return node.current_name(node.paths(_settings(project)))



def version():
    """
    Where this node loaded salt-release from: this module's file and each
    shared helper's. With a pip install and a sync side by side, the synced
    module wins but the helpers come from the pip install (site-packages is
    ahead of extmods/utils on sys.path): this shows which copy runs.

    CLI Example:

    .. code-block:: bash

        salt '*' release.version
    """
    helpers = (contract, node, retention)
    return {"module": __file__, "helpers": {helper.__name__: helper.__file__ for helper in helpers}}


__func_alias__ = {"list_": "list"}
