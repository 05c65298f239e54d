"""
Make the web stack serve the release ``current`` points at, after a switch.

A symlink switch is atomic for the file system, not for the processes that
read through it: PHP-FPM keeps compiled scripts (OPcache) and resolved paths
(per-worker realpath cache) of the old release; Tomcat resolves ``docBase``
once at start and keeps compiled JSPs in ``work/``, which a rollback to files
with an older mtime does not invalidate. Pillar ``release:<project>:stack``
says what to do::

    release:
      shop:
        user: www-data                       # commands run as this user
        stack:
          kind: php-fpm
          listen: /run/php/php8.2-fpm.sock   # or 127.0.0.1:9000
          method: reset                      # or: reload (pid: <FPM pid file>, or reload: <command>)
      store:
        user: tomcat
        stack:
          kind: tomcat
          catalina_base: /var/lib/tomcat10
          app: ROOT                          # the context name
          unit: tomcat10                     # or stop: <command> and start: <command>
          port: 8080                         # waited on: closed after stop, answering after start
      api:
        stack: {kind: command, restart: /srv/api/bin/restart, port: 9000}

``release.activate`` runs :func:`reload` after every real switch (deploys
and rollbacks alike) and reports it as the ``reload`` phase. The settings are
also cached by ``release.install``, so ``salt-call --local`` works with the
master down.

Commands run with a clean environment (plus ``stack:environment``) as
``stack:run_as``, else the app user; root only when ``run_as: root`` is written
out (for service managers such as ``systemctl``) and never for Tomcat's own
stop/start commands (use ``unit`` there: systemd starts it as its ``User=``).

Standard library and Salt; the FastCGI client is ``release_fastcgi``, the
project's settings and node cache come from ``release_node``.
"""

import json
import os
import pwd
import re
import signal
import subprocess
import tempfile
import time

from salt.exceptions import CommandExecutionError

import release_fastcgi as fastcgi
import release_node as node
import release_safe_fs as safe_fs

__virtualname__ = "release_stack"

DEFAULT_TIMEOUT_S = 60
OUTPUT_TAIL_LINES = 20
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESET_SCRIPT_DIR = ".stack"
RESET_SCRIPT_NAME = "opcache-reset.php"
UNIT_NAME = re.compile(r"^[A-Za-z0-9@._:-]+$")

# Runs inside the FPM pool. opcache_reset() from the CLI would clear the CLI's
# own cache, not the pool's: this is why the module talks FastCGI to the pool.
# Once OPcache restarts, every worker also drops its realpath cache on its next
# request, so no worker keeps resolving current/ to the old release.
RESET_SCRIPT = """<?php
// Written by salt-release (release_stack.reload): reached only by a FastCGI
// request sent straight to the pool, kept outside every release and web root.
$reset = ($_SERVER['QUERY_STRING'] ?? '') === 'reset'
    && function_exists('opcache_reset') && opcache_reset();
clearstatcache(true);
$status = function_exists('opcache_get_status') ? opcache_get_status(false) : false;
header('Content-Type: application/json');
echo json_encode([
    'reset' => $reset,
    'enabled' => is_array($status) && $status['opcache_enabled'],
    'pending' => is_array($status) && ($status['restart_pending'] || $status['restart_in_progress']),
    'pid' => getmypid(),
]);
"""


def __virtual__():
    return __virtualname__


# ---------------------------------------------------------------- settings


def _stack(project):
    """``release:<project>:stack`` plus the app user and deploy_to: pillar first, else the cache."""
    view = node.project_view(__opts__, __pillar__, project)
    stack = dict(view.get("stack") or {})
    stack["app_user"] = view.get("user")
    stack["deploy_to"] = view.get("deploy_to")
    return stack


def _required(stack, key):
    if not stack.get(key):
        raise CommandExecutionError(f"stack kind {stack.get('kind')} needs '{key}'")
    return stack[key]


def _timeout(stack):
    return float(stack.get("timeout", DEFAULT_TIMEOUT_S))


# ---------------------------------------------------------------- commands


def _command_user(stack, allow_root):
    """The account a command runs as: run_as, else the app user; root only when asked for by name."""
    name = stack.get("run_as") or stack.get("app_user")
    if not name:
        raise CommandExecutionError(
            "no app user: set release:<project>:user (or stack:run_as); stack commands never run as root by default"
        )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise CommandExecutionError(f"user '{name}' does not exist on this node")
    if entry.pw_uid == 0 and not (allow_root and stack.get("run_as")):
        raise CommandExecutionError(
            "refusing to run the stack's commands as root (the service would run as root): "
            + ("use 'unit' for a systemd service" if not allow_root else "set run_as: root explicitly")
        )
    return entry


def _identity(entry):
    """subprocess arguments that switch to ``entry`` (nothing when we already are that user)."""
    if entry.pw_uid == os.getuid():
        return {}
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def _tail(raw):
    return "\n".join(raw.decode("utf-8", "replace").splitlines()[-OUTPUT_TAIL_LINES:])


