"""Validation and conversion of what the writer is given, done before any transaction starts.

Everything here turns user values into plain rows or raises :class:`StoreError` naming the offending
field, so that a bad record never leaves a step half written.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

from diagnostics.errors import StoreError
from diagnostics.store.records import Event, Record, Status, VectorRecord
from diagnostics.store.vectors import keys_json, pack

SEVERITIES = ("info", "warning", "error")
STATUSES = ("ok", "not_converged", "failed", "skipped", "nothing_measured", "continues")
_VALUE_HINT = "; convert tensors with .item(), and report a failed estimate as a failed Status, not as a value"


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def to_json_value(value: Any, where: str) -> Any:
    """Convert ``value`` to plain JSON types: numpy scalars and arrays, tuples and paths are converted.

    Args:
        value: the value to convert.
        where: how to name the value in an error message, e.g. ``"meta['config']"``.

    Returns:
        An equivalent value made of dict (str keys), list, str, int, float, bool and None.

    Raises:
        StoreError: something cannot be represented as JSON (an object, a set, a tensor, a non-str key).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise StoreError(
                    f"{where} has a key {k!r} of type {_type_name(k)}; JSON objects need str keys"
                )
            out[k] = to_json_value(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # numpy scalars and arrays without importing numpy: both offer tolist()/item().
    mod = type(value).__module__
    if mod == "numpy" and hasattr(value, "tolist"):
        return to_json_value(value.tolist(), where)
    raise StoreError(
        f"{where} holds a value of type {_type_name(value)}, which is not JSON-serialisable; store a str, "
        "number, bool, None, list or dict (convert tensors with .tolist() or .item())"
    )


def dumps(value: Any, where: str) -> str:
    """Serialise ``value`` to JSON text after :func:`to_json_value` (NaN and inf allowed)."""
    return json.dumps(to_json_value(value, where), sort_keys=True)


def _type_error(obj: Any, cls: type, where: str) -> StoreError:
    return StoreError(f"{where} is a {_type_name(obj)}, expected diagnostics.store.{cls.__name__}")


def _check_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise StoreError(f"{where} must be an int, got {value!r} of type {_type_name(value)}")
    return int(value)


def _check_str(value: Any, where: str, *, optional: bool = False) -> str | None:
    """A name: a non-empty str (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise StoreError(f"{where} must be a non-empty str, got {value!r}")
    return value


def _check_text(value: Any, where: str, *, optional: bool = False) -> str | None:
    """Free text: any str, empty included (or None when ``optional``)."""
    if isinstance(value, str) or (value is None and optional):
        return value
    raise StoreError(f"{where} must be a str{' or None' if optional else ''}, got {_type_name(value)}")


def _check_choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise StoreError(f"{where} must be one of {choices}, got {value!r}")
    return value


def _check_real(v: Any, where: str, hint: str = "") -> float:
    if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise StoreError(f"{where} must be a real number, got {_type_name(v)}{hint}")
    return float(v)


def check_step(step: Any) -> int:
    """Return ``step`` as an int, or raise StoreError."""
    if type(step) is int:  # fast path: the ABC check in _check_int costs microseconds per call
        return step
    return _check_int(step, "step")


def check_source(source: Any) -> str:
    """Return the stored form of a source ('' for None), or raise StoreError."""
    if source is None:
        return ""
    return _check_str(source, "source") or ""


def series_rows(step: int, records: Iterable[Record], source: str) -> list[tuple]:
    """Validate records and return rows ``(step, metric, key, idx, value, source)``.

    NaN becomes NULL (see :mod:`diagnostics.store.schema`); infinities are kept.
    """
    rows = []
    for i, r in enumerate(records):
        if not isinstance(r, Record):
            raise _type_error(r, Record, f"records[{i}]")
        metric, key, idx, v = r.metric, r.key, r.index, r.value
        # Fast path for the common plain types; the general checks below name what is wrong.
        if not (type(metric) is str and metric and type(key) is str and key and type(idx) is int):
            where = f"records[{i}] (metric {metric!r})"
            _check_str(metric, f"{where}.metric")
            _check_str(key, f"{where}.key")
            idx = _check_int(idx, f"{where}.index")
        if type(v) is not float:
            v = _check_real(v, f"records[{i}] (metric {metric!r}).value", _VALUE_HINT)
        rows.append((step, metric, key, idx, None if v != v else v, source))  # v != v: NaN -> NULL
    return rows


def split_vector_records(records: Iterable[Any]) -> tuple[list[Any], list[tuple[int, VectorRecord]]]:
    """``records`` without its :class:`VectorRecord` objects, and those with their positions. One pass."""
    plain: list[Any] = []
    vecs: list[tuple[int, VectorRecord]] = []
    for i, r in enumerate(records):
        if type(r) is VectorRecord:
            vecs.append((i, r))
        else:
            plain.append(r)
    return plain, vecs


def vector_record_rows(step: int, vecs: list[tuple[int, VectorRecord]], source: str) -> list[tuple]:
    """Validate vector records (with their positions among the step's records, for the messages) and return
    vector rows ``(step, metric, idx, keys JSON, data, source)``.

    Raises:
        StoreError: a metric or key that is not a non-empty str, keys and values of different lengths, a
            value that is not a real number.
    """
    rows = []
    for i, r in vecs:
        where = f"records[{i}] (vector of metric {r.metric!r})"
        if type(r.metric) is not str or not r.metric:
            _check_str(r.metric, f"{where}.metric")
        idx = r.index if type(r.index) is int else _check_int(r.index, f"{where}.index")
        keys, vals = r.keys, r.values
        if len(keys) != len(vals):
            raise StoreError(f"{where} has {len(keys)} keys and {len(vals)} values; give one value per key")
        if not all(type(k) is str and k for k in keys):
            k = next(k for k in keys if type(k) is not str or not k)
            raise StoreError(f"{where} has the key {k!r}; keys must be non-empty str")
        if not all(type(v) is float for v in vals):
            vals = [v if type(v) is float else _check_real(v, f"{where}.values[{j}] (key {keys[j]!r})", _VALUE_HINT)
                    for j, v in enumerate(vals)]
        rows.append((step, r.metric, idx, keys_json(tuple(keys)), pack(vals), source))
    return rows


def event_rows(step: int, events: Iterable[Event], source: str, now: float) -> list[tuple]:
    """Validate events and return rows ``(step, kind, severity, metric, key, message, data, time, source)``."""
    rows = []
    for i, e in enumerate(events):
        if not isinstance(e, Event):
            raise _type_error(e, Event, f"events[{i}]")
        where = f"events[{i}] (kind {e.kind!r})"
        _check_str(e.kind, f"{where}.kind")
        _check_choice(e.severity, SEVERITIES, f"{where}.severity")
        _check_str(e.metric, f"{where}.metric", optional=True)
        _check_str(e.key, f"{where}.key", optional=True)
        _check_text(e.message, f"{where}.message")
        if not isinstance(e.data, Mapping):
            raise StoreError(f"{where}.data must be a dict, got {_type_name(e.data)}")
        data = dumps(e.data, f"{where}.data")
        rows.append((step, e.kind, e.severity, e.metric, e.key, e.message, data, now, source))
    return rows


def status_rows(step: int, statuses: Iterable[Status], source: str) -> list[tuple]:
    """Validate statuses and return rows ``(step, diagnostic, status, reason, seconds, num_matvecs, source)``."""
    rows = []
    for i, s in enumerate(statuses):
        if not isinstance(s, Status):
            raise _type_error(s, Status, f"statuses[{i}]")
        name, st, reason, sec, nmv = s.diagnostic, s.status, s.reason, s.seconds, s.num_matvecs
        # Fast path for the common plain types; the general checks below name what is wrong.
        if not (type(name) is str and name and st in STATUSES and (reason is None or type(reason) is str)
                and type(sec) is float and (nmv is None or type(nmv) is int)):
            where = f"statuses[{i}] (diagnostic {name!r})"
            _check_str(name, f"{where}.diagnostic")
            _check_choice(st, STATUSES, f"{where}.status")
            _check_text(reason, f"{where}.reason", optional=True)
            sec = _check_real(sec, f"{where}.seconds")
            nmv = None if nmv is None else _check_int(nmv, f"{where}.num_matvecs")
        rows.append((step, name, st, reason, sec, nmv, source))
    return rows
