"""The on-disk layout of a run store: one SQLite file, its tables, its schema version and connections.

Layout (schema version 2)::

    meta(key TEXT PRIMARY KEY, value TEXT)              value is JSON
    series(step, metric, key, idx, value, source)       long format, one row per scalar
    vectors(step, metric, idx, keys, data, source)      one metric's values over many keys at a step
    events(step, kind, severity, metric, key, message, data, time, source)
    status(step, diagnostic, status, reason, seconds, num_matvecs, source)
    sources(source TEXT PRIMARY KEY, step, time)        inputs (checkpoints) fully analysed

``vectors`` holds what would be many ``series`` rows of one metric and index at one step (a value per
layer): ``keys`` is a JSON list and ``data`` the float64 values in that order (little-endian; NaN and
infinities as they are). See :mod:`diagnostics.store.vectors` for which rows go there; the reader expands
them into the long format. Version 1 had no ``vectors`` table; the reader reads version 1 stores as they
are, and a writer that resumes one adds the table.

``source`` is ``''`` for rows written without a source (the in-loop Monitor) and otherwise names the
input that produced the row (a checkpoint path). Each data table has a unique natural key that includes
``source``; writes are ``INSERT OR REPLACE`` on it, so writing the same step again (a resumed analysis,
a resumed training loop) replaces rows instead of duplicating them.

Non-finite values: SQLite has no NaN (binding a NaN stores NULL) but stores IEEE +inf and -inf as REAL.
``series.value`` is therefore NULL exactly when the value was NaN (a record always carries a number) and
the reader turns NULL back into NaN; infinities are stored as they are.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from diagnostics.errors import SchemaVersionError, StoreError

#: Version of the table layout written by this package. Bump it (and add a migration) on any change.
SCHEMA_VERSION = 2

#: The oldest schema version the reader reads without migrating it (later versions only added tables).
READABLE_FROM = 1

#: File name of the database inside a run directory.
DB_FILENAME = "run.sqlite"

_VECTORS_SQL = [
    """CREATE TABLE IF NOT EXISTS vectors (
    step   INTEGER NOT NULL,
    metric TEXT    NOT NULL,
    idx    INTEGER NOT NULL,
    keys   TEXT    NOT NULL,
    data   BLOB    NOT NULL,
    source TEXT    NOT NULL DEFAULT ''
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS vectors_by_metric ON vectors (metric, step, idx, source)",
]

# Each entry migrates a store from version v to v + 1 inside one transaction; a store claiming a version
# older than the first is refused.
MIGRATIONS: dict[int, list[str]] = {1: _VECTORS_SQL}

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    step   INTEGER NOT NULL,
    metric TEXT    NOT NULL,
    key    TEXT    NOT NULL,
    idx    INTEGER NOT NULL,
    value  REAL,
    source TEXT    NOT NULL DEFAULT ''
);
-- Serves the reader's (metric, key) filters ordered by step, and is the natural key of a row.
CREATE UNIQUE INDEX IF NOT EXISTS series_by_metric ON series (metric, key, step, idx, source);
CREATE TABLE IF NOT EXISTS events (
    step     INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    severity TEXT    NOT NULL,
    metric   TEXT,
    key      TEXT,
    message  TEXT    NOT NULL,
    data     TEXT    NOT NULL,
    time     REAL    NOT NULL,
    source   TEXT    NOT NULL DEFAULT ''
);
-- NULLs are distinct in a unique index, hence coalesce: an event without a metric is still one event.
CREATE UNIQUE INDEX IF NOT EXISTS events_key
    ON events (step, source, kind, coalesce(metric, ''), coalesce(key, ''), message);