def _run(step, command, entry, stack, check=True):
    """
    Run a shell command as ``entry`` with a clean environment, in its own
    session (a service it starts outlives this job). Output goes to a file,
    not a pipe, so a daemon that keeps the descriptor cannot hang us.
    """
    env = {"PATH": SAFE_PATH, "HOME": entry.pw_dir, "USER": entry.pw_name,
           "LOGNAME": entry.pw_name, "LANG": "C.UTF-8"}
    env.update({str(k): str(v) for k, v in (stack.get("environment") or {}).items()})
    timeout_s = _timeout(stack)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd="/", start_new_session=True, **_identity(entry),
        )
        try:
            retcode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CommandExecutionError(f"{step} command {command!r} ran over {timeout_s:g} s")
        out.seek(0)
        output = _tail(out.read())
    result = {"step": step, "command": command, "user": entry.pw_name, "retcode": retcode, "output": output}
    if check and retcode != 0:
        raise CommandExecutionError(f"{step} command {command!r} exited {retcode}: {output[-2000:]}")
    return result


# ---------------------------------------------------------------- sockets


def _answers(spec):
    try:
        with fastcgi.connect(spec, 1):
            return True
    except OSError:
        return False


def _wait_until(done, timeout_s, failure):
    """Poll ``done`` until it is true; returns the seconds it took, raises ``failure`` on timeout."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout_s:
            raise CommandExecutionError(f"{failure} within {timeout_s:g} s")
        time.sleep(0.1)
    return round(time.monotonic() - started, 3)


def _port_step(step, port, up, timeout_s):
    seconds = _wait_until(
        lambda: _answers(port) == up, timeout_s, f"{port} {'did not answer' if up else 'still answers'}"
    )
    return {"step": step, "port": str(port), "seconds": seconds}


def _reset_script(stack):
    """Write the reset script (root-owned, read-only) beside the releases, not inside one."""
    path = stack.get("script") or os.path.join(
        _required(stack, "deploy_to"), RESET_SCRIPT_DIR, RESET_SCRIPT_NAME
    )
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == RESET_SCRIPT:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o644)
        handle.write(RESET_SCRIPT)
    os.replace(tmp, path)
    return path


def _pool_status(listen, script, query, timeout_s):
    """Run the reset script in the pool; its JSON answer, or an error saying why FPM refused."""
    stdout, stderr = fastcgi.get(listen, script, query, timeout_s)
    head, _, body = stdout.partition(b"\r\n\r\n")
    status = re.search(rb"^Status: *(.*)$", head, re.M)
    if status and not status.group(1).startswith(b"200"):
        raise CommandExecutionError(
            f"FPM at {listen} answered {status.group(1).decode(errors='replace').strip()} for {script} "
            f"({stderr.decode(errors='replace').strip()}): can the pool's user read it, is it inside open_basedir?"
        )
    text = body.decode("utf-8", "replace")
    try:
        return json.loads(text[text.rfind("{"):])
    except ValueError:
        raise CommandExecutionError(f"unexpected answer from {script} at {listen}: {text[-500:]!r}")


def _fpm_reset(stack):
    listen = _required(stack, "listen")
    timeout_s = _timeout(stack)
    script = _reset_script(stack)
    answer = _pool_status(listen, script, "reset", timeout_s)
    if not answer.get("reset"):
        raise CommandExecutionError(
            f"opcache_reset() did nothing in the pool at {listen}: OPcache is disabled there or "
            f"opcache.restrict_api excludes {script}; use method: reload"
        )
    # The restart waits until no worker is inside a request; each request we
    # send gives it a chance. Until it happens workers may still see the old files.
    seconds = _wait_until(
        lambda: not _pool_status(listen, script, "status", timeout_s).get("pending"),
        timeout_s, f"OPcache in the pool at {listen} did not restart (workers stayed busy)",
    )
    return [{"step": "opcache-reset", "listen": str(listen), "script": script,
             "worker_pid": answer.get("pid"), "seconds": seconds}]


# ---------------------------------------------------------------- php-fpm reload


def _proc_name(pid):
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _children(pid):
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def _fpm_master(pid_file):
    """The FPM master named by its pid file, checked to be php-fpm (a stale file must not aim our signal)."""
    try:
        with open(pid_file, encoding="utf-8") as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError) as exc:
        raise CommandExecutionError(f"cannot read the FPM master's pid from {pid_file}: {exc}")
    name = _proc_name(pid)
    if not (name or "").startswith("php-fpm"):
        raise CommandExecutionError(f"{pid_file} names pid {pid}, which is not a running php-fpm ({name})")
    return pid


def _fpm_reload(stack):
    """
    Graceful reload: USR2 makes the master let its workers finish (within
    process_control_timeout) and start new ones, which have empty caches.
    """
    if stack.get("reload"):
        return [_run("reload", stack["reload"], _command_user(stack, allow_root=True), stack)]
    pid_file = stack.get("pid")
    if not pid_file:
        raise CommandExecutionError(
            "php-fpm method 'reload' needs 'pid' (the master's pid file) or 'reload' (a command)"
        )
    master = _fpm_master(pid_file)
    before = _children(master)
    os.kill(master, signal.SIGUSR2)
    seconds = _wait_until(
        lambda: not before & _children(master) and (_proc_name(master) or "").startswith("php-fpm"),
        _timeout(stack), f"php-fpm master {master} did not replace its workers",
    )
    return [{"step": "signal", "signal": "USR2", "pid": master, "workers_replaced": len(before), "seconds": seconds}]


def _php_fpm(stack):
    method = stack.get("method", "reset")
    if method == "reset":
        return _fpm_reset(stack)
    if method == "reload":
        return _fpm_reload(stack)
    raise CommandExecutionError(f"php-fpm method must be 'reset' or 'reload', got {method!r}")


# ---------------------------------------------------------------- tomcat


def _clean_tomcat(base, app):
    """Compiled JSPs of the context and Tomcat's temp files: stale after any switch, rollbacks included."""
    try:
        return (safe_fs.clean_below(base, ("work", "Catalina", "localhost"), [app])
                + safe_fs.clean_below(base, ("temp",), None))
    except OSError as exc:
        raise CommandExecutionError(f"could not clean {base}: {exc}")


