"""
The master's ``release:`` settings, read one way by every master-side part
(the runner, the ``release_fleet`` ext_pillar, the webhook).

``master(opts)`` fills the defaults README promises (``state_dir``
``<cachedir>/release``, ``artifact_root`` ``<first base file_root>/releases``,
the sqlite store, the timeouts and the lock TTL; no ``metrics_file`` unless
set) and normalises every project: each environment gets ``waves``, a list of wave dicts, whether it
was written with one ``target`` or with ``waves:``. Bad settings are said
with the key that is wrong, e.g.
``release:projects:rainbow:environments:pro:waves[1]: 'target' is missing``.

Pure functions over plain dicts, standard library only (synced as
``_utils`` or installed as ``salt_release.utils.release_settings``).
"""

import os
import re

TIMEOUTS = {"timeout_s": 60, "install_timeout_s": 300, "build_timeout_s": 1800, "lock_ttl_s": 6 * 3600}
DEFAULT_STORE = "sqlite"
WAVE_DEFAULTS = {"tgt_type": "glob", "batch": "100%", "bake_s": 0, "max_failures": 0}
# A batch or failure budget: N nodes or N% of the wave.
COUNT = re.compile(r"^\s*\d+(\.\d+)?\s*%?\s*$")


class SettingsError(ValueError):
    """A setting that cannot work; the message names its key."""


def master(opts):
    """
    The normalised ``release:`` settings of a master's ``opts``. Projects that
    are wrong are left out of ``projects`` and their errors are listed under
    ``errors`` (``{project: message}``), so one bad project breaks only itself.
    """
    conf = dict(opts.get("release") or {})
    conf["state_dir"] = conf.get("state_dir") or os.path.join(opts.get("cachedir") or "", "release")
    if not conf.get("artifact_root"):
        roots = (opts.get("file_roots") or {}).get("base") or []
        conf["artifact_root"] = os.path.join(roots[0], "releases") if roots else None
    conf["store"] = conf.get("store") or DEFAULT_STORE
    conf["metrics_file"] = _metrics_file(conf.get("metrics_file"))
    for key, default in TIMEOUTS.items():
        conf[key] = _seconds(conf.get(key, default), f"release:{key}")
    conf["projects"], conf["errors"] = {}, {}
    for name, raw in sorted((opts.get("release") or {}).get("projects", {}).items()):
        try:
            conf["projects"][name] = project(name, raw, conf)
        except SettingsError as exc:
            conf["errors"][name] = str(exc)
    return conf


def project(name, raw, defaults=None):
    """One project's settings: timeouts filled from the master's, each environment normalised."""
    where = f"release:projects:{name}"
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: must be a mapping, not {type(raw).__name__}")
    if not isinstance(raw.get("repo"), str) or not raw["repo"]:
        raise SettingsError(f"{where}: 'repo' is missing")
    for key in ("build", "checks"):
        commands = raw.get(key) or []
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise SettingsError(f"{where}: '{key}' must be a list of commands")
    conf = dict(raw)
    for key, default in TIMEOUTS.items():
        conf[key] = _seconds(raw.get(key, (defaults or {}).get(key, default)), f"{where}:{key}")
    environments = raw.get("environments") or {}
    if not isinstance(environments, dict):
        raise SettingsError(f"{where}:environments: must be a mapping of environment names")
    conf["environments"] = {env: environment(f"{where}:environments:{env}", spec)
                            for env, spec in environments.items()}
    return conf


def environment(where, raw):
    """
    An environment with ``waves``: its own list, each wave's defaults filled,
    or, for one written with ``target``, one wave named ``all`` made of its
    ``target``, ``tgt_type``, ``batch``, ``bake_s`` and ``max_failures``.
    """
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: must be a mapping, not {type(raw).__name__}")
    if "waves" in raw and "target" in raw:
        raise SettingsError(f"{where}: give 'target' or 'waves', not both")
    if "waves" in raw:
        specs = raw["waves"]
        if not isinstance(specs, list) or not specs:
            raise SettingsError(f"{where}:waves: must be a non-empty list of waves")
        waves = [wave(f"{where}:waves[{i}]", spec, "all") for i, spec in enumerate(specs)]
    else:
        waves = [wave(where, raw, "all")]
        waves[0] = {k: waves[0][k] for k in ("name", "target", *WAVE_DEFAULTS)}
    return dict(raw, waves=waves)


def wave(where, raw, name):
    """One wave: ``target`` required, the rest defaulted, counts checked."""
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: must be a mapping, not {type(raw).__name__}")
    if not isinstance(raw.get("target"), str) or not raw["target"].strip():
        raise SettingsError(f"{where}: 'target' is missing")
    spec = dict(WAVE_DEFAULTS, name=name)
    spec.update({k: v for k, v in raw.items() if v is not None})
    for key in ("batch", "max_failures"):
        if not COUNT.match(str(spec[key])):
            raise SettingsError(f"{where}:{key}: must be N or 'N%', not {spec[key]!r}")
    spec["bake_s"] = _seconds(spec["bake_s"], f"{where}:bake_s", zero=True)
    return spec


def _metrics_file(path):
    """
    Where the Prometheus metrics go (None: nowhere). node_exporter's textfile
    collector reads only ``*.prom`` files, so a path it would ignore is an error.
    """
    if not path:
        return None
    if not isinstance(path, str) or not os.path.isabs(path) or not path.endswith(".prom"):
        raise SettingsError(f"release:metrics_file: must be an absolute path ending in .prom, not {path!r}")
    return path


def _seconds(value, where, zero=False):
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: must be a number of seconds, not {value!r}") from None
    if seconds < 0 or (seconds == 0 and not zero):
        raise SettingsError(f"{where}: must be more than 0, not {value!r}")
    return int(seconds) if seconds == int(seconds) else seconds
