"""
ext_pillar: each node's fleet release, so highstate knows what to run.

After a good deploy the runner records which release the environment runs
(``<state_dir>/fleet/<project>/<env>.json``). This pillar gives every minion,
for each project, the record of the environment whose target matches it (the
same target the runner deploys to), under ``release_fleet:<project>``::

    release_fleet:
      rainbow:
        env: test
        release: rainbow_test_1.1.0_master_2026-11-26_101500_alice
        source: salt://releases/rainbow/rainbow_test_..._alice.tar.gz
        source_hash: sha256=...
        health: {url: 'http://{host}:8080/health', expect: release}   # when the environment has one
        host_grain: fqdn_ip4[0]

When several environments' targets match one minion, the most recently
recorded release wins: it is the last one a good deploy put on that node.
While a deploy or rollback of that environment holds its lock, the entry
also says ``locked: true`` and the lock's ``fence``: ``release.deployed``
then changes nothing (the runner owns the node until it is done). With
``store: postgresql://...`` the lock is the database's session lock, seen
from every master of the database (``release_pglock``); a database this
master cannot reach counts as locked (highstate waits rather than racing a
deploy it cannot see).

Master configuration::

    ext_pillar:
      - release_fleet: {}

Install it with ``salt-run saltutil.sync_all`` (from ``_pillar`` in file_roots)
or ``pip install salt-release``.
"""

import logging

import salt.utils.minions

import release_health as health_lib
import release_pglock as pglock
import release_published as published
import release_settings as settings

log = logging.getLogger(__name__)

__virtualname__ = "release_fleet"


def __virtual__():
    return __virtualname__


def ext_pillar(minion_id, pillar, *args, **kwargs):
    conf = settings.master(__opts__)
    for project, error in conf["errors"].items():
        log.warning("release_fleet: project %s left out: %s", project, error)
    fleet = {}
    for project, config in conf["projects"].items():
        records = published.published_releases(conf["state_dir"], project)
        record = _latest_matching(minion_id, config, records)
        if record:
            fleet[project] = {k: record.get(k) for k in ("env", "release", "source", "source_hash")}
            fleet[project].update(_health(config["environments"][record["env"]]))
            fleet[project].update(_in_progress(conf, project, record["env"]) or {})
    return {"release_fleet": fleet} if fleet else {}


def _health(environment):
    """The environment's health check, for ``release.deployed`` to run on the node after it switched."""
    if not environment.get("health"):
        return {}
    return {"health": dict(environment["health"]),
            "host_grain": environment.get("host_grain", health_lib.DEFAULT_HOST_GRAIN)}


def _in_progress(conf, project, env):
    """The deploy lock of project+env as the configured store keeps it (a file, or PostgreSQL's session lock)."""
    if not str(conf["store"]).startswith(("postgresql://", "postgres://")):
        return published.deploy_in_progress(conf["state_dir"], project, env)
    try:
        return pglock.deploy_in_progress(conf["store"], project, env)
    except Exception as exc:  # noqa: BLE001  psycopg2's errors: said without the URL (it may hold a password)
        log.warning("release_fleet: cannot read the deploy lock of %s/%s: %s", project, env, type(exc).__name__)
        return {"locked": True, "fence": None}


def _latest_matching(minion_id, config, records):
    environments = config["environments"]
    matching = [
        record for env, record in records.items()
        if env in environments and _targets(minion_id, environments[env])
    ]
    return max(matching, key=lambda r: r.get("recorded_at") or "", default=None)


def _targets(minion_id, environment):
    """Whether any of the environment's waves names the minion."""
    checker = salt.utils.minions.CkMinions(__opts__)
    for wave in environment["waves"]:
        try:
            found = checker.check_minions(wave["target"], wave["tgt_type"])
        except Exception as exc:  # noqa: BLE001  A target this master cannot evaluate must not break every node's pillar.
            log.warning("release_fleet: cannot evaluate target %r: %s", wave["target"], exc)
            continue
        if minion_id in found.get("minions", []):
            return True
    return False
