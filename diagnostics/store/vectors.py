"""Per-layer values stored as one vector row per metric and step instead of one row per layer.

A step's records of one metric and index over many keys (a norm per parameter, a statistic per linear
map, the seconds of each diagnostic) are written as one row of the ``vectors`` table: the keys as a JSON
list and the values as float64 (little-endian, NaN and infinities as they are). Each row of the long
``series`` table costs an index entry ordered by metric and key, so a commit of a per-layer step touched
one index page per layer; a vector row touches one. The reader expands vector rows back into the long
format, so every consumer sees the same table.

Which rows become vectors: those of a (metric, index) with at least :data:`MIN_KEYS` keys other than
``"all"`` at the step, with no key twice; ``"all"`` and everything else stay long rows.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MIN_KEYS", "expand", "forms_a_vector", "keys_json", "keys_of", "pack", "split_rows", "unpack"]

#: Fewest keys of one metric and index at a step for its rows to be stored as a vector.
MIN_KEYS = 4


def pack(values: Sequence[float | None]) -> bytes:
    """float64 little-endian bytes of ``values`` (None, the series table's NaN, becomes NaN)."""
    data = array("d", values if None not in values else [float("nan") if v is None else v for v in values])
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def unpack(data: bytes) -> np.ndarray:
    """The float64 values of a vector row's ``data`` (read-only view of the bytes)."""
    return np.frombuffer(data, dtype="<f8")


def forms_a_vector(keys: Sequence[str]) -> bool:
    """Whether the rows of one metric and index at a step with these keys are stored as one vector row:
    at least :data:`MIN_KEYS` keys, none ``"all"``, none twice."""
    return len(keys) >= MIN_KEYS and "all" not in keys and len(set(keys)) == len(keys)


#: JSON of the key lists already encoded: a run writes the same few lists at every step.
_KEYS_JSON: dict[tuple[str, ...], str] = {}


def keys_json(keys: tuple[str, ...]) -> str:
    """The ``keys`` column of a vector row, ``json.dumps(list(keys))``, encoded once per distinct tuple
    (up to 1024 kept)."""
    text = _KEYS_JSON.get(keys)
    if text is None:
        if len(_KEYS_JSON) >= 1024:
            _KEYS_JSON.clear()
        text = _KEYS_JSON[keys] = json.dumps(list(keys))
    return text


def split_rows(rows: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Split validated series rows ``(step, metric, key, idx, value, source)`` of one step into the rows
    kept long and vector rows ``(step, metric, idx, keys JSON, data, source)``. Keys keep their order.

    Cost: one pass over the rows and one JSON encoding per new key list.
    """
    groups: dict[tuple[str, int], list[tuple]] = {}
    for row in rows:
        if row[2] != "all":
            groups.setdefault((row[1], row[3]), []).append(row)
    chosen = {g for g, members in groups.items() if forms_a_vector([r[2] for r in members])}
    if not chosen:
        return rows, []
    long_rows = [r for r in rows if r[2] == "all" or (r[1], r[3]) not in chosen]
    vectors = []
    for metric, idx in chosen:
        members = groups[(metric, idx)]
        step, source = members[0][0], members[0][5]
        keys = keys_json(tuple(r[2] for r in members))
        vectors.append((step, metric, idx, keys, pack([r[4] for r in members]), source))
    return long_rows, vectors


def keys_of(text: str, cache: dict[str, list[str]]) -> list[str]:
    """The key list of a vector row's ``keys`` JSON, parsed once per distinct text."""
    keys = cache.get(text)
    if keys is None:
        keys = cache[text] = json.loads(text)
    return keys


def expand(rows: Sequence[tuple[Any, ...]]) -> dict[str, np.ndarray]:
    """Long-format columns (step, metric, key, idx, value, source) of vector rows
    ``(step, metric, idx, keys JSON, data, source)``. Cost: one pass, numpy concatenation."""
    cache: dict[str, list[str]] = {}
    steps, metrics, keys, idxs, values, sources, counts = [], [], [], [], [], [], []
    for step, metric, idx, key_text, data, source in rows:
        ks = keys_of(key_text, cache)
        vals = unpack(data)
        if len(ks) != len(vals):
            raise ValueError(f"vector row of {metric!r} at step {step} has {len(ks)} keys and {len(vals)} values")
        steps.append(step)
        metrics.append(metric)
        idxs.append(idx)
        sources.append(source)
        counts.append(len(ks))
        keys.extend(ks)
        values.append(vals)
    n = np.asarray(counts, dtype=np.int64)
    return {
        "step": np.repeat(np.asarray(steps, dtype=np.int64), n),
        "metric": np.repeat(np.asarray(metrics, dtype=object), n),
        "key": np.asarray(keys, dtype=object),
        "index": np.repeat(np.asarray(idxs, dtype=np.int64), n),
        "value": np.concatenate(values) if values else np.zeros(0),
        "source": np.repeat(np.asarray(sources, dtype=object), n),
    }
