"""
Render a node's configuration files into a release, from pillar.

Pillar ``release:<project>:files`` names the files a node gets inside each
release; they are rendered into the release directory before it is
activated, so switching back to an older release also brings back the
configuration that went with it::

    release:
      rainbow:
        files:
          config/db.php: {template: config/db.php.example}        # in the release, Jinja
          config/pay.php: {source: salt://rainbow/pay.php.j2}     # on the master, Jinja
          crontab.xml: {contents: "<cron>...</cron>"}              # literal text
        secrets:                                                   # '#!yaml|gpg' in real pillar
          db_password: ...

Templates see ``pillar`` (only ``release:<project>``, plus the top-level
keys listed in ``release:<project>:context_pillar``), ``grains``, ``secrets``
(``release:<project>:secrets``) and ``release`` (the release manifest).
Undefined names are errors.

Secrets never leave the rendered files: returns and events name each file
with its sha256, and error messages carry the file, the line and the kind of
error, never a rendered value.

This module stands alone (standard library, Jinja and Salt); ``release.install``
calls ``render`` through ``__salt__``.
"""

import contextlib
import hashlib
import json
import os
import re
import traceback

import jinja2  # a dependency of Salt itself
import jinja2.sandbox
from salt.exceptions import CommandExecutionError

import release_meta as meta
import release_node as node

__virtualname__ = "release_config"

# Kept in the release's meta folder by release.install: which files were rendered and their sha256.
INDEX_NAME = meta.CONFIG_INDEX
TEMPLATE_NAME = "<template>"
KINDS = ("template", "source", "contents")
# Files the release itself owns: a rendered file may not replace them.
RESERVED = (meta.MANIFEST, meta.CONFIG_INDEX, meta.ARTIFACT_HASH)
DEFAULT_MODE = {"root": 0o640, "app": 0o600}


def __virtual__():
    return __virtualname__


# ---------------------------------------------------------------- pillar


def _project_pillar(project):
    """
    ``release:<project>`` from this node's pillar, read with ``__pillar__``
    (``pillar.get`` masks values in 3008). A pillar that failed to render, an
    undecryptable secret for one, stops here with the SLS names only: the
    render errors themselves can quote pillar text.
    """
    errors = __pillar__.get("_errors")
    if errors:
        text = " ".join(map(str, errors))
        failed = sorted(set(re.findall(r"SLS '([^']+)'", text)))
        if re.search("top file", text, re.IGNORECASE):
            failed.insert(0, "the top file")
        where = f" (SLS: {', '.join(failed)})" if failed else ""
        raise CommandExecutionError(
            f"this node's pillar failed to render{where}, for example an undecryptable "
            "secret: fix it on the master (its log has the details) before deploying"
        )
    return (__pillar__.get("release") or {}).get(project) or {}


def _template_pillar(project, conf):
    """
    The pillar a template sees: its own ``release:<project>`` only, plus the
    top-level keys ``release:<project>:context_pillar`` lists. Another
    project's settings and secrets stay out of reach.
    """
    keys = conf.get("context_pillar") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or "release" in keys:
        raise CommandExecutionError(
            f"release:{project}:context_pillar must be a list of top-level pillar keys other than 'release'"
        )
    scoped = {key: __pillar__[key] for key in keys if key in __pillar__}
    scoped["release"] = {project: conf}
    return scoped


# ---------------------------------------------------------------- paths and modes


def _clean_relative(path, what):
    """A relative path that stays inside the release, normalised."""
    text = str(path or "")
    parts = text.split("/")
    if not text or text.startswith("/") or ".." in parts or "\\" in text or "\0" in text:
        raise CommandExecutionError(f"{what} must be a relative path inside the release: {text!r}")
    return "/".join(p for p in parts if p not in ("", "."))


def _check_target(target, shared):
    clean = _clean_relative(target, "target path")
    if clean in RESERVED:
        raise CommandExecutionError(f"target {target!r} would replace the release's own {clean}")
    for path in shared:
        prefix = _clean_relative(path, "shared path")
        if clean == prefix or clean.startswith(prefix + "/"):
            raise CommandExecutionError(
                f"target {target!r} lies inside the shared path {prefix!r}: shared state is "
                "not part of a release, so a rollback could not bring its old version back"
            )
    return clean


def _ownership(target, spec, user):
    """(uid, gid, mode) of a rendered file: root with the app group, or the app user."""
    owner = spec.get("owner", "root")
    if owner not in DEFAULT_MODE:
        raise CommandExecutionError(f"{target}: owner must be 'root' or 'app', got {owner!r}")
    raw = spec.get("mode")
    if raw is None:
        mode = DEFAULT_MODE[owner]
    elif isinstance(raw, str) and re.fullmatch(r"0?[0-7]{3}", raw):
        mode = int(raw, 8)
    else:  # YAML reads an unquoted 0640 as the number 416
        raise CommandExecutionError(f"{target}: mode must be a quoted octal string like '0640'")
    if mode & 0o022:
        raise CommandExecutionError(
            f"{target}: mode {mode:04o} lets group or others write; rendered files are read-only"
        )
    uid, gid = node.app_ids(user)
    return (uid if owner == "app" else os.getuid()), gid, mode


