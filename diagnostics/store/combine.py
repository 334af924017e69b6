"""Merge several run stores (per-rank or per-job) into one new run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from diagnostics.errors import StoreError
from diagnostics.store import catalog, schema
from diagnostics.store.reader import Run, open_runs
from diagnostics.store.writer import RunWriter

# Meta keys that describe the combined store itself (its name, creation, provenance) rather than being
# merged from the inputs.
_OWN_KEYS = catalog.own_meta_keys()


def _merge_meta(runs: Sequence[Run]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Return (merged meta, conflicts): the first run's value wins; differing values are recorded."""
    merged: dict[str, Any] = {}
    seen: dict[str, dict[str, Any]] = {}
    for run in runs:
        for key, value in run.meta.items():
            if key in _OWN_KEYS:
                continue
            seen.setdefault(key, {})[run.name] = value
            merged.setdefault(key, value)
    conflicts = {
        key: by_run
        for key, by_run in seen.items()
        if len({json.dumps(v, sort_keys=True) for v in by_run.values()}) > 1
    }
    return merged, conflicts


def combine_runs(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Run:
    """Merge per-rank or per-job run stores into a new run at ``out``.

    Rows keep their step, metric, key, index and value. Rows written in the loop (no source) get the
    input run's name as their source, so per-rank rows of the same metric and step stay apart; rows
    from a checkpoint keep the checkpoint as source, so ``completed_sources()`` of the merged run is the
    union of the inputs' and an analysis can resume into it. If two inputs hold the very same row
    (same step, metric, key, index and source: the same checkpoint analysed twice), the first input
    wins and the number of dropped rows is recorded.

    Meta: the first input's value wins; ``combined_from`` lists the inputs (name and path) and
    ``combine_conflicts`` maps each key whose values differ to ``{run name: value}``;
    ``combine_duplicates`` maps table name to the number of rows dropped as duplicates.

    Args:
        paths: the input run directories (or .sqlite files); their names are made distinct first.
        out: the new run directory; must not hold a run unless ``overwrite``.
        name: name of the merged run; default the directory name of ``out``.
        overwrite: replace an existing run at ``out``.

    Returns:
        The merged run, opened read-only.

    Raises:
        StoreError: no input, an input is not a run store, ``out`` is one of the inputs or
            already holds a run.
        SchemaVersionError: an input was written by a newer version of the package.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = open_runs(list(paths))
    out_db = schema.database_path(out)
    try:
        for run in runs:
            if out_db.exists() and run.path.resolve() == out_db.resolve():
                raise StoreError(f"combine output {out} is also one of its inputs; choose a new directory")
        merged, conflicts = _merge_meta(runs.runs)
        merged["combined_from"] = [{"name": r.name, "path": str(r.path.parent)} for r in runs]
        merged["combine_conflicts"] = conflicts
        duplicates = dict.fromkeys(schema.COLUMNS, 0)
        with RunWriter(out, name=name, resume=False, overwrite=overwrite) as writer:
            for key, value in merged.items():
                writer.set_meta(key, value)
            conn = writer._connection()
            for run in runs:
                _copy_rows(conn, run, duplicates)
            writer.set_meta("combine_duplicates", duplicates)
            path = writer.path
    finally:
        runs.close()
    return Run(path)


def _copy_rows(conn: Any, run: Run, duplicates: dict[str, int]) -> None:
    """Copy one input's rows into the open writer connection in one transaction."""
    src = run._conn
    default = run.name  # source of in-loop rows once merged
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, cols in schema.COLUMNS.items():
            if table == "vectors" and not run._has_vectors:  # a version 1 input
                continue
            insert = schema.insert_sql(table, "IGNORE")
            # the last column of a data table is its source; the sources table keeps its own
            source_col = len(cols) - 1 if table != "sources" else None
            cursor = src.execute(f"SELECT {', '.join(cols)} FROM {table}")
            while True:
                rows = cursor.fetchmany(10_000)
                if not rows:
                    break
                if source_col is not None:
                    rows = [r[:source_col] + (r[source_col] or default,) for r in rows]
                before = conn.total_changes
                conn.executemany(insert, rows)
                duplicates[table] += len(rows) - (conn.total_changes - before)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


__all__ = ["combine_runs"]
