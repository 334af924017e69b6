"""Append records, events and statuses of a run to its store, one committed transaction per step."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from diagnostics.errors import StoreError
from diagnostics.store import schema, values, vectors
from diagnostics.store.records import Event, Record, Status, VectorRecord, expand_records

# Rows with the natural key of an existing row replace it (see the class docstring).
_INSERT = {table: schema.insert_sql(table) for table in schema.DATA_TABLES}


def _drop_other_form(conn: sqlite3.Connection, long_rows: list[tuple], vector_rows: list[tuple]) -> None:
    """Before a step is written again: remove the rows its new rows replace but stored in the other form
    (a metric's per-layer values as rows where they are now a vector, or the other way round), so that a
    rewrite replaces rather than duplicates whichever form the first write used."""
    for step, metric, idx, keys, _, source in vector_rows:
        conn.executemany("DELETE FROM series WHERE metric = ? AND key = ? AND step = ? AND idx = ? AND source = ?",
                         [(metric, k, step, idx, source) for k in json.loads(keys)])
    groups = {(r[0], r[1], r[3], r[5]) for r in long_rows if r[2] != "all"}
    conn.executemany("DELETE FROM vectors WHERE step = ? AND metric = ? AND idx = ? AND source = ?", sorted(groups))


def _rows_of(step: int, records: Iterable[Record | VectorRecord], src: str) -> tuple[list[tuple], list[tuple]]:
    """Validated long rows and vector rows of a step's records. A :class:`VectorRecord` becomes its vector
    row directly, unless its rows would not all be one vector row when given as records (fewer than
    ``vectors.MIN_KEYS`` keys, a key twice or ``"all"``, or its metric and index also among the step's
    other records): then all are written as their records would be, so the two forms never mix."""
    records = records if isinstance(records, list) else list(records)
    plain, vecs = values.split_vector_records(records)
    if vecs:
        direct = values.vector_record_rows(step, vecs, src)  # validates every vector record
        taken = {(r.metric, r.index) for r in plain if isinstance(r, Record)}
        ordinary = all(vectors.forms_a_vector(v.keys) and (v.metric, v.index) not in taken for _, v in vecs)
        if not ordinary or len({(v.metric, v.index) for _, v in vecs}) != len(vecs):
            return vectors.split_rows(values.series_rows(step, list(expand_records(records)), src))
    series, vector_rows = vectors.split_rows(values.series_rows(step, plain, src))
    return (series, vector_rows + direct) if vecs else (series, vector_rows)


def _default_versions() -> dict[str, str]:
    # importlib.metadata reads installed distributions without importing them (no torch import here).
    from importlib import metadata

    versions = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for dist in ("training-diagnostics", "numpy", "pandas"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


class RunWriter:
    """Writer of one run's store: ``run_dir/run.sqlite`` (SQLite, WAL mode, schema-versioned).

    Each :meth:`write_step` is one committed transaction, so a killed training process loses at most the
    step in flight. Rows have a natural key that includes the step and the source (``''`` when
    ``source`` is None); writing it again replaces the row. Hence a resumed training loop or a resumed
    checkpoint analysis that rewrites a step never duplicates rows, and two writes of the same step with
    different metrics (before and after the optimizer step) both persist.

    Args:
        run_dir: directory of the run (created if needed), or a path ending in ``.sqlite``.
        name: run name stored as meta ``run_name``; default: the existing name, else the directory name.
        meta: initial metadata (JSON-serialisable values), validated before anything is written.
        resume: append to an existing run. With ``resume=False`` an existing non-empty run is an error.
        overwrite: delete an existing store first and start an empty run.
        clock: returns the current time as Unix seconds (event times, ``created``); for reproducible
            stores. Default :func:`time.time`.

    Raises:
        StoreError: the directory cannot be created or written, the run exists and neither ``resume``
            nor ``overwrite`` is given, a meta value is not JSON-serialisable, the file is not a run store.
        SchemaVersionError: the store was written by a newer version of the package.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        resume: bool = True,
        overwrite: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock or time.time
        self._conn: sqlite3.Connection | None = None
        # One connection, possibly shared with a background writer thread: keep BEGIN..COMMIT atomic.
        self._lock = threading.RLock()
        # The last step written per source (loaded on first use): a step at or below it is a rewrite.
        self._last_step: dict[str, int | None] = {}
        if name is not None and (not isinstance(name, str) or not name):
            raise StoreError(f"run name must be a non-empty str, got {name!r}")
        # Validate metadata first: a bad value must not leave a half-created run behind.
        meta_rows = [(k, values.dumps(v, f"meta[{k!r}]")) for k, v in self._check_meta(meta).items()]

        self.path = schema.database_path(run_dir)
        self.run_dir = self.path.parent
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run directory {self.run_dir}: {exc.strerror or exc}") from exc
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise StoreError(f"run directory {self.run_dir} is not writable; choose another run directory")
        if overwrite:
            self._delete_store()

        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open run store {self.path}: {exc}") from exc
        try:
            schema.configure(conn)
            version = schema.stored_version(conn, self.path)
            if version is not None:
                schema.check_version(version, self.path, writable=True)
            schema.configure_writer(conn, self.path)
            if version is not None and version < schema.SCHEMA_VERSION:
                schema.migrate(conn, version)
            if version is not None and not resume and self._has_data(conn):
                raise StoreError(
                    f"run directory {self.run_dir} already holds a run "
                    f"({self._count_steps(conn)} steps written); choose another run directory, pass "
                    "resume=True to append to it, or overwrite=True to replace it"
                )
            self._conn = conn
            self._initialise(version is None, name, meta_rows)
        except sqlite3.OperationalError as exc:
            conn.close()
            self._conn = None
            raise StoreError(f"cannot write run store {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # -- setup ---------------------------------------------------------------------------------------

    @staticmethod
    def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
        if meta is None:
            return {}
        if not isinstance(meta, Mapping):
            raise StoreError(f"meta must be a dict of JSON-serialisable values, got {type(meta).__name__}")
        for k in meta:
            if not isinstance(k, str) or not k:
                raise StoreError(f"meta keys must be non-empty str, got {k!r}")
        if "schema_version" in meta:
            raise StoreError("meta['schema_version'] is managed by the store; remove it from meta")
        return dict(meta)

    def _delete_store(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            p = Path(str(self.path) + suffix)
            try:
                p.unlink(missing_ok=True)
            except IsADirectoryError:
                shutil.rmtree(p)
            except OSError as exc:
                raise StoreError(f"cannot delete {p} to overwrite the run: {exc.strerror or exc}") from exc

    @staticmethod
    def _has_data(conn: sqlite3.Connection) -> bool:
        return any(
            conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
            for table in schema.DATA_TABLES
        )

    @staticmethod
    def _count_steps(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "SELECT count(*) FROM (SELECT step FROM series UNION SELECT step FROM vectors UNION "
            "SELECT step FROM events UNION SELECT step FROM status)"
        ).fetchone()[0]

    def _initialise(self, new: bool, name: str | None, meta_rows: list[tuple[str, str]]) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Statement by statement: executescript() would commit, and the tables, the defaults and
            # the user's meta must appear together or not at all.
            for statement in schema.schema_statements():
                conn.execute(statement)
            existing = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            defaults = {
                "schema_version": str(schema.SCHEMA_VERSION),
                "run_name": values.dumps(name or self.run_dir.name or "run", "run_name"),
                "created": values.dumps(
                    _dt.datetime.fromtimestamp(self._clock(), _dt.timezone.utc).isoformat(timespec="seconds"),
                    "created",
                ),
                "versions": values.dumps(_default_versions(), "versions"),
            }
            for key, value in defaults.items():
                if key not in existing:
                    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            if name is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('run_name', ?)",
                    (values.dumps(name, "run_name"),),
                )
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta_rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the RunWriter for {self.path} is closed; open a new RunWriter to write")
        return self._conn

    # -- writing -------------------------------------------------------------------------------------

    def set_meta(self, key: str, value: Any) -> None:
        """Set one metadata entry (committed at once). ``value`` must be JSON-serialisable.

        numpy scalars and arrays, tuples and paths are converted; anything else raises StoreError.
        """
        if not isinstance(key, str) or not key:
            raise StoreError(f"meta keys must be non-empty str, got {key!r}")
        if key == "schema_version":
            raise StoreError("meta['schema_version'] is managed by the store and cannot be set")
        text = values.dumps(value, f"meta[{key!r}]")
        conn = self._connection()
        self._run(lambda: conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text)))

    def write_step(
        self,
        step: int,
        records: Iterable[Record | VectorRecord] = (),
        events: Iterable[Event] = (),
        statuses: Iterable[Status] = (),
        source: str | None = None,
    ) -> None:
        """Write one step's records, events and statuses in one committed transaction.

        Everything is validated before the transaction starts, so a bad record writes nothing. Rows with
        the same natural key (step, metric, key, index, source for records) replace earlier ones. When
        ``source`` is given it is also marked as completed (see :meth:`completed_sources`) in the same
        transaction, so a source is listed only if all its rows were committed.

        The records of one metric and index over many keys (per layer) are stored as one vector row
        (:mod:`diagnostics.store.vectors`); the reader gives them back as rows. A :class:`VectorRecord`
        (the same rows in one object) goes to its vector row without a Python object per key.

        Cost: one SQLite transaction: an index entry per stored row (one per vector) and one WAL append of
        the pages they touched.

        Raises:
            StoreError: a record, event or status is invalid (the message names it), the writer is
                closed, or the database cannot be written.
        """
        step = values.check_step(step)
        src = values.check_source(source)
        now = float(self._clock())
        series, vector_rows = _rows_of(step, records, src)
        events_ = values.event_rows(step, events, src, now)
        status_ = values.status_rows(step, statuses, src)
        conn = self._connection()

        def transaction() -> None:
            if self._is_rewrite(conn, step, src):
                _drop_other_form(conn, series, vector_rows)
            # Empty tables are skipped: most steps have no events, and each statement costs microseconds.
            for table, rows in (("series", series), ("vectors", vector_rows), ("events", events_),
                                ("status", status_)):
                if rows:
                    conn.executemany(_INSERT[table], rows)
            if src:
                conn.execute(_INSERT["sources"], (src, step, now))

        self._run(transaction)
        last = self._last_step.get(src)
        self._last_step[src] = step if last is None else max(last, step)

    def _is_rewrite(self, conn: sqlite3.Connection, step: int, src: str) -> bool:
        """Whether ``step`` of ``src`` may already have rows (it is not after the last step written)."""
        if src not in self._last_step:
            self._last_step[src] = conn.execute(
                "SELECT max(s) FROM (SELECT max(step) AS s FROM series WHERE source = ? UNION ALL "
                "SELECT max(step) FROM vectors WHERE source = ? UNION ALL SELECT max(step) FROM status "
                "WHERE source = ?)", (src, src, src)).fetchone()[0]
        last = self._last_step[src]
        return last is not None and step <= last

    def _run(self, body: Callable[[], Any]) -> None:
        with self._lock:
            self._run_locked(body)

    def _run_locked(self, body: Callable[[], Any]) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write run store {self.path}: {exc}") from exc
        try:
            body()
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write run store {self.path}: {exc}") from exc
            raise

    # -- queries and lifetime --------------------------------------------------------------------------

    def completed_sources(self) -> set[str]:
        """Return the sources (checkpoint paths) whose steps were fully committed; for resuming."""
        return {r[0] for r in self._connection().execute("SELECT source FROM sources")}

    @property
    def name(self) -> str:
        """The run's name (meta ``run_name``)."""
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'run_name'").fetchone()
        return json.loads(row[0])

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    def close(self) -> None:
        """Close the database (idempotent). The store stays readable; WAL files are checkpointed."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"RunWriter({str(self.run_dir)!r}, {state})"

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


__all__ = ["RunWriter"]
