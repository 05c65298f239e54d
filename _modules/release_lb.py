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

An edit is made under a lock (one edit of a file at a time on this minion)
and written ahead: the previous file and ``by`` record go to the minion's
cache before the file changes, and are dropped once nginx has loaded it. A
call killed in between (kill -9 of this minion mid-drain) leaves that record
behind, and a file nginx may not have loaded: the next call undoes the edit
(the previous file and record back, checked and reloaded, so nginx serves
what the file says). Its caller never had an answer, so counts the edit as
failed; a failed edit puts the previous file back.

Other kinds (HAProxy's runtime API is the obvious next) go behind the same
two calls, ``drain`` and ``undrain``.

This module stands alone (standard library and Salt).
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess

from salt.exceptions import CommandExecutionError

__virtualname__ = "release_lb"

SERVER_LINE = re.compile(r"^(?P<indent>\s*)server\s+(?P<backend>\S+?)(?P<params>(?:\s+[^;]*)?);\s*$")
DEFAULT_TEST_CMD = ["nginx", "-t", "-q"]
DEFAULT_RELOAD_CMD = ["nginx", "-s", "reload"]

log = logging.getLogger(__name__)


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
    def owned(owners, changed):
        return dict(owners, **dict.fromkeys(changed, str(by))) if by else owners

    return _set_down(upstream_file, backends, True, kind, test_cmd, reload_cmd, owned)


def undrain(upstream_file, backends, kind="nginx", test_cmd=None, reload_cmd=None):
    """
    Put each backend back into service (drop its ``down`` flag) and reload.
    ``undrained`` in the return lists the backends this call put back.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.undrain /etc/nginx/conf.d/rainbow.upstream '["10.0.0.5:8080"]'
    """
    named = [backends] if isinstance(backends, str) else list(backends)

    def owned(owners, _changed):
        return {b: o for b, o in owners.items() if b not in named}

    return _set_down(upstream_file, named, False, kind, test_cmd, reload_cmd, owned)


def drained_by(upstream_file):
    """
    ``{backend: by}`` for the backends a drain called with ``by`` took out
    and nothing has put back since.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.drained_by /etc/nginx/conf.d/rainbow.upstream
    """
    with _settled(upstream_file):
        return _owners(upstream_file)


def settle(upstream_file):
    """
    Undo an edit a killed call left half made (every call does this first);
    ``undone`` says which (``"drain of <backends>"``), or is None.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.settle /etc/nginx/conf.d/rainbow.upstream
    """
    with _settled(upstream_file) as undone:
        return {"result": True, "undone": undone}


def status(upstream_file):
    """
    The backends of an upstream file and whether each is down.

    CLI Example:

    .. code-block:: bash

        salt lb1 release_lb.status /etc/nginx/conf.d/rainbow.upstream
    """
    with _settled(upstream_file):
        return {backend: down for backend, down in _servers(_read(upstream_file)).items()}


def _set_down(upstream_file, backends, down, kind, test_cmd, reload_cmd, owned):
    """
    The edit both calls make; ``owned(owners, changed)`` is the ``by`` record
    after it. The return names the backends this call changed (``drained``:
    were up, now down; ``undrained``: the reverse), so the caller can put
    back exactly what it took out and leave an operator's own ``down`` alone.
    """
    if kind != "nginx":
        raise CommandExecutionError(f"load balancer kind {kind!r} is not supported (only nginx)")
    backends = [backends] if isinstance(backends, str) else list(backends)
    with _settled(upstream_file):
        old_text = _read(upstream_file)
        servers = _servers(old_text)
        missing = [b for b in backends if b not in servers]
        if missing:
            raise CommandExecutionError(f"{upstream_file} has no server line for {', '.join(missing)}")
        changed = [b for b in backends if servers[b] != down]
        owners = _owners(upstream_file)
        owners_after = owned(owners, changed)
        if changed:
            # Written ahead: a call killed from here on is undone by the next (see _settled).
            _write_state(upstream_file, "edit", {
                "text": old_text, "owners": owners, "test_cmd": test_cmd, "reload_cmd": reload_cmd,
                "what": f"{'drain' if down else 'undrain'} of {', '.join(changed)}"})
        if owners_after != owners:
            _write_state(upstream_file, "owners", owners_after)
        if changed:
            _replace(upstream_file, _with_down(old_text, set(changed), down))
            _apply(upstream_file, test_cmd, reload_cmd)
        return {"result": True, "changed": bool(changed), "backends": backends,
                "drained" if down else "undrained": changed}


def _apply(upstream_file, test_cmd, reload_cmd):
    """Check and reload; on failure the running nginx still has the old file's servers: the file says so again."""
    try:
        _reload(test_cmd, reload_cmd)
    except CommandExecutionError:
        _put_back(upstream_file, _state(upstream_file, "edit"))
        _drop_state(upstream_file, "edit")
        raise
    _drop_state(upstream_file, "edit")


@contextlib.contextmanager
def _settled(upstream_file):
    """
    Hold the file's lock (released by the kernel when its holder dies) and
    undo first an edit a killed call left: its write-ahead record is still
    there. nginx may have loaded either file: the old one is put back and
    reloaded. Yields what was undone (None when nothing was).
    """
    path = _state_path(upstream_file, "lock")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        edit = _state(upstream_file, "edit")
        if edit:
            log.warning("release_lb: undoing a %s that a killed call left in %s", edit["what"], upstream_file)
            _put_back(upstream_file, edit)
            try:
                _reload(edit["test_cmd"], edit["reload_cmd"])
            except CommandExecutionError as exc:  # the record stays: the next call tries again
                raise CommandExecutionError(f"undoing a {edit['what']} a killed call left in {upstream_file}: {exc}")
            _drop_state(upstream_file, "edit")
        yield edit and edit["what"]


def _put_back(upstream_file, edit):
    _replace(upstream_file, edit["text"])
    _write_state(upstream_file, "owners", edit["owners"])


def _reload(test_cmd, reload_cmd):
    _run(test_cmd or DEFAULT_TEST_CMD, "nginx configuration check")
    _run(reload_cmd or DEFAULT_RELOAD_CMD, "nginx reload")


def _state_path(upstream_file, what):
    """Beside the minion's cache, not the upstream file: nginx's config directory stays nginx's."""
    digest = hashlib.sha256(os.path.abspath(upstream_file).encode()).hexdigest()[:16]
    suffix = {"owners": "json", "edit": "edit.json", "lock": "lock"}[what]
    return os.path.join(__opts__["cachedir"], "release_lb", f"{digest}.{suffix}")


def _owners(upstream_file):
    return _state(upstream_file, "owners") or {}


def _state(upstream_file, what):
    """The ``by`` record (``owners``) or the write-ahead record (``edit``); None when absent or unreadable."""
    try:
        with open(_state_path(upstream_file, what), encoding="utf-8") as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _write_state(upstream_file, what, value):
    path = _state_path(upstream_file, what)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _drop_state(upstream_file, what):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_state_path(upstream_file, what))


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
