"""
Take app nodes out of a load balancer and put them back, on the load-balancer
minion.

``kind: nginx``: the upstream include holds one ``server <backend>[ params];``
line per app node. Draining marks a backend ``down``: the new file is written
to a temp file, renamed over the old one, checked with ``nginx -t`` and made
live with a reload; when the check or the reload fails the previous file is
put back and the step fails, so the file never says what the running nginx
does not serve. Each call returns the backends it changed: a backend an
operator marked ``down`` by hand is not one a drain changed, so whoever
undrains only what it drained leaves it down. A drain called with ``by``
(a run's name) also remembers, on this minion, that this run took those
backends out: a run killed while its drain was in flight never saw the
return, and its recovery asks :func:`drained_by` instead.

Other kinds (HAProxy's runtime API is the obvious next) go behind the same
two calls, ``drain`` and ``undrain``.

This module stands alone (standard library and Salt).
"""

import hashlib
import json
import os
import re
import subprocess

from salt.exceptions import CommandExecutionError

__virtualname__ = "release_lb"

SERVER_LINE = re.compile(r"^(?P<indent>\s*)server\s+(?P<backend>\S+?)(?P<params>(?:\s+[^;]*)?);\s*$")
DEFAULT_TEST_CMD = ["nginx", "-t", "-q"]
DEFAULT_RELOAD_CMD = ["nginx", "-s", "reload"]


def __virtual__():
    return __virtualname__


def drain(upstream_file, backends, kind="nginx", test_cmd=None, reload_cmd=None, by=None):
    """
    Mark each backend ``down`` in the upstream file and reload the balancer.
    ``drained`` in the return lists the backends this call took out (those
    already down, by an operator or an earlier drain, are not in it); with
    ``by`` they are remembered as taken out by ``by`` (see :func:`drained_by`).

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.drain /etc/nginx/conf.d/rainbow.upstream '["10.0.0.5:8080"]'
    """
    ret = _set_down(upstream_file, backends, True, kind, test_cmd, reload_cmd)
    if by and ret["drained"]:
        owners = _owners(upstream_file)
        owners.update(dict.fromkeys(ret["drained"], str(by)))
        _write_owners(upstream_file, owners)
    return ret


def undrain(upstream_file, backends, kind="nginx", test_cmd=None, reload_cmd=None):
    """
    Put each backend back into service (drop its ``down`` flag) and reload.
    ``undrained`` in the return lists the backends this call put back.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.undrain /etc/nginx/conf.d/rainbow.upstream '["10.0.0.5:8080"]'
    """
    ret = _set_down(upstream_file, backends, False, kind, test_cmd, reload_cmd)
    owners = _owners(upstream_file)
    if any(b in owners for b in ret["backends"]):
        _write_owners(upstream_file, {b: o for b, o in owners.items() if b not in ret["backends"]})
    return ret


def drained_by(upstream_file):
    """
    ``{backend: by}`` for the backends a drain called with ``by`` took out
    and nothing has put back since.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.drained_by /etc/nginx/conf.d/rainbow.upstream
    """
    return _owners(upstream_file)


def status(upstream_file):
    """
    The backends of an upstream file and whether each is down.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.status /etc/nginx/conf.d/rainbow.upstream
    """
    return {backend: down for backend, down in _servers(_read(upstream_file)).items()}


def _set_down(upstream_file, backends, down, kind, test_cmd, reload_cmd):
    """
    The edit both calls make. The return names the backends this call
    changed (``drained``: were up, now down; ``undrained``: the reverse), so
    the caller can put back exactly what it took out and leave an operator's
    own ``down`` alone.
    """
    if kind != "nginx":
        raise CommandExecutionError(f"load balancer kind {kind!r} is not supported (only nginx)")
    backends = [backends] if isinstance(backends, str) else list(backends)
    old_text = _read(upstream_file)
    servers = _servers(old_text)
    missing = [b for b in backends if b not in servers]
    if missing:
        raise CommandExecutionError(f"{upstream_file} has no server line for {', '.join(missing)}")
    changed = [b for b in backends if servers[b] != down]
    ret = {"result": True, "changed": bool(changed), "backends": backends,
           "drained" if down else "undrained": changed}
    if not changed:
        return ret
    _replace(upstream_file, _with_down(old_text, set(changed), down))
    try:
        _run(test_cmd or DEFAULT_TEST_CMD, "nginx configuration check")
        _run(reload_cmd or DEFAULT_RELOAD_CMD, "nginx reload")
    except CommandExecutionError:
        # The running nginx still has the old file's servers: the file says so again.
        _replace(upstream_file, old_text)
        raise
    return ret


def _owners_path(upstream_file):
    """Beside the minion's cache, not the upstream file: nginx's config directory stays nginx's."""
    digest = hashlib.sha256(os.path.abspath(upstream_file).encode()).hexdigest()[:16]
    return os.path.join(__opts__["cachedir"], "release_lb", f"{digest}.json")


def _owners(upstream_file):
    try:
        with open(_owners_path(upstream_file), encoding="utf-8") as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_owners(upstream_file, owners):
    path = _owners_path(upstream_file)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(owners, handle, sort_keys=True)
    os.replace(tmp, path)


def _read(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise CommandExecutionError(f"cannot read upstream file {path}: {exc.strerror}")


def _servers(text):
    """``{backend: is_down}`` for every server line."""
    found = {}
    for line in text.splitlines():
        match = SERVER_LINE.match(line)
        if match:
            found[match.group("backend")] = "down" in match.group("params").split()
    return found


def _with_down(text, backends, down):
    lines = []
    for line in text.splitlines():
        match = SERVER_LINE.match(line)
        if match and match.group("backend") in backends:
            params = [p for p in match.group("params").split() if p != "down"]
            if down:
                params.append("down")
            line = f"{match.group('indent')}server {match.group('backend')}{''.join(' ' + p for p in params)};"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _replace(path, text):
    """Write a temp file beside ``path`` and rename it over: nginx never reads half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, os.stat(path).st_mode & 0o777)
    os.replace(tmp, path)


def _run(command, what):
    argv = command.split() if isinstance(command, str) else list(command)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise CommandExecutionError(f"{what} failed (exit {done.returncode}): {' / '.join(tail)}")
