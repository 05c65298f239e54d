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

When several environments' targets match one minion, the most recently
recorded release wins: it is the last one a good deploy put on that node.

Master configuration::

    ext_pillar:
      - release_fleet: {}

Install it with ``salt-run saltutil.sync_all`` (from ``_pillar`` in file_roots)
or ``pip install salt-release``.
"""

import logging

import salt.utils.minions

import release_published as published

log = logging.getLogger(__name__)

__virtualname__ = "release_fleet"


def __virtual__():
    return __virtualname__


def ext_pillar(minion_id, pillar, *args, **kwargs):
    conf = __opts__.get("release") or {}
    state_dir = conf.get("state_dir")
    if not state_dir:
        return {}
    fleet = {}
    for project, config in sorted((conf.get("projects") or {}).items()):
        record = _latest_matching(minion_id, config, published.fleet_releases(state_dir, project))
        if record:
            fleet[project] = {k: record.get(k) for k in ("env", "release", "source", "source_hash")}
    return {"release_fleet": fleet} if fleet else {}


def _latest_matching(minion_id, config, records):
    environments = (config or {}).get("environments") or {}
    matching = [
        record for env, record in records.items()
        if env in environments and _targets(minion_id, environments[env])
    ]
    return max(matching, key=lambda r: r.get("recorded_at") or "", default=None)


def _targets(minion_id, environment):
    checker = salt.utils.minions.CkMinions(__opts__)
    try:
        found = checker.check_minions(environment["target"], environment.get("tgt_type", "glob"))
    except Exception as exc:  # noqa: BLE001  A target this master cannot evaluate must not break every node's pillar.
        log.warning("release_fleet: cannot evaluate target %r: %s", environment.get("target"), exc)
        return False
    return minion_id in found.get("minions", [])
