"""
Master side: the records of every deploy, rollback, recovery, unlock and
refused attempt, and (with PostgreSQL) the deploy lock both masters share.

``release:store`` picks the database: ``sqlite`` (the default, embedded, under
``<state_dir>/history.db``) or a ``postgresql://`` URL that several masters
share. The SQL below is written once; a small dialect says how each database
connects, numbers rows and spells parameters.

Rows are written as a run goes (the run row first, each node phase as it
ends, the outcome last), so a crash leaves a truthful partial record: a run
whose ``result`` is NULL never finished. Before its first switch a run also
writes its journal (each node's target and previous release) into
``details``, which is what ``release.recover`` reads.
"""

import contextlib
import datetime
import json
import os
import re
import sqlite3
import time

import _release_lock as locking
import release_pglock as pglock

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id {serial},
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
    id {serial},
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


PG_LOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS locks (
    project TEXT NOT NULL,
    env TEXT NOT NULL,
    token TEXT NOT NULL,
    owner TEXT NOT NULL,           -- JSON: who, where, since, why, fence
    PRIMARY KEY (project, env)
);
CREATE SEQUENCE IF NOT EXISTS lock_fence;
"""


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def details(row):
    """A run row's ``details`` JSON as a dict ({} when absent or not an object)."""
    try:
        found = json.loads(row.get("details") or "{}")
    except (TypeError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


class SqliteDialect:
    """The embedded default: one file per master, the file lock beside it."""

    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    param = "?"

    def __init__(self, state_dir):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)  # also an older, wider state_dir: it holds builds and history
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "history.db")
        self._private_files()

    def _private_files(self):
        """
        history.db 0600 before sqlite opens it: sqlite gives its -journal, -wal
        and -shm files the database's mode. Older, wider files are narrowed.
        """
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.path + suffix, 0o600, follow_symlinks=False)

    def connect(self):
        return sqlite3.connect(self.path, timeout=30)

    def create(self, db, schema):
        db.executescript(schema)

    def locks(self):
        return locking.FileLocks(self.state_dir)


class PostgresDialect:
    """A PostgreSQL database several masters share: records and the deploy lock."""

    serial = "BIGSERIAL PRIMARY KEY"
    param = "%s"

    def __init__(self, url):
        import psycopg2  # pylint: disable=import-outside-toplevel  # only masters that use it need it

        self.url, self.driver = url, psycopg2

    def connect(self):
        return self.driver.connect(self.url)

    def create(self, db, schema):
        with db.cursor() as cursor:
            # Two masters starting at once would race on CREATE ... IF NOT EXISTS.
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("schema"),))
            cursor.execute(schema + PG_LOCK_SCHEMA)

    def locks(self):
        return SessionLocks(self)


def dialect_for(state_dir, backend):
    backend = backend or "sqlite"
    if backend == "sqlite":
        return SqliteDialect(state_dir)
    if backend.startswith(("postgresql://", "postgres://")):
        return PostgresDialect(backend)
    raise ValueError(f"release:store must be 'sqlite' or a postgresql:// URL, not {safe_url(backend)!r}")


USERINFO = re.compile(r"(\w+://)[^\s/?#]*@")
PASSWORD_PARAM = re.compile(r"\b((?:ssl)?pass(?:word|wd)?)\s*=\s*('[^']*'|[^&\s'\"]*)", re.IGNORECASE)


def safe_url(text):
    """
    A store URL, or any text that may hold one (a driver's error), fit for a
    return, event, log or history row: no ``user:password@`` and no
    ``password=`` parameter (URL query or libpq key=value).
    """
    return PASSWORD_PARAM.sub(r"\1=***", USERINFO.sub(r"\1", str(text)))


advisory_key = pglock.advisory_key  # the ext_pillar probes the same lock


