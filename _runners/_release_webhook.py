"""
Master side: decide what a git webhook asks for, trusting nothing in it.

Pure functions over the request salt-api put on the bus (raw body and
headers) and the project's master configuration, and at the end ``handle``,
the body of ``salt-run release.webhook`` that acts on their verdict::

    release:
      projects:
        rainbow:
          webhook:
            secret: <GitHub secret, GitLab signing token (whsec_...) or GitLab secret token>
            max_body_bytes: 524288   # bodies over ~512 KiB arrive trimmed by Salt anyway
          environments:
            pro: {target: 'web*', production: true}
          triggers:
            dev: {branches: [dev]}
            test: {branches: ['release/*']}
            pre: {tags: ['v*']}
            pro: {tags: ['v*'], auto: true}   # a production: true environment needs auto: true

Senders and how each is checked (every comparison constant-time):

- GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``.
- GitLab with a signing token (Standard Webhooks): ``webhook-signature: v1,<base64
  HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>``, key = base64 after ``whsec_``.
- GitLab with a secret token: ``X-Gitlab-Token`` is the secret itself; the reactor
  passes only its sha256, which is compared with the sha256 of the configured secret.

Nothing here returns or raises a secret, a token or a signature.
"""

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import re
import time
import urllib.parse

import _release_run as runs
import release_contract as contract

DEFAULT_MAX_BODY_BYTES = 512 * 1024
# What Salt puts in place of an event value over the master's max_event_size. salt-api
# fires the body twice (raw and parsed), so a body over about half of max_event_size
# (1 MiB by default) reaches the reactor as this string: refused as too-large.
TRIMMED = "VALUE_TRIMMED"
TIMESTAMP_TOLERANCE_S = 300
PROJECT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ZERO_SHA = "0" * 40
# Headers salt-api title-cases; we look them up case-insensitively anyway.
DELIVERY_HEADERS = ("X-GitHub-Delivery", "Idempotency-Key", "Webhook-Id", "X-Gitlab-Event-UUID")


class Refused(Exception):
    """The request is not to be trusted or not understood; ``reason`` is a short code."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class Ignored(Exception):
    """A genuine request that asks for no deploy (a ping, a non-push event, an unmapped ref)."""


def header(headers, name):
    wanted = name.lower()
    for key, value in (headers or {}).items():
        if str(key).lower() == wanted:
            return str(value)
    return None


# ---------------------------------------------------------------- trust


def check_project(project, projects):
    """The project's config; Refused when the name is bad or unknown."""
    if not PROJECT_PATTERN.match(str(project or "")):
        raise Refused("unknown-project", "the hook path names no valid project")
    if project not in (projects or {}):
        raise Refused("unknown-project", f"unknown project {project!r}")
    return projects[project]


