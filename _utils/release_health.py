"""
The health check, one way for the conductor and the node: the runner's
``verify`` step asks each node's URL from the master, and ``release.deployed``
(highstate) asks its own node's URL after it switched.

``url`` is the environment's ``health:url`` with ``{host}`` (the node's
``host_grain``, default ``fqdn_ip4[0]``), ``{minion}`` and ``{project}``
filled in. A failed answer is said without a byte of what was served.
Standard library only (synced as ``_utils`` or installed as
``salt_release.utils.release_health``).
"""

import hashlib
import re
import time
import urllib.error
import urllib.request

DEFAULT_HOST_GRAIN = "fqdn_ip4[0]"
HEALTH_INTERVAL_S = 1.0


def grain_value(grains, path):
    """Read ``a:b`` or ``fqdn_ip4[0]`` style paths out of a grains dict."""
    value = grains
    for part in path.split(":"):
        match = re.match(r"^([^\[]+)(?:\[(\d+)\])?$", part)
        if not match or not isinstance(value, dict):
            return None
        value = value.get(match.group(1))
        if match.group(2) is not None:
            index = int(match.group(2))
            value = value[index] if isinstance(value, list) and len(value) > index else None
    return value


def url_for(health, host, minion, project):
    """The health URL of one node."""
    return health["url"].format(host=host, minion=minion, project=project)


def check(health, url, release):
    """:func:`check_health` with an environment's ``health:`` settings."""
    return check_health(
        url, release, health.get("expect", "release"),
        float(health.get("timeout_s", 10)), int(health.get("retries", 3)),
        float(health.get("interval_s", HEALTH_INTERVAL_S)),
    )


def check_health(url, release, expect="release", timeout_s=10, retries=3, interval_s=HEALTH_INTERVAL_S):
    """
    GET ``url`` until it answers as expected or the retries run out; returns
    ``(ok, problem)``. ``expect: release`` passes only when the body or the
    ``X-Release`` header names ``release``; ``ok`` takes any 2xx; anything
    else must appear in the body.
    """
    problem = None
    for attempt in range(max(1, int(retries))):
        if attempt:
            time.sleep(interval_s)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                status, raw = response.status, response.read(65536)
                served = response.headers.get("X-Release") or ""
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problem = f"{url}: {getattr(exc, 'reason', exc)}"
            continue
        body = raw.decode("utf-8", "replace")
        if expect == "ok" or (expect == "release" and (release == served or release in body)):
            return True, None
        if expect not in ("ok", "release") and expect in body:
            return True, None
        problem = health_problem(url, status, raw, release if expect == "release" else expect)
    return False, problem


def health_problem(url, status, raw, wanted):
    """
    Why a health answer failed, without a byte of what was served: a failing
    app may print its config (secrets) into the page, and this text reaches
    the return, the events and the history.
    """
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return f"{url}: HTTP {status}, expected {wanted!r}; body of {len(raw)} bytes (sha256 {digest}...) does not name it"
