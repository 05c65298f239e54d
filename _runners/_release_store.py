"""
Master side: the records of every deploy, rollback, unlock and refused
attempt, in an embedded SQLite database under ``<state_dir>/history.db``.

Rows are written as a run goes (the run row first, each node phase as it
ends, the outcome last), so a crash leaves a truthful partial record: a run
whose ``result`` is NULL never finished.
"""

import contextlib
import datetime
import json
import os
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,            -- deploy, rollback, unlock, refused, ...
    project TEXT NOT NULL,
    env TEXT,
    trigger TEXT,                  -- cli, webhook, highstate, ci, ...
    who TEXT,
    jid TEXT,
    ref TEXT,
    "commit" TEXT,
    release TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    duration_s REAL,
    result INTEGER,                -- NULL while running (or after a crash)
    error TEXT,
    details TEXT                   -- JSON
);
CREATE INDEX IF NOT EXISTS runs_project_env ON runs (project, env, started_at);
CREATE TABLE IF NOT EXISTS phases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    minion TEXT NOT NULL,
    phase TEXT NOT NULL,
    started_at TEXT NOT NULL,
    duration_s REAL,
    result INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS phases_run ON phases (run_id);
CREATE TABLE IF NOT EXISTS bad_releases (
    project TEXT NOT NULL,
    env TEXT NOT NULL,
    release TEXT NOT NULL,
    run_id INTEGER REFERENCES runs (id),  -- the rollback that left it
    marked_at TEXT NOT NULL,
    PRIMARY KEY (project, env, release)
);
"""


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """The history database; every call opens, writes and commits on its own."""

    def __init__(self, state_dir):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "history.db")
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def start_run(self, kind, project, env=None, trigger="cli", who=None, jid=None, ref=None):
        with self._db() as db:
            cursor = db.execute(
                "INSERT INTO runs (kind, project, env, trigger, who, jid, ref, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, project, env, trigger, who, jid, ref, now()),
            )
            return cursor.lastrowid

    def update_run(self, run_id, **fields):
        allowed = {"commit", "release", "ref", "details"}
        fields = {k: v for k, v in fields.items() if k in allowed}
        if not fields:
            return
        if "details" in fields:
            fields["details"] = json.dumps(fields["details"], sort_keys=True)
        assignments = ", ".join(f'"{k}" = ?' for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))

    def node_phase(self, run_id, minion, phase, started_at, duration_s, result, error=None):
        with self._db() as db:
            db.execute(
                "INSERT INTO phases (run_id, minion, phase, started_at, duration_s, result, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, minion, phase, started_at, duration_s, int(bool(result)), error),
            )

    def finish_run(self, run_id, result, duration_s, error=None, details=None):
        with self._db() as db:
            db.execute(
                "UPDATE runs SET result = ?, duration_s = ?, error = ?, finished_at = ?,"
                " details = COALESCE(?, details) WHERE id = ?",
                (int(bool(result)), duration_s, error, now(),
                 json.dumps(details, sort_keys=True) if details is not None else None, run_id),
            )

    def record(self, kind, project, env=None, result=False, error=None, **fields):
        """A run that is over as soon as it starts: an unlock, a refused webhook."""
        run_id = self.start_run(kind, project, env, fields.get("trigger", "cli"),
                                fields.get("who"), fields.get("jid"), fields.get("ref"))
        self.finish_run(run_id, result, 0.0, error, fields.get("details"))
        return run_id

    def runs(self, project, env=None, limit=20, kinds=None, since=None):
        """Newest first; ``since`` (an ISO UTC time) keeps runs started at or after it."""
        query = "SELECT * FROM runs WHERE project = ?"
        params = [project]
        if env:
            query += " AND env = ?"
            params.append(env)
        if kinds:
            query += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            params.extend(kinds)
        if since:
            query += " AND started_at >= ?"
            params.append(since)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(int(limit))
        with self._db() as db:
            return [dict(row) for row in db.execute(query, params)]

    def phases(self, run_id):
        with self._db() as db:
            return [
                dict(row)
                for row in db.execute("SELECT * FROM phases WHERE run_id = ? ORDER BY id", (run_id,))
            ]

    def mark_bad(self, project, env, releases, run_id):
        """Releases a rollback left: no default rollback picks them, deploying their commit needs force."""
        with self._db() as db:
            for release in releases:
                db.execute("DELETE FROM bad_releases WHERE project = ? AND env = ? AND release = ?",
                           (project, env, release))
                db.execute("INSERT INTO bad_releases (project, env, release, run_id, marked_at)"
                           " VALUES (?, ?, ?, ?, ?)", (project, env, release, run_id, now()))

    def clear_bad(self, project, env, release):
        with self._db() as db:
            db.execute("DELETE FROM bad_releases WHERE project = ? AND env = ? AND release = ?",
                       (project, env, release))

    def bad_releases(self, project, env):
        """``{release: commit}`` of the releases marked bad in ``env`` (commit None when unknown)."""
        with self._db() as db:
            rows = db.execute(
                'SELECT b.release, MAX(r."commit") AS "commit" FROM bad_releases b'
                " LEFT JOIN runs r ON r.release = b.release AND r.kind = 'deploy'"
                " WHERE b.project = ? AND b.env = ? GROUP BY b.release",
                (project, env),
            )
            return {row["release"]: row["commit"] for row in rows}