def check_size(body, config, headers=None):
    """
    Refused ``too-large`` when the body is over ``max_body_bytes``, or when
    Salt trimmed it on the bus (the body is ``VALUE_TRIMMED``, or shorter
    than the request's Content-Length): its signature can never match.
    """
    limit = int((config.get("webhook") or {}).get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
    size = len(body)
    sent = header(headers, "Content-Length")
    if body == TRIMMED.encode() or (sent and sent.strip().isdigit() and int(sent) != size):
        raise Refused("too-large", f"the body ({sent or 'unknown'} bytes sent) was trimmed on Salt's event bus: "
                                   f"bodies over about half of the master's max_event_size never arrive whole")
    if size > limit:
        raise Refused("too-large", f"body of {size} bytes is over the limit of {limit} bytes")


def github_signature(secret, body):
    """What GitHub sends in ``X-Hub-Signature-256`` for ``body`` (bytes)."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_signature(secret, webhook_id, timestamp, body):
    """The ``v1,<base64>`` Standard Webhooks signature (GitLab signing tokens)."""
    key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
    signed = f"{webhook_id}.{timestamp}.".encode("utf-8") + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def token_digest(token):
    """The sha256 of a GitLab secret token: what the reactor passes instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def verify(headers, body, config, gitlab_token_sha256=None, now=None):
    """
    Check the request against the project's secret; returns the sender
    ("github" or "gitlab"). Raises Refused for a missing or wrong signature.
    """
    secret = (config.get("webhook") or {}).get("secret")
    if not secret:
        raise Refused("no-secret", "the project has no webhook secret in the master config")
    secret = str(secret)
    if header(headers, "X-Hub-Signature-256") is not None:
        _same(github_signature(secret, body), header(headers, "X-Hub-Signature-256"))
        return "github"
    if header(headers, "Webhook-Signature") is not None:
        _check_standard(headers, body, secret, time.time() if now is None else now)
        return "gitlab"
    if gitlab_token_sha256:
        _same(token_digest(secret), gitlab_token_sha256)
        return "gitlab"
    raise Refused("unsigned", "no X-Hub-Signature-256, webhook-signature or X-Gitlab-Token header")


def _same(expected, given):
    if not hmac.compare_digest(expected.encode("utf-8"), str(given).encode("utf-8")):
        raise Refused("bad-signature", "the signature or token does not match the project's secret")


def _check_standard(headers, body, secret, now):
    webhook_id, stamp = header(headers, "Webhook-Id"), header(headers, "Webhook-Timestamp")
    try:
        late = abs(now - int(stamp))
        expected = standard_signature(secret, webhook_id, stamp, body).encode()
    except (TypeError, ValueError, binascii.Error):
        raise Refused("bad-signature", "webhook-id, webhook-timestamp or the signing key is malformed")
    if late > TIMESTAMP_TOLERANCE_S:
        raise Refused("stale", f"webhook-timestamp is {int(late)} s away from the master's clock")
    # The header may carry several space-separated signatures (key rotation): any may match.
    if not any(hmac.compare_digest(expected, given.encode()) for given in header(headers, "Webhook-Signature").split()):
        raise Refused("bad-signature", "the signature or token does not match the project's secret")


# ---------------------------------------------------------------- meaning


def parse_payload(body, headers):
    """The JSON payload: a JSON body, or GitHub's form-encoded ``payload=``."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        if "x-www-form-urlencoded" in (header(headers, "Content-Type") or ""):
            text = urllib.parse.parse_qs(text).get("payload", [""])[0]
        payload = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise Refused("malformed", "the body is not a JSON document")
    if not isinstance(payload, dict):
        raise Refused("malformed", "the body is not a JSON object")
    return payload


def pushed_ref(sender, headers, payload):
    """``("branch"|"tag", name, full_ref)`` of a push; Ignored for pings, other events and deletions."""
    event = header(headers, "X-GitHub-Event") or header(headers, "X-Gitlab-Event") or payload.get("object_kind")
    if sender == "github" and event == "ping":
        raise Ignored("ping: the hook is set up")
    if event not in ("push", "Push Hook", "Tag Push Hook", "tag_push"):
        raise Ignored(f"event {event!r} is not a push")
    if payload.get("deleted") or payload.get("after") == ZERO_SHA:
        raise Ignored("the push deleted a ref")
    ref = str(payload.get("ref") or "")
    for prefix, kind in (("refs/heads/", "branch"), ("refs/tags/", "tag")):
        if ref.startswith(prefix) and len(ref) > len(prefix):
            return kind, ref[len(prefix):], ref
    raise Refused("malformed", "the push names no refs/heads/ or refs/tags/ ref")


def pusher(sender, payload):
    if sender == "github":
        return (payload.get("pusher") or {}).get("name") or (payload.get("sender") or {}).get("login")
    return payload.get("user_username") or payload.get("user_name")


def environments_for(config, kind, name):
    """
    The environments whose trigger matches the pushed branch or tag, sorted;
    a production environment only when its trigger says ``auto: true``.
    """
    environments = config.get("environments") or {}
    found = []
    for env, trigger in sorted((config.get("triggers") or {}).items()):
        patterns = (trigger or {}).get("branches" if kind == "branch" else "tags") or []
        if env not in environments or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if is_production(environments[env]) and trigger.get("auto") is not True:
            continue
        found.append(env)
    return found


def is_production(environment):
    """Only the environment's own ``production: true`` says so, never its name."""
    return (environment or {}).get("production") is True


# ---------------------------------------------------------------- once only


def delivery_id(headers):
    for name in DELIVERY_HEADERS:
        value = header(headers, name)
        if value:
            return value[:200]
    return None


def claim_delivery(state_dir, project, keys):
    """
    Claim a delivery by its id and its body digest, atomically; False when
    either was seen before. The body digest stops a replay under a new id of a
    request whose signature was seen on the bus.
    """
    folder = os.path.join(state_dir, "webhook-deliveries", project)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    claimed = []
    for key in keys:
        path = os.path.join(folder, hashlib.sha256(key.encode("utf-8")).hexdigest())
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            forget_delivery(state_dir, project, claimed)
            return False
        claimed.append(key)
    return True


def forget_delivery(state_dir, project, keys):
    """Let a delivery come again (it was refused for a reason that may pass: a lock)."""
    folder = os.path.join(state_dir, "webhook-deliveries", project)
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, hashlib.sha256(key.encode("utf-8")).hexdigest()))