class Store:
    """The history database; every call opens, writes and commits on its own."""

    def __init__(self, state_dir, backend="sqlite"):
        self.dialect = dialect_for(state_dir, backend)
        with self._db() as db:
            self.dialect.create(db, SCHEMA.format(serial=self.dialect.serial))

    @contextlib.contextmanager
    def _db(self):
        db = self.dialect.connect()
        try:
            with db:  # one transaction, committed on success (both drivers)
                yield db
        finally:
            db.close()

    def _query(self, sql, params=(), db=None):
        """Run one statement (written with ``?``); returns its rows as dicts."""
        if db is None:
            with self._db() as db:
                return self._query(sql, params, db)
        cursor = db.cursor()  # sqlite3 cursors are no context managers
        try:
            cursor.execute(sql.replace("?", self.dialect.param), tuple(params))
            return _rows(cursor)
        finally:
            cursor.close()

    def locks(self):
        """The deploy lock that goes with this store (file lock or PostgreSQL session lock)."""
        return self.dialect.locks()

    def start_run(self, kind, project, env=None, trigger="cli", who=None, jid=None, ref=None):
        [row] = self._query(
            "INSERT INTO runs (kind, project, env, trigger, who, jid, ref, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (kind, project, env, trigger, who, jid, ref, now()),
        )
        return row["id"]

    def update_run(self, run_id, **fields):
        allowed = {"commit", "release", "ref", "details"}
        fields = {k: v for k, v in fields.items() if k in allowed}
        if not fields:
            return
        if "details" in fields:
            fields["details"] = json.dumps(fields["details"], sort_keys=True)
        assignments = ", ".join(f'"{k}" = ?' for k in fields)
        self._query(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))

    def node_phase(self, run_id, minion, phase, started_at, duration_s, result, error=None):
        self._query(
            "INSERT INTO phases (run_id, minion, phase, started_at, duration_s, result, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, minion, phase, started_at, duration_s, int(bool(result)), error),
        )

    def finish_run(self, run_id, result, duration_s, error=None, details=None):
        self._query(
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
        return self._query(query, params)

    def phases(self, run_id):
        return self._query("SELECT * FROM phases WHERE run_id = ? ORDER BY id", (run_id,))

    def mark_bad(self, project, env, releases, run_id):
        """Releases a rollback left: no default rollback picks them, deploying their commit needs force."""
        with self._db() as db:
            for release in releases:
                self._query("DELETE FROM bad_releases WHERE project = ? AND env = ? AND release = ?",
                            (project, env, release), db)
                self._query("INSERT INTO bad_releases (project, env, release, run_id, marked_at)"
                            " VALUES (?, ?, ?, ?, ?)", (project, env, release, run_id, now()), db)

    def clear_bad(self, project, env, release):
        self._query("DELETE FROM bad_releases WHERE project = ? AND env = ? AND release = ?",
                    (project, env, release))

    def bad_releases(self, project, env):
        """``{release: commit}`` of the releases marked bad in ``env`` (commit None when unknown)."""
        rows = self._query(
            'SELECT b.release, MAX(r."commit") AS "commit" FROM bad_releases b'
            " LEFT JOIN runs r ON r.release = b.release AND r.kind = 'deploy'"
            " WHERE b.project = ? AND b.env = ? GROUP BY b.release",
            (project, env),
        )
        return {row["release"]: row["commit"] for row in rows}


class SessionLocks:
    """
    The deploy lock in PostgreSQL, shared by every master on the database: a
    session advisory lock on the project+env key, held by a connection the
    holder keeps open for the whole run, plus a ``locks`` row (unique per
    project+env) saying who holds it. A holder that dies loses its session
    and so the advisory lock; its row stays as the record of a dead holder,
    which the next taker replaces (and reports as taken over).
    """

    def __init__(self, dialect):
        self.dialect = dialect
        self.sessions = {}  # token -> the connection that holds the advisory lock

    def acquire(self, project, env, user, jid, reason, wait_s=0, poll_s=0.5):
        session = self.dialect.connect()
        session.autocommit = True
        key = advisory_key("lock", project, env)
        deadline = time.monotonic() + float(wait_s or 0)
        try:
            while not self._fetch(session, "SELECT pg_try_advisory_lock(%s) AS got", (key,))[0]["got"]:
                if time.monotonic() >= deadline:
                    raise locking.LockHeld(self.read(project, env) or locking.unknown_owner())
                time.sleep(poll_s)
            dead = self.read(project, env)
            owner = locking.new_owner(user, jid, reason)
            owner["fence"] = self._fetch(session, "SELECT nextval('lock_fence') AS fence")[0]["fence"]
            self._fetch(
                session,
                "INSERT INTO locks (project, env, token, owner) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (project, env) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner",
                (project, env, owner["token"], json.dumps(owner)),
            )
        except BaseException:
            session.close()
            raise
        if dead:
            owner["took_over"] = dead
        self.sessions[owner["token"]] = session
        return owner

    def release(self, project, env, token):
        """Drop our row and our session (which frees the advisory lock); True when it was ours."""
        session = self.sessions.pop(token, None)
        if session is None:
            return False
        try:
            gone = self._fetch(session, "DELETE FROM locks WHERE project = %s AND env = %s AND token = %s"
                                        " RETURNING token", (project, env, token))
        finally:
            session.close()
        return bool(gone)

    def read(self, project, env):
        with contextlib.closing(self.dialect.connect()) as db:
            rows = self._fetch(db, "SELECT owner FROM locks WHERE project = %s AND env = %s", (project, env))
            db.commit()
        return json.loads(rows[0]["owner"]) if rows else None

    def remove(self, project, env):
        """Delete the row whoever wrote it; a live holder keeps its session lock all the same."""
        holder = self.read(project, env)
        with contextlib.closing(self.dialect.connect()) as db:
            self._fetch(db, "DELETE FROM locks WHERE project = %s AND env = %s", (project, env))
            db.commit()
        return holder

    def holder_alive(self, project, env, owner, ttl_s):
        """Certain, on any master: the holder is alive exactly while its session holds the advisory lock."""
        with contextlib.closing(self.dialect.connect()) as db:
            db.autocommit = True
            return pglock.held(db, advisory_key("lock", project, env))

    @staticmethod
    def _fetch(db, sql, params=()):
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            return _rows(cursor)


def _rows(cursor):
    """The rows of the last statement as dicts (none for a statement that returns nothing)."""
    if cursor.description is None:
        return []
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
