"""
Master side: run a project's build and check commands as an unprivileged
user, in a clean environment, with a timeout and an output cap.

Two modes (``build_sandbox``: ``bwrap``, ``none`` or ``auto``, the default:
bwrap when installed):

- ``bwrap``: bubblewrap gives a read-only view of ``/``, the build tree
  read-write, a private ``/tmp``, no network, and empty tmpfs over the places
  that hold secrets (the master config dir, pki_dir, cachedir, state_dir,
  artifact_root); ``setpriv`` then drops to the build user.
- ``none``: the build user alone; the secret places must not be readable by
  others (state_dir is made 0700 here; any other exposed place refuses the
  build, naming it). The command starts in its tree (chdir before the uid
  drop), so the tree needs no reachable path.

The build tree is handed to the build user for the run and taken back by
root (``lchown``, links not followed) before anything packages it.
"""

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import threading

DEFAULT_USER = "salt-release-build"
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_OUTPUT_KIB = 256
MODES = ("auto", "bwrap", "none")


class SandboxError(Exception):
    """The build cannot be run safely (no build user, an exposed secret, a bad mode)."""


@dataclasses.dataclass
class Jail:
    """How commands run: as whom, under which sandbox, hiding which paths, keeping how much output."""

    user: str = DEFAULT_USER
    mode: str = "auto"
    hidden: list = dataclasses.field(default_factory=list)  # emptied under bwrap
    secret: list = dataclasses.field(default_factory=list)  # without bwrap: must be closed to others
    output_kib: int = DEFAULT_OUTPUT_KIB
    state_dir: str = None  # kept 0700: other projects' mirrors, trees and the history live there


def jail_for(project_config, release_conf, opts):
    """The Jail of a project: its own keys first, then the master's ``release:`` keys."""
    def pick(key, default):
        return project_config.get(key) or release_conf.get(key) or default

    secret = [os.path.dirname(opts.get("conf_file") or "/etc/salt/master"), "/etc/salt",
              opts.get("pki_dir"), opts.get("cachedir"), release_conf.get("state_dir")]
    return Jail(user=str(pick("build_user", DEFAULT_USER)), mode=str(pick("build_sandbox", "auto")),
                hidden=_real(secret + [release_conf.get("artifact_root")]), secret=_real(secret),
                output_kib=int(pick("build_output_kib", DEFAULT_OUTPUT_KIB)),
                state_dir=release_conf.get("state_dir"))


def _real(paths):
    return sorted({os.path.realpath(p) for p in paths if p})


def run(jail, command, tree, timeout_s):
    """
    Run one shell ``command`` in ``tree`` under ``jail``; returns
    ``(returncode, output, note)``: returncode None on a timeout (the whole
    process group killed), output its last ``output_kib`` KiB, note says
    what was cut or killed.
    """
    account = build_account(jail.user)
    mode = _mode(jail)
    if jail.state_dir and os.path.isdir(jail.state_dir):
        os.chmod(jail.state_dir, 0o700)
    if mode == "none" and account:
        _refuse_exposed(jail.secret)
    with tempfile.TemporaryDirectory(prefix="release-build-") as home:
        if account:
            os.chown(home, account.pw_uid, account.pw_gid)
        argv = _argv(mode, jail, account, command, tree, home)
        env = {"PATH": CLEAN_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        if mode == "bwrap":
            env.update(HOME="/tmp", TMPDIR="/tmp")
        return _supervise(argv, tree, env, account, timeout_s, jail.output_kib * 1024)


def build_account(user):
    """The build user's passwd entry, None for ``root``; the default user is created when missing."""
    if user == "root":
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        if user != DEFAULT_USER:
            raise SandboxError(f"build_user {user!r} does not exist on the master")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                   check=True, capture_output=True)
    return pwd.getpwnam(user)


def hand_over(tree, account):
    """Give the tree to the build user for the run (nothing to do for root)."""
    if account:
        _chown_tree(tree, account.pw_uid, account.pw_gid)


def take_back(tree):
    """Root owns the tree again, links not followed, before it is packaged."""
    _chown_tree(tree, 0, 0)


def _chown_tree(tree, uid, gid):
    os.lchown(tree, uid, gid)
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _mode(jail):
    if jail.mode not in MODES:
        raise SandboxError(f"build_sandbox {jail.mode!r} is not one of {', '.join(MODES)}")
    if jail.mode == "auto":
        return "bwrap" if shutil.which("bwrap") else "none"
    if jail.mode == "bwrap" and not shutil.which("bwrap"):
        raise SandboxError("build_sandbox is bwrap but bubblewrap is not installed")
    return jail.mode


def _argv(mode, jail, account, command, tree, home):
    shell = ["/bin/sh", "-c", command]
    if account:
        shell = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups",
                 "--no-new-privs", "--", *shell]
    if mode != "bwrap":
        return shell
    # Later mounts win: the secret places are emptied, then the tree is bound back inside them.
    hide = [arg for path in jail.hidden if os.path.isdir(path) for arg in ("--tmpfs", path)]
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            *hide, "--bind", tree, tree, "--unshare-ipc", "--unshare-pid", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--chdir", tree, "--", *shell]


def _refuse_exposed(paths):
    """Without bwrap only permissions protect the secrets: state_dir is closed here, the rest must be."""
    for path in paths:
        if not os.path.exists(path):
            continue
        if _reachable_by_others(path):
            raise SandboxError(
                f"{path} is readable by other users: without bubblewrap the build user could read it "
                f"(chmod o-rwx it, or install bubblewrap)"
            )


def _reachable_by_others(path):
    parts = path.rstrip("/").split("/")
    for depth in range(2, len(parts)):
        if not os.stat("/".join(parts[:depth])).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(path).st_mode
    return bool(mode & (stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH))


def _supervise(argv, tree, env, account, timeout_s, cap):
    """
    Start in ``tree`` (chdir happens as root, before any uid drop) in a new
    session, keep only the last ``cap`` bytes of output while it runs, and
    kill the whole process group when it ends or runs over: nothing it
    started outlives it.
    """
    proc = subprocess.Popen(argv, cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    kept, seen = bytearray(), [0]
    reader = threading.Thread(target=_drain, args=(proc.stdout, kept, seen, cap), daemon=True)
    reader.start()
    try:
        code, note = proc.wait(timeout=timeout_s), ""
    except subprocess.TimeoutExpired:
        code, note = None, f"killed after {timeout_s} s"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    if seen[0] > cap:
        note = "; ".join(filter(None, [note, f"output cut to its last {cap // 1024} KiB"]))
    return code, bytes(kept[-cap:]).decode("utf-8", "replace"), note


def _drain(stream, kept, seen, cap):
    for chunk in iter(lambda: stream.read1(65536), b""):
        kept.extend(chunk)
        seen[0] += len(chunk)
        if len(kept) > 2 * cap:
            del kept[:-cap]