def delivery_keys(headers, body):
    keys = [f"body:{hashlib.sha256(body).hexdigest()}"]
    delivered = delivery_id(headers)
    if delivered:
        keys.insert(0, f"id:{delivered}")
    return keys


# ---------------------------------------------------------------- all together


def read_push(project, body, headers, projects, gitlab_token_sha256=None):
    """
    Everything a deploy needs from a hook request: ``{project, sender, kind, ref,
    full_ref, after, author, envs, delivery, keys}``. Raises Refused (untrusted, malformed) or
    Ignored (a genuine request that asks for no deploy).
    """
    config = check_project(project, projects)
    check_size(body, config, headers)
    sender = verify(headers, body, config, gitlab_token_sha256)
    payload = parse_payload(body, headers)
    kind, ref, full_ref = pushed_ref(sender, headers, payload)
    envs = environments_for(config, kind, ref)
    if not envs:
        raise Ignored(f"no trigger of {project} deploys {kind} {ref!r} (production needs auto: true)")
    return {
        "project": project, "sender": sender, "kind": kind, "ref": ref, "full_ref": full_ref,
        "after": str(payload.get("after") or "").lower() or None,
        "author": pusher(sender, payload) or sender, "envs": envs,
        "delivery": delivery_id(headers), "keys": delivery_keys(headers, body),
    }


# ---------------------------------------------------------------- the command


def handle(opts, project, body, headers, gitlab_token_sha256, deploy):
    """
    ``salt-run release.webhook``: verify the push, claim its delivery, then
    ``deploy(project, env, full_ref, author=..., trigger="webhook",
    expect_commit=after)`` for each environment it maps to: the pushed commit
    under its exact ref, or nothing if a newer push moved the ref meanwhile.
    Refusals are fired and recorded.
    """
    conf = runs.master_settings(opts)
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
    try:
        push = read_push(project, raw, headers or {}, conf["projects"], gitlab_token_sha256)
        if not claim_delivery(conf["state_dir"], project, push["keys"]):
            raise Ignored(f"delivery {push['delivery'] or '(no id)'} was handled before")
    except Refused as exc:
        return refuse(opts, conf, project, exc.reason, str(exc))
    except Ignored as exc:
        return {"result": True, "project": project, "deploys": {}, "comment": str(exc), "retcode": 0}
    deploys = {env: deploy(project, env, push["full_ref"], author=push["author"], trigger="webhook",
                           expect_commit=push["after"])
               for env in push["envs"]}
    if any(ret.get("failed_step") == "lock" for ret in deploys.values()):
        forget_delivery(conf["state_dir"], project, push["keys"])  # a redelivery may deploy
        refuse(opts, conf, project, "locked", "; ".join(r["error"] for r in deploys.values() if r.get("error")),
               record=False)  # deploy() already wrote the history row
    ok = all(ret["result"] for ret in deploys.values())
    return {"result": ok, "project": project, "ref": push["full_ref"], "author": push["author"],
            "delivery": push["delivery"], "deploys": deploys, "retcode": 0 if ok else 1}


def refuse(opts, conf, project, reason, error, record=True):
    """Say no on the bus and in the history; never with the request's headers or secret."""
    name = contract.sanitize_field(project)
    data = {"project": name, "reason": reason, "error": error}
    if record:
        runs.records(conf).record("refused", name, result=False, error=error,
                                  trigger="webhook", details={"reason": reason})
    runs.fire_event(opts, contract.event_tag(name, "webhook", "refused"), data)
    return dict(data, result=False, refused=True, retcode=1)
