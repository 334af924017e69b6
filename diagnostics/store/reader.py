"""Read run stores into tidy pandas DataFrames: one run (:class:`Run`) or several (:class:`Runs`)."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from diagnostics.errors import StoreError
from diagnostics.store import schema, vectors

SERIES_COLUMNS = ["run", "step", "metric", "key", "index", "value", "source"]
EVENT_COLUMNS = ["run", "step", "kind", "severity", "metric", "key", "message", "data", "time", "source"]
STATUS_COLUMNS = ["run", "step", "diagnostic", "status", "reason", "seconds", "num_matvecs", "source"]
SOURCE_COLUMNS = ["run", "source", "step", "time"]
TABLES = ("series", "events", "status", "sources")
FORMATS = ("csv", "parquet")


def _filter(column: str, value: str | Sequence[str] | None) -> tuple[str, list[str]]:
    """Return an SQL condition and its parameters for ``column`` equal to one of ``value``."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return f"{column} = ?", [value]
    items = list(value)
    if not all(isinstance(v, str) for v in items):
        raise StoreError(f"{column} filter must be a str or a list of str, got {value!r}")
    if not items:
        return "0", []
    return f"{column} IN ({', '.join('?' * len(items))})", items


def _connect_read_only(db: Path) -> sqlite3.Connection:
    """Open ``db`` read-only, also while another process writes it.

    A WAL database opened with ``mode=ro`` needs its ``-shm`` index, which a read-only connection cannot
    create; that works whenever the writer is alive (it keeps ``-shm``) or the directory is writable
    (SQLite creates it). For a finished run in a read-only directory, fall back to ``immutable=1``,
    which is safe there because nobody can be writing.
    """
    uri = db.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        schema.configure(conn)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        if os.access(db.parent, os.W_OK):
            raise
    conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
    schema.configure(conn)
    return conn


def _text_or_none(df: pd.DataFrame, column: str, *, empty_is_none: bool = False) -> None:
    """Make ``column`` an object column whose missing values are None.

    pandas 3 infers a string dtype that turns None into NaN; object dtype keeps None on every pandas.
    ``empty_is_none`` maps the stored '' (no source) to None.
    """
    values = [v if isinstance(v, str) and (v or not empty_is_none) else None for v in df[column].tolist()]
    df[column] = pd.Series(values, index=df.index, dtype=object)


class _Tables:
    """Table access by name and export, shared by :class:`Run` and :class:`Runs`."""

    def table(self, name: str) -> pd.DataFrame:
        """Return one table by name: ``"series"``, ``"events"``, ``"status"`` or ``"sources"``."""
        if name not in TABLES:
            raise StoreError(f"unknown table {name!r}; choose one of {TABLES}")
        return getattr(self, name)()

    def export(self, path: str | os.PathLike[str], format: str = "csv", *, table: str = "series") -> Path:
        """Write one table to a CSV or Parquet file (see :func:`export_frame`). Returns the path written."""
        return export_frame(self.table(table), path, format)