# ---------------------------------------------------------------- rendering


def _environment():
    # The sandbox keeps templates to data: no reaching Python internals from a repo file.
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )


def _template_text(target, spec, release_dir):
    """The template text and whether it is Jinja; ``contents`` is literal text."""
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise CommandExecutionError(f"{target}: give exactly one of template, source, contents")
    kind = kinds[0]
    if kind == "contents":
        return str(spec["contents"]), False
    if kind == "source":
        return _fetch_source(target, spec["source"]), True
    return _read_in_release(target, spec["template"], release_dir), True


def _fetch_source(target, source):
    if not str(source).startswith("salt://"):
        raise CommandExecutionError(f"{target}: source must be a salt:// URL, got {source!r}")
    text = __salt__["cp.get_file_str"](source)
    if text is False or text is None:
        raise CommandExecutionError(f"{target}: template {source} not found on the master")
    return text


def _read_in_release(target, template, release_dir):
    rel = _clean_relative(template, f"{target}: template path")
    root = os.path.realpath(release_dir)
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(root + os.sep):
        raise CommandExecutionError(f"{target}: template {template!r} leads outside the release")
    if not os.path.isfile(path):
        raise CommandExecutionError(f"{target}: template {template!r} is not a file in the release")
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _render_one(target, text, context, secret_values):
    """
    Render with StrictUndefined. On failure, say where and what kind of error,
    and drop the exception chain: Jinja messages and tracebacks can quote
    template lines and values, and Salt logs tracebacks at debug level.
    """
    try:
        return _environment().from_string(text).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        detail = f"Jinja syntax error at line {exc.lineno}: {exc.message}"
    except jinja2.UndefinedError as exc:
        detail = f"undefined variable at line {_template_line(exc)}: {exc.message}"
    except Exception as exc:  # noqa: BLE001
        # Other messages may quote values (int('<secret>')): the type and line only.
        detail = f"{type(exc).__name__} at line {_template_line(exc)}"
    raise CommandExecutionError(f"{target}: {node.scrub(detail, secret_values)}") from None


def _template_line(exc):
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == TEMPLATE_NAME]
    return lines[-1] if lines else "?"


def _rendered(project, release_dir, manifest):
    """
    Render every file this node's pillar declares, in memory:
    ``{target: (bytes, uid, gid, mode)}``. Raises on the first bad file.
    """
    conf = _project_pillar(project)
    files = conf.get("files") or {}
    if not isinstance(files, dict):
        raise CommandExecutionError(f"release:{project}:files must be a mapping of path to spec")
    secrets = conf.get("secrets") or {}
    secret_values = node.secret_values(__pillar__, project)
    context = {"pillar": _template_pillar(project, conf), "grains": __grains__, "secrets": secrets,
               "release": manifest}
    out = {}
    for target in sorted(files):
        spec = files[target] or {}
        if not isinstance(spec, dict):
            raise CommandExecutionError(f"{target!r}: expected template, source or contents")
        clean = _check_target(target, conf.get("shared") or [])
        uid, gid, mode = _ownership(clean, spec, conf.get("user"))
        text, jinja = _template_text(clean, spec, release_dir)
        body = _render_one(clean, text, context, secret_values) if jinja else text
        if mode & 0o007 and any(v in body for v in secret_values):
            raise CommandExecutionError(f"{clean}: holds a secret, so its mode may not grant others access")
        out[clean] = (body.encode("utf-8"), uid, gid, mode)
    return out