CREATE TABLE IF NOT EXISTS status (
    step        INTEGER NOT NULL,
    diagnostic  TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    reason      TEXT,
    seconds     REAL    NOT NULL,
    num_matvecs INTEGER,
    source      TEXT    NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS status_key ON status (step, diagnostic, source);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    step   INTEGER NOT NULL,
    time   REAL    NOT NULL
);
""" + "".join(f"{statement};\n" for statement in _VECTORS_SQL)

#: Columns of each data table, in the order rows are written and copied.
COLUMNS: dict[str, tuple[str, ...]] = {
    "series": ("step", "metric", "key", "idx", "value", "source"),
    "events": ("step", "kind", "severity", "metric", "key", "message", "data", "time", "source"),
    "status": ("step", "diagnostic", "status", "reason", "seconds", "num_matvecs", "source"),
    "sources": ("source", "step", "time"),
    "vectors": ("step", "metric", "idx", "keys", "data", "source"),
}
DATA_TABLES = tuple(COLUMNS)


def insert_sql(table: str, conflict: str = "REPLACE") -> str:
    """Return ``INSERT OR <conflict>`` of one row of all of ``table``'s columns (``?`` placeholders)."""
    cols = COLUMNS[table]
    return f"INSERT OR {conflict} INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"


def database_path(path: str | os.PathLike[str]) -> Path:
    """Resolve a run directory or a database file to the database file's path (which may not exist)."""
    p = Path(path).expanduser()
    if p.is_dir() or p.suffix != ".sqlite":
        return p / DB_FILENAME
    return p


def configure(conn: sqlite3.Connection) -> None:
    """Set the pragmas every connection to a run store uses."""
    # Another process (a reader, a second rank, a resumed writer) may hold the lock for a moment.
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = OFF")


def configure_writer(conn: sqlite3.Connection, path: Path) -> None:
    """Put a writable connection into WAL mode with NORMAL synchronisation.

    Durability: in WAL mode a commit appends the transaction to the ``-wal`` file with write(2) before
    COMMIT returns. With ``synchronous=NORMAL`` the WAL is fsync'ed only at checkpoints, so a committed
    transaction may sit in the operating system's page cache; that survives the death of the writing
    process (SIGKILL, OOM killer, a crash in the training loop), so such a crash loses at most the
    transaction in flight, which SQLite rolls back on the next open. Only an operating-system crash or
    power loss can lose the last few commits, and even then the database stays consistent. FULL would add
    an fsync per monitored step for no gain against process crashes.
    """
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(
            f"cannot put run store {path} into WAL mode (got {mode!r}); is it on a network file system? "
            "Use a local directory for the run."
        )
    conn.execute("PRAGMA synchronous = NORMAL")


def schema_statements() -> list[str]:
    """Return the CREATE statements of every table and index (each idempotent), to run in a transaction."""
    lines = [line for line in SCHEMA_SQL.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def stored_version(conn: sqlite3.Connection, path: Path) -> int | None:
    """Return the schema version recorded in ``meta``, or None for an empty database.

    Raises:
        StoreError: the file is not SQLite, or holds tables but no run-store metadata.
    """
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a run store (not a readable SQLite database: {exc})") from exc
    if not tables:
        return None
    if "meta" not in tables:
        raise StoreError(
            f"{path} is an SQLite database but not a training-diagnostics run store (no meta table)"
        )
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise StoreError(f"{path} has no schema_version in its meta table; it is not a run store")
    try:
        return int(row[0])
    except ValueError as exc:
        raise StoreError(f"{path} has an unreadable schema_version {row[0]!r}") from exc


def check_version(version: int, path: Path, *, writable: bool) -> None:
    """Refuse a store this package cannot read (newer) or cannot migrate (older).

    Raises:
        SchemaVersionError: the store's schema is newer than :data:`SCHEMA_VERSION`.
        StoreError: the schema is older and no migration exists.
    """
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"run store {path} has schema version {version}, but this training-diagnostics understands "
            f"schema version {SCHEMA_VERSION} at most; upgrade the package "
            "(pip install -U training-diagnostics) to read it"
        )
    if version < SCHEMA_VERSION and any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
        raise StoreError(
            f"run store {path} has schema version {version}, which this training-diagnostics (schema "
            f"{SCHEMA_VERSION}) cannot migrate; open it with the package version that wrote it and export it"
        )
    if version < READABLE_FROM and not writable:
        raise StoreError(
            f"run store {path} has the old schema version {version}; open it once with RunWriter(..., "
            f"resume=True) to migrate it to version {SCHEMA_VERSION}"
        )


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Apply the migrations from ``version`` up to :data:`SCHEMA_VERSION` in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for v in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[v]:
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
