"""
The PostgreSQL deploy lock as anyone on a master can see it: the advisory
key of a project+env, and whether a deploy holds it now. The runner's store
(``_release_store.SessionLocks``) takes and frees the lock; the
``release_fleet`` ext_pillar asks :func:`deploy_in_progress` so that
``release.deployed`` refuses during a deploy on any master of the database.

psycopg2 is imported only when a PostgreSQL store is configured (minions get
this file by sync and never call it).
"""

import contextlib
import hashlib
import json


def advisory_key(*parts):
    """A stable signed 64-bit key for pg_advisory_lock from text."""
    digest = hashlib.sha256("/".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def held(db, key):
    """
    Whether a session holds the advisory lock ``key`` (on an autocommit
    connection ``db``). Probing takes the lock for an instant when it is free
    and frees it at once: a deploy starting in that instant waits for it
    like for any other holder.
    """
    with db.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        if not cursor.fetchone()[0]:
            return True
        cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
    return False


def deploy_in_progress(url, project, env):
    """``{"locked": True, "fence": <n>}`` while a live session holds the project+env lock, else None."""
    import psycopg2  # pylint: disable=import-outside-toplevel

    with contextlib.closing(psycopg2.connect(url)) as db:
        db.autocommit = True
        if not held(db, advisory_key("lock", project, env)):
            return None
        with db.cursor() as cursor:
            cursor.execute("SELECT owner FROM locks WHERE project = %s AND env = %s", (project, env))
            row = cursor.fetchone()
    owner = _owner(row[0]) if row else {}
    return {"locked": True, "fence": owner.get("fence")}


def _owner(raw):
    try:
        found = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