class Run(_Tables):
    """A run store opened read-only. Every query reads the latest committed data, so a run that is
    still being written can be followed by calling the methods again.

    Attributes:
        name: the run's name (meta ``run_name``, else the directory name); :func:`open_runs` may
            disambiguate it.
        path: the database file.
    """

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        db = schema.database_path(path)
        if not db.is_file():
            raise StoreError(
                f"no run store at {path}: expected a run directory containing {schema.DB_FILENAME} "
                "or the path of a .sqlite file"
            )
        self.path = db
        try:
            self._conn = _connect_read_only(db)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot open run store {db}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{db} is not a run store (not a readable SQLite database: {exc})") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open run store {db}: {exc}") from exc
        version = schema.stored_version(self._conn, db)
        if version is None:
            self._conn.close()
            raise StoreError(f"{db} is empty: no run has been written there yet")
        schema.check_version(version, db, writable=False)
        self.schema_version = version
        # Version 1 stores have no vectors table (read as they are: see the schema module).
        self._has_vectors = bool(self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'vectors'"))
        self.name = name or self.meta.get("run_name") or db.parent.name

    # -- queries -------------------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read run store {self.path}: {exc}") from exc

    @property
    def meta(self) -> dict[str, Any]:
        """The run's metadata as a dict of JSON values (read afresh on every access)."""
        return {k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta ORDER BY key")}

    def series(
        self, metric: str | Sequence[str] | None = None, key: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Return the recorded scalars as a tidy DataFrame ordered by step.

        Args:
            metric: one metric ID or a list of them; None for all. Filtering happens in SQL.
            key: one key (parameter or module name, ``"all"``) or a list; None for all.

        Returns:
            DataFrame with columns run, step (int64), metric, key, index (int64), value (float64; NaN and
            +-inf as written), source (None for in-loop rows, else the checkpoint the row came from),
            ordered by step, metric, key, index. Values stored as vectors (per layer) come back as rows.
        """
        conditions, params = [], []
        for column, value in (("metric", metric), ("key", key)):
            cond, p = _filter(column, value)
            if cond:
                conditions.append(cond)
                params += p
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._query(
            f"SELECT step, metric, key, idx, value, source FROM series {where} "
            "ORDER BY step, metric, key, idx, source",
            params,
        )
        df = pd.DataFrame(rows, columns=SERIES_COLUMNS[1:])
        stored_as_vectors = self._vector_frame(metric, key)
        if stored_as_vectors is not None:
            df = pd.concat([df, stored_as_vectors], ignore_index=True) if len(df) else stored_as_vectors
            df = df.sort_values(["step", "metric", "key", "index", "source"], kind="stable", ignore_index=True)
        df["step"] = df["step"].astype("int64")
        df["index"] = df["index"].astype("int64")
        # NULL is how NaN is stored (schema module docstring): back to NaN.
        df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
        _text_or_none(df, "source", empty_is_none=True)
        df.insert(0, "run", self.name)
        return df

    def _vector_frame(
        self, metric: str | Sequence[str] | None, key: str | Sequence[str] | None
    ) -> pd.DataFrame | None:
        """The vector rows of ``metric`` expanded to long-format columns (step .. source), filtered by
        ``key``; None when there are none. Cost: one indexed query and one numpy expansion."""
        if not self._has_vectors:
            return None
        cond, params = _filter("metric", metric)
        rows = self._query(
            f"SELECT step, metric, idx, keys, data, source FROM vectors {f'WHERE {cond}' if cond else ''}", params
        )
        if not rows:
            return None
        try:
            df = pd.DataFrame(vectors.expand(rows))
        except ValueError as exc:
            raise StoreError(f"cannot read run store {self.path}: {exc}") from exc
        if key is not None:
            wanted = [key] if isinstance(key, str) else list(key)
            df = df[df["key"].isin(wanted)]
        return df if len(df) else None

    def events(self) -> pd.DataFrame:
        """Return events ordered by step: run, step, kind, severity, metric, key, message, data (dict),
        time (Unix seconds), source."""
        rows = self._query(
            "SELECT step, kind, severity, metric, key, message, data, time, source FROM events "
            "ORDER BY step, time, rowid"
        )
        df = pd.DataFrame(rows, columns=EVENT_COLUMNS[1:])
        _text_or_none(df, "metric")
        _text_or_none(df, "key")
        df["step"] = df["step"].astype("int64")
        df["data"] = pd.Series([json.loads(d) for d in df["data"].tolist()], index=df.index, dtype=object)
        df["time"] = df["time"].astype("float64")
        _text_or_none(df, "source", empty_is_none=True)
        df.insert(0, "run", self.name)
        return df

    def status(self) -> pd.DataFrame:
        """Return how each diagnostic fared per step: run, step, diagnostic, status (ok, not_converged,
        failed), reason, seconds, num_matvecs (nullable Int64), source; ordered by step, diagnostic."""
        rows = self._query(
            "SELECT step, diagnostic, status, reason, seconds, num_matvecs, source FROM status "
            "ORDER BY step, diagnostic, source"
        )
        df = pd.DataFrame(rows, columns=STATUS_COLUMNS[1:])
        _text_or_none(df, "reason")
        df["step"] = df["step"].astype("int64")
        df["seconds"] = df["seconds"].astype("float64")
        df["num_matvecs"] = df["num_matvecs"].astype("Int64")
        _text_or_none(df, "source", empty_is_none=True)
        df.insert(0, "run", self.name)
        return df

    def sources(self) -> pd.DataFrame:
        """Return the completed sources (checkpoints fully analysed): run, source, step, time."""
        rows = self._query("SELECT source, step, time FROM sources ORDER BY step, source")
        df = pd.DataFrame(rows, columns=SOURCE_COLUMNS[1:])
        df["step"] = df["step"].astype("int64")
        df["time"] = df["time"].astype("float64")
        df.insert(0, "run", self.name)
        return df

    def metrics(self) -> list[str]:
        """Return the sorted metric IDs that have at least one row."""
        union = " UNION SELECT metric FROM vectors" if self._has_vectors else ""
        return [r[0] for r in self._query(f"SELECT DISTINCT metric FROM series{union} ORDER BY metric")]

    def steps(self) -> list[int]:
        """Return the sorted steps that have any series, event or status row."""
        return [
            r[0]
            for r in self._query(
                "SELECT step FROM series UNION SELECT step FROM events UNION SELECT step FROM status"
                + (" UNION SELECT step FROM vectors" if self._has_vectors else "") + " ORDER BY step"
            )
        ]

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({self.name!r}, path={str(self.path)!r})"


def export_frame(df: pd.DataFrame, path: str | os.PathLike[str], format: str = "csv") -> Path:
    """Write a DataFrame from :class:`Run`/:class:`Runs` to CSV or Parquet.

    Event ``data`` dicts are written as JSON text. Parquet needs pyarrow (``pip install pyarrow``).

    Returns:
        The path written.

    Raises:
        StoreError: unknown format, pyarrow missing for Parquet, or the file cannot be written.
    """
    if format not in FORMATS:
        raise StoreError(f"unknown export format {format!r}; choose one of {FORMATS}")
    out = Path(path).expanduser()
    df = df.copy()
    if "data" in df.columns:
        df["data"] = df["data"].map(lambda d: json.dumps(d, sort_keys=True))
    try:
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
        if format == "csv":
            df.to_csv(out, index=False)
        else:
            if importlib.util.find_spec("pyarrow") is None:
                raise StoreError(
                    "Parquet export needs pyarrow, which is not installed: pip install pyarrow "
                    "(or pip install 'training-diagnostics[parquet]'), or export with format='csv'"
                )
            df.to_parquet(out, index=False, engine="pyarrow")
    except OSError as exc:
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


def _unique_names(runs: list[Run]) -> None:
    """Make run names distinct: prefix duplicates with their parent directories, then number them."""
    names = [r.name for r in runs]
    dupes = {n for n in names if names.count(n) > 1}
    for r in runs:
        if r.name in dupes:
            parent = r.path.parent.parent.name if r.path.name == schema.DB_FILENAME else r.path.parent.name
            if parent:
                r.name = f"{parent}/{r.name}"
    seen: dict[str, int] = {}
    for r in runs:
        count = seen.get(r.name, 0)
        seen[r.name] = count + 1
        if count:
            r.name = f"{r.name}#{count + 1}"
    # A numbered name may itself collide with a real one; rare, but keep names unique.
    final = [r.name for r in runs]
    if len(set(final)) != len(final):
        for i, r in enumerate(runs):
            r.name = f"{r.name}#{i + 1}"


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


class Runs(_Tables):
    """Several runs read together; every table method concatenates the runs' rows with a run column.

    Index by position or name (``runs["baseline"]``); iterate over :class:`Run` objects.
    """

    def __init__(self, runs: Iterable[Run]) -> None:
        self.runs = list(runs)

    @property
    def names(self) -> list[str]:
        """The (distinct) run names, in the order given."""
        return [r.name for r in self.runs]

    @property
    def meta(self) -> dict[str, dict[str, Any]]:
        """Each run's metadata, keyed by run name."""
        return {r.name: r.meta for r in self.runs}

    def series(
        self, metric: str | Sequence[str] | None = None, key: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Concatenated :meth:`Run.series` of every run (ordered by run, then step)."""
        return _concat([r.series(metric, key) for r in self.runs], SERIES_COLUMNS)

    def events(self) -> pd.DataFrame:
        """Concatenated :meth:`Run.events` of every run."""
        return _concat([r.events() for r in self.runs], EVENT_COLUMNS)

    def status(self) -> pd.DataFrame:
        """Concatenated :meth:`Run.status` of every run."""
        return _concat([r.status() for r in self.runs], STATUS_COLUMNS)

    def sources(self) -> pd.DataFrame:
        """Concatenated :meth:`Run.sources` of every run."""
        return _concat([r.sources() for r in self.runs], SOURCE_COLUMNS)

    def metrics(self) -> list[str]:
        """Sorted union of the runs' metric IDs."""
        return sorted({m for r in self.runs for m in r.metrics()})

    def steps(self) -> list[int]:
        """Sorted union of the runs' steps."""
        return sorted({s for r in self.runs for s in r.steps()})

    def close(self) -> None:
        """Close every run."""
        for r in self.runs:
            r.close()

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __getitem__(self, item: int | str) -> Run:
        if isinstance(item, str):
            for r in self.runs:
                if r.name == item:
                    return r
            raise KeyError(f"no run named {item!r}; runs are {self.names}")
        return self.runs[item]

    def __repr__(self) -> str:
        return f"Runs({self.names!r})"


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open one run store read-only.

    Args:
        path: the run directory, or the ``run.sqlite`` file inside it.

    Returns:
        A :class:`Run`.

    Raises:
        StoreError: nothing is there, or it is not a run store.
        SchemaVersionError: the store was written by a newer version of the package.
    """
    return Run(path)


def open_runs(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str] | Run]) -> Runs:
    """Open several runs; names are made distinct (``a/run``, ``b/run``; then ``name#2``).

    Args:
        paths: run directories or database files (a single path is accepted too), or open :class:`Run`s.

    Returns:
        A :class:`Runs` whose tables carry a run column.

    Raises:
        StoreError: ``paths`` is empty or one of them is not a run store.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [p if isinstance(p, Run) else Run(p) for p in paths]
    if not runs:
        raise StoreError("open_runs needs at least one run directory")
    _unique_names(runs)
    return Runs(runs)
