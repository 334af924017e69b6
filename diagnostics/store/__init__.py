"""The run store: one schema-versioned SQLite file per run directory. Imports no torch.

Write with :class:`RunWriter` (one committed transaction per step), read with :func:`open_run` /
:func:`open_runs` into tidy pandas DataFrames, merge per-rank or per-job stores with :func:`combine_runs`,
summarise a run with :func:`run_summary`. The table layout is documented in :mod:`diagnostics.store.schema`;
every metric ID and meta key a store holds is listed in :mod:`diagnostics.store.catalog`.
"""

from diagnostics.store.combine import combine_runs
from diagnostics.store.reader import Run, Runs, open_run, open_runs
from diagnostics.store.records import Event, Record, Status, VectorRecord
from diagnostics.store.schema import SCHEMA_VERSION
from diagnostics.store.summary import run_summary
from diagnostics.store.writer import RunWriter

__all__ = [
    "RunWriter",
    "open_run",
    "open_runs",
    "combine_runs",
    "run_summary",
    "Run",
    "Runs",
    "Record",
    "VectorRecord",
    "Event",
    "Status",
    "SCHEMA_VERSION",
]
