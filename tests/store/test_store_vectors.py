"""Per-layer values stored as vector rows read back exactly as the long rows they replace."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.store import Record, RunWriter, combine_runs, open_run, vectors
from diagnostics.store.summary import run_summary

LAYERS = [f"block{i}.weight" for i in range(37)]


def _steps() -> list[tuple[int, list[Record], str | None]]:
    out = []
    for step in range(3):
        recs = [Record("loss", 2.0 - step), Record("grad_norm", 1.5 + step)]
        recs += [Record("grad_norm", float(i) / (step + 1), key=k) for i, k in enumerate(LAYERS)]
        recs += [Record("sa_mean", math.nan if i == 3 else math.inf if i == 4 else -i * 0.25, key=k, index=1)
                 for i, k in enumerate(LAYERS[:6])]
        recs += [Record("eigenvalue", 3.0 - j, index=j) for j in range(3)]  # key "all": stays long
        out.append((step, recs, None if step < 2 else "ckpt-2.pt"))
    return out


def _write(path, monkeypatch, as_vectors: bool) -> None:
    with monkeypatch.context() as m:
        if not as_vectors:
            m.setattr(vectors, "MIN_KEYS", 10**9)
        with RunWriter(path) as w:
            for step, recs, source in _steps():
                w.write_step(step, recs, source=source)


def test_vector_rows_read_back_as_the_long_rows(tmp_path, monkeypatch) -> None:
    _write(tmp_path / "vec", monkeypatch, True)
    _write(tmp_path / "long", monkeypatch, False)
    with open_run(tmp_path / "vec") as a, open_run(tmp_path / "long") as b:
        assert a._query("SELECT count(*) FROM vectors")[0][0] == 6  # grad_norm and sa_mean per step
        assert a._query("SELECT count(*) FROM series")[0][0] == 3 * 5
        assert b._query("SELECT count(*) FROM vectors")[0][0] == 0
        for args in [(), ("grad_norm",), (["sa_mean", "loss"],), (None, "block3.weight"),
                     ("grad_norm", ["all", "block0.weight"]), ("nothing",)]:
            left, right = a.series(*args), b.series(*args)
            pd.testing.assert_frame_equal(left.drop(columns="run"), right.drop(columns="run"))
        assert a.metrics() == b.metrics() and a.steps() == b.steps() == [0, 1, 2]
        sa = a.series("sa_mean", "block3.weight")
        assert math.isnan(sa.value.iloc[0]) and a.series("sa_mean", "block4.weight").value.iloc[0] == math.inf
    left, right = run_summary(tmp_path / "vec"), run_summary(tmp_path / "long")
    for d in (left, right):
        d.pop("path"), d.pop("run"), d.pop("created")
    assert left == right
    grad = next(m for m in left["metrics"] if m["metric"] == "grad_norm")
    assert grad["keys"] == 38 and grad["steps"] == 3 and grad["last_value"] == 3.5


def test_a_rewritten_step_replaces_whichever_form_it_had(tmp_path, monkeypatch) -> None:
    recs = [Record("grad_norm", float(i), key=k) for i, k in enumerate(LAYERS[:5])]
    with monkeypatch.context() as m:  # first written as rows
        m.setattr(vectors, "MIN_KEYS", 10**9)
        with RunWriter(tmp_path) as w:
            w.write_step(0, recs)
            w.write_step(1, recs)
    with RunWriter(tmp_path) as w:  # then again as a vector: the rows go
        w.write_step(0, [Record(r.metric, r.value + 10, r.key) for r in recs])
    with open_run(tmp_path) as run:
        df = run.series("grad_norm")
        assert len(df) == 10 and df[df.step == 0].value.tolist() == [10, 11, 12, 13, 14]
    with monkeypatch.context() as m:  # and back to rows: the vector goes
        m.setattr(vectors, "MIN_KEYS", 10**9)
        with RunWriter(tmp_path) as w:
            w.write_step(0, recs)
    with open_run(tmp_path) as run:
        df = run.series("grad_norm")
        assert len(df) == 10 and df[df.step == 0].value.tolist() == [0, 1, 2, 3, 4]
        assert run._query("SELECT count(*) FROM vectors")[0][0] == 0


def test_combine_copies_vector_rows(tmp_path, monkeypatch) -> None:
    _write(tmp_path / "a", monkeypatch, True)
    merged = combine_runs([tmp_path / "a"], tmp_path / "out")
    with merged, open_run(tmp_path / "a") as a:
        got = merged.series("grad_norm").drop(columns=["run", "source"])
        pd.testing.assert_frame_equal(got, a.series("grad_norm").drop(columns=["run", "source"]))


def test_only_groups_with_enough_distinct_keys_become_vectors() -> None:
    rows = [(0, "m", f"k{i}", 0, float(i), "") for i in range(vectors.MIN_KEYS)]
    rows += [(0, "m", "all", 0, 9.0, ""), (0, "few", "a", 0, 1.0, ""), (0, "few", "b", 0, None, "")]
    rows += [(0, "dup", "a", 0, 1.0, "")] * vectors.MIN_KEYS  # a key twice: left as rows
    long_rows, vector_rows = vectors.split_rows(rows)
    assert [r[1] for r in vector_rows] == ["m"]
    assert {(r[1], r[2]) for r in long_rows} == {("m", "all"), ("few", "a"), ("few", "b"), ("dup", "a")}
    assert vectors.unpack(vector_rows[0][4]).tolist() == [float(i) for i in range(vectors.MIN_KEYS)]


values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0))


@settings(max_examples=25, deadline=None)
@given(table=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 2), st.integers(0, 9), values),
                      min_size=1, max_size=60))
def test_any_records_read_back_the_same_in_both_forms(tmp_path_factory, table) -> None:
    base = tmp_path_factory.mktemp("prop")
    steps: dict[int, dict[tuple[str, str, int], float]] = {}
    for metric, idx, key, value in table:  # later records of the same natural key win, as in the store
        steps.setdefault(idx % 2, {})[(metric, "all" if key == 0 else f"k{key}", idx)] = value
    frames = []
    for name, min_keys in (("vec", vectors.MIN_KEYS), ("long", 10**9)):
        old = vectors.MIN_KEYS
        vectors.MIN_KEYS = min_keys
        try:
            with RunWriter(base / name) as w:
                for step, recs in steps.items():
                    w.write_step(step, [Record(m, v, k, i) for (m, k, i), v in recs.items()])
        finally:
            vectors.MIN_KEYS = old
        with open_run(base / name) as run:
            frames.append(run.series().drop(columns="run"))
    pd.testing.assert_frame_equal(*frames)


@pytest.mark.parametrize("n", [vectors.MIN_KEYS, 100])
def test_pack_round_trip(n: int) -> None:
    vals = [float(i) if i % 3 else None for i in range(n)]
    out = vectors.unpack(vectors.pack(vals)).tolist()
    assert [None if math.isnan(v) else v for v in out] == vals
