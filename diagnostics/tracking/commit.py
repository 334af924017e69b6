"""The commit pipeline: each monitored step goes to the run store in one transaction, then to the mirrors.

A step whose diagnostics need the optimizer's update waits as a :class:`PendingStep` until the update has
happened. :class:`CommitPipeline` writes a step's records, events and statuses with one ``write_step``
(on a background thread with ``async_writes``, at most one commit outstanding), then sends its scalars to
the logger mirrors. A store or mirror that fails warns once and never stops training, unless ``strict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from diagnostics.errors import StoreError
from diagnostics.metrics.base import Diagnostic
from diagnostics.metrics.context import StepContext
from diagnostics.store.records import Event, Record, Status

__all__ = ["CommitPipeline", "PendingStep", "open_store"]


class PendingStep:
    """A step's results, kept until it is committed (after the optimizer's update when some need it).

    Attributes:
        events: ``(diagnostic that raised it or None, event)`` pairs, for choosing actions.
        statuses: one Status per diagnostic that ran, by name.
        update_diags: diagnostics whose ``compute_after_update`` still has to run.
        handle: the optimizer step post-hook that finishes the step, while registered.
    """

    def __init__(self, step: int, ctx: StepContext, source: str | None = None) -> None:
        self.step = step
        self.source = source
        self.ctx = ctx
        self.records: list[Record] = []
        self.events: list[tuple[Diagnostic | None, Event]] = []
        self.statuses: dict[str, Status] = {}
        self.update_diags: list[Diagnostic] = []
        self.handle: Any = None

    def add(self, d: Diagnostic, records: list[Record], events: list[Event], status: Status) -> None:
        """Take the results of ``d.compute``; ``d`` waits for the update if it needs it and ran without failing."""
        self.records += records
        self.events += [(d, e) for e in events]
        self.statuses[d.name] = status
        if "update" in d.requires and status.status not in ("failed", "skipped"):
            self.update_diags.append(d)

    def add_update(self, d: Diagnostic, records: list[Record], events: list[Event], status: Status) -> None:
        """Take the results of ``d.compute_after_update``, merged into ``d``'s status of the step.

        The step's status is the later one unless that is "ok"; seconds add up.
        """
        before = self.statuses[d.name]
        self.records += records
        self.events += [(d, e) for e in events]
        self.statuses[d.name] = Status(
            d.name,
            status.status if status.status != "ok" else before.status,
            status.reason or before.reason,
            before.seconds + status.seconds,
            status.num_matvecs if status.num_matvecs is not None else before.num_matvecs,
        )

    def all_records(self) -> list[Record]:
        """The step's records plus one ``monitor_seconds`` record per diagnostic that ran."""
        return self.records + [Record("monitor_seconds", s.seconds, key=n) for n, s in self.statuses.items()]


def open_store(run_dir: Path, fingerprint: str, name: str | None, run_meta: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Open (create or resume) the run store of ``run_dir``: ``(RunWriter, metadata of the resumed run or {})``.

    Raises:
        StoreError: the run directory belongs to a model with another fingerprint.
        SchemaVersionError: the store was written by a newer package.
    """
    from diagnostics.store import RunWriter, open_run
    from diagnostics.store.schema import database_path

    resumed_meta: dict[str, Any] = {}
    if database_path(run_dir).is_file():
        run = open_run(run_dir)
        try:
            resumed_meta = run.meta
        finally:
            run.close()
        old = resumed_meta.get("model_fingerprint")
        if old is not None and old != fingerprint:
            raise StoreError(
                f"run dir {run_dir} belongs to another model (fingerprint {old}, this model "
                f"{fingerprint}); choose another run directory"
            )
    return RunWriter(run_dir, name=name, meta=dict(run_meta), resume=True), resumed_meta


class CommitPipeline:
    """Writes committed steps to a RunWriter and their scalars to mirrors.

    Args:
        writer: the run's RunWriter (closed by :meth:`close`).
        mirrors: resolved mirrors (see :mod:`diagnostics.tracking.mirrors`; closed by :meth:`close`).
        async_writes: commit on a background thread while the next training step runs.
        strict: re-raise store and mirror errors instead of warning once.
    """

    def __init__(self, writer: Any, mirrors: Sequence[Any] = (), *, async_writes: bool = False, strict: bool = False) -> None:
        self.writer = writer
        self.mirrors = list(mirrors)
        self.strict = strict
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diagnostics-store") if async_writes else None
        self._future: Future | None = None
        self._store_failures = 0
        self._mirror_failures: set[int] = set()

    def write(self, step: int, records: list[Record], events: list[Event], statuses: list[Status], source: str | None) -> None:
        """Commit one step (after the outstanding commit, if any). Cost: one SQLite transaction."""
        self.wait()
        if self._executor is not None:
            # The commit overlaps the next training step; at most one commit is outstanding.
            self._future = self._executor.submit(self.writer.write_step, step, records, events, statuses, source=source)
            return
        try:
            self.writer.write_step(step, records, events, statuses, source=source)
        except StoreError as exc:
            self._store_failed(exc)

    def wait(self) -> None:
        """Block until the outstanding background commit (if any) is done; handle its error."""
        future, self._future = self._future, None
        if future is not None:
            try:
                future.result()
            except StoreError as exc:
                self._store_failed(exc)

    def set_meta(self, key: str, value: Any) -> None:
        """Record ``key: value`` in the run's metadata once the outstanding commit is done."""
        self.wait()
        self.writer.set_meta(key, value)

    def mirror(self, step: int, records: list[Record]) -> None:
        """Send the step's scalars to every mirror; a failing mirror warns once and never stops training."""
        if not self.mirrors:
            return
        from diagnostics.tracking.mirrors import scalars_from_records

        scalars = scalars_from_records(records)
        for i, mirror in enumerate(self.mirrors):
            try:
                mirror.write(step, scalars)
            except Exception as exc:  # noqa: BLE001 - a logger outage must not end the training run
                if self.strict:
                    raise
                if i not in self._mirror_failures:
                    self._mirror_failures.add(i)
                    warnings.warn(f"diagnostics: mirror {type(mirror).__name__} failed: {exc}", RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        """Wait for the outstanding commit, then close the writer and every mirror (a mirror failing to close warns)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self.writer.close()
            for mirror in self.mirrors:
                try:
                    mirror.close()
                except Exception as exc:  # noqa: BLE001
                    warnings.warn(f"diagnostics: closing mirror {type(mirror).__name__} failed: {exc}", RuntimeWarning, stacklevel=3)

    def _store_failed(self, exc: StoreError) -> None:
        if self.strict:
            raise exc
        self._store_failures += 1
        if self._store_failures == 1:
            warnings.warn(f"diagnostics: cannot write to the run store: {exc}", RuntimeWarning, stacklevel=5)