def _unit_commands(unit):
    """systemctl stop/start, run by the minion; refused when the unit would run Tomcat as root."""
    if not UNIT_NAME.match(str(unit)):
        raise CommandExecutionError(f"not a systemd unit name: {unit!r}")
    shown = subprocess.run(["systemctl", "show", "--property=User", "--value", "--", unit],
                           capture_output=True, text=True, check=False)
    if shown.returncode != 0 or shown.stdout.strip() in ("", "root", "0"):
        raise CommandExecutionError(f"unit {unit} has no non-root User= (or is unknown): refusing to start it")
    me = pwd.getpwuid(os.getuid())
    return ("stop", f"systemctl stop {unit}", me), ("start", f"systemctl start {unit}", me)


def _tomcat(stack):
    base = _required(stack, "catalina_base")
    app = str(stack.get("app", "ROOT"))
    if not os.path.isabs(base) or not os.path.isdir(base):
        raise CommandExecutionError(f"catalina_base must be an existing absolute directory, got {base!r}")
    if not app or "/" in app or app in (".", ".."):
        raise CommandExecutionError(f"app must be a context name such as ROOT, got {app!r}")
    port = _required(stack, "port")
    timeout_s = _timeout(stack)
    if stack.get("unit"):
        stop, start = _unit_commands(stack["unit"])
    else:
        user = _command_user(stack, allow_root=False)
        stop, start = ("stop", _required(stack, "stop"), user), ("start", _required(stack, "start"), user)
    stopping = _run(*stop, stack, check=False)
    try:
        stopped = _port_step("stopped", port, False, timeout_s)
    except CommandExecutionError as exc:
        raise CommandExecutionError(f"{exc} after the stop command (exit {stopping['retcode']}: {stopping['output']})")
    cleaned = {"step": "clean", "removed": _clean_tomcat(base, app)}
    return [stopping, stopped, cleaned, _run(*start, stack), _port_step("started", port, True, timeout_s)]


# ---------------------------------------------------------------- command


def _command(stack):
    user = _command_user(stack, allow_root=True)
    steps = [_run(step, stack[step], user, stack) for step in ("reload", "restart") if stack.get(step)]
    if not steps:
        raise CommandExecutionError("stack kind command needs 'reload' and/or 'restart'")
    if stack.get("port"):
        steps.append(_port_step("started", stack["port"], True, _timeout(stack)))
    return steps


HANDLERS = {"php-fpm": _php_fpm, "tomcat": _tomcat, "command": _command}


# ---------------------------------------------------------------- public


def reload(project, release=None):
    """
    Run the project's stack handler so the services serve what ``current``
    points at. ``release.activate`` calls it after every switch; run it by
    hand after fixing a failed one.

    CLI Example:

    .. code-block:: bash

        salt 'web*' release_stack.reload shop
        salt-call --local release_stack.reload shop
    """
    started = time.monotonic()
    stack = _stack(project)
    kind = stack.get("kind")
    if not kind:
        return {"result": True, "kind": None, "steps": [], "comment": f"no release:{project}:stack configured"}
    if kind not in HANDLERS:
        raise CommandExecutionError(
            f"release:{project}:stack:kind must be one of {', '.join(sorted(HANDLERS))}, got {kind!r}"
        )
    # Commands may print rendered config: their output and errors leave with the secrets scrubbed.
    secrets = node.secret_values(__pillar__, project)
    try:
        steps = HANDLERS[kind](stack)
    except CommandExecutionError as exc:
        where = f" after the switch to {release}" if release else ""
        raise CommandExecutionError(node.scrub(f"{kind} handler failed{where}: {exc}", secrets)) from None
    for step in steps:
        if "output" in step:
            step["output"] = node.scrub(step["output"], secrets)
    return {"result": True, "kind": kind, "steps": steps, "duration_s": round(time.monotonic() - started, 3)}
