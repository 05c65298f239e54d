"""
Master side of node configuration: before any node installs anything, every
node refreshes its pillar and renders its files in a dry run
(``release_config.check``). A node that cannot (a pillar that failed to
render, an undecryptable secret, a Jinja error, a bad path) stops the deploy
while every node is still untouched.

What comes back is file names, sha256 and a status per file, never contents.
"""

import _release_fleet as fleet

REFRESH_TIMEOUT_S = 60


def preflight(opts, minions, project, name, source_url, sha256, env, timeout_s, delta_offer=None, keep=True):
    """
    ``{minion: (ok, value)}`` as ``fleet.run_on`` gives it, for the check of
    each node; with ``delta_offer`` nodes that have its base fetch only the delta.
    ``keep=False`` (a dry run: no install follows) leaves nothing staged on the nodes.
    """
    # Install renders from the minion's in-memory pillar: refresh it first so the
    # dry run and the install see the same, current pillar.
    refreshed = fleet.run_on(opts, minions, "saltutil.refresh_pillar", kwarg={"wait": True},
                             timeout_s=REFRESH_TIMEOUT_S)
    checked = fleet.run_on(
        opts, [m for m in minions if refreshed[m][0]], "release_config.check",
        arg=[project, name],
        kwarg={"source": source_url, "source_hash": sha256, "env": env, **(delta_offer or {}),
               **({} if keep else {"keep": False})},
        timeout_s=timeout_s,
    )
    return {m: checked.get(m) or (False, f"pillar refresh failed: {refreshed[m][1]}") for m in minions}


def summary(files):
    """One progress line for a node's files: ``config/db.php changed (sha256 1a2b3c4d5e6f)``."""
    if not files:
        return "no config files"
    return ", ".join(
        f"{path} {entry['status']}" + (f" (sha256 {entry['sha256'][:12]})" if entry["sha256"] else "")
        for path, entry in sorted(files.items())
    )