def _digest(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- writing


def _inside(path, root):
    return path == root or path.startswith(root + os.sep)


def _write(release_dir, target, data, uid, gid, mode, shared):
    """Write one file through a temp file and rename, never following a link."""
    root = os.path.realpath(release_dir)
    dest = os.path.join(root, target)
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    parent = os.path.realpath(os.path.dirname(dest))
    # A link in the code (or a shared link) must not carry the file elsewhere.
    shared_real = [os.path.realpath(os.path.join(root, s)) for s in shared]
    if not _inside(parent, root) or any(_inside(parent, s) for s in shared_real):
        raise CommandExecutionError(f"target {target!r} resolves outside the release's own files")
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise CommandExecutionError(f"target {target!r} is a directory in the release")
    tmp = f"{dest}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchown(handle.fileno(), uid, gid)
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        os.replace(tmp, dest)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- events


def _reported(project, env, release, dry_run, work):
    """Report the configure phase on the master bus: file names and sha256 only."""
    return node.reported(
        (__opts__, __salt__, __pillar__), project, env, "configure", release, work, timed=False,
        summary=lambda result: {"files": result["files"] if result else {}, "dry_run": dry_run},
    )


# ---------------------------------------------------------------- public


def render(project, release_dir, manifest=None, env=None):
    """
    Render the files pillar ``release:<project>:files`` declares into
    ``release_dir`` (an unpacked release); returns their sha256 by path.
    ``release.install`` calls this before the release is renamed into place,
    so a failure leaves no half-configured release behind, and keeps the
    sha256 list in the release's meta folder (never in the served tree).

    CLI Example:

    .. code-block:: bash

        salt 'web1' release_config.render rainbow /srv/rainbow/releases/<name>.partial
    """
    manifest = manifest or {}

    def work():
        shared = _project_pillar(project).get("shared") or []
        hashes = {}
        try:
            for target, (data, uid, gid, mode) in _rendered(project, release_dir, manifest).items():
                _write(release_dir, target, data, uid, gid, mode, shared)
                hashes[target] = _digest(data)
        except OSError as exc:
            raise CommandExecutionError(f"could not write config file: {exc.strerror}") from None
        return {"result": True, "files": hashes}

    return _reported(project, env, manifest.get("name"), False, work)


def check(project, name, source, source_hash, env=None, delta_source=None, delta_hash=None, base=None,
          keep=True):
    """
    Dry run: render this node's files for release ``name`` (its artifact
    fetched from ``source`` and checked against ``source_hash``) in memory,
    and say per file whether it differs from the current release's. Returns
    names and sha256 only. No release changes: the artifact is unpacked once
    into ``deploy_to/.staging/<name>`` (root only), which ``release.install``
    of the same artifact then moves into place instead of unpacking again.
    A project without ``files`` fetches nothing: there is nothing to render.
    ``keep=False`` (``release.deploy diff=True``: no install follows) leaves
    nothing behind: neither the staged tree nor the fetched artifact.

    CLI Example:

    .. code-block:: bash

        salt 'web*' release_config.check rainbow rainbow_test_v1.1.0_master_2026-11-26_101500_ops \\
            source=salt://releases/rainbow/rainbow_test_v1.1.0_master_2026-11-26_101500_ops.tar.gz \\
            source_hash=<sha256>
    """

    def work():
        conf = _project_pillar(project)
        offer = {"delta_source": delta_source, "delta_hash": delta_hash, "base": base}
        rendered = _dry_run(project, name, source, source_hash, offer, keep) if conf.get("files") else {}
        deploy_to = conf.get("deploy_to") or "/nonexistent"
        current = os.path.join(deploy_to, "current")
        files = {t: _compare(current, t, _digest(v[0])) for t, v in rendered.items()}
        running = node.current_name({"current": current})
        for target in sorted(set(meta.read_json(deploy_to, running, INDEX_NAME) if running else {}) - set(files)):
            files[target] = {"sha256": None, "status": "removed"}
        return {"result": True, "release": name, "files": files}

    return _reported(project, env, name, True, work)


def _dry_run(project, name, source, source_hash, offer, keep=True):
    """
    Render this node's files for release ``name`` from its tree, built once
    into the staging folder: ``release.install`` of the same artifact reuses it
    (unless ``keep`` is False: then the tree and the fetched artifact go).
    """
    settings = node.settings(__opts__, __pillar__, project)
    tree = node.stage(__salt__, settings, name, source, source_hash, offer)
    try:
        manifest = _read_manifest(tree)
        if manifest.get("name") != name:
            raise CommandExecutionError(f"artifact {source} is not release {name}")
        return _rendered(project, tree, manifest)
    except CommandExecutionError:
        node.unstage(node.paths(settings), name)
        raise
    finally:
        if not keep:  # no install follows to take the staged tree
            _forget(settings, name, source)


def _forget(settings, name, source):
    """Remove what a dry run left: the staged tree (and the staging folder once empty), the cached artifact."""
    staging = node.paths(settings)["staging"]
    node.unstage(node.paths(settings), name)
    with contextlib.suppress(OSError):
        os.rmdir(staging)
    cached = __salt__["cp.is_cached"](source)
    if cached and os.path.isfile(cached):
        os.unlink(cached)


def _read_manifest(tree):
    try:
        with open(os.path.join(tree, meta.MANIFEST), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CommandExecutionError(f"could not read the release manifest: {exc}") from None


def _compare(current, target, sha256):
    path = os.path.join(current, target)
    if not os.path.isfile(path):
        return {"sha256": sha256, "status": "new"}
    with open(path, "rb") as handle:
        same = _digest(handle.read()) == sha256
    return {"sha256": sha256, "status": "unchanged" if same else "changed"}
