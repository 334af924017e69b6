"""A VectorRecord (one metric over many keys in one object) is stored and read back as its records would be."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.errors import StoreError
from diagnostics.store import Record, RunWriter, VectorRecord, open_run
from diagnostics.store.records import expand_records

KEYS = tuple(f"blocks.{i}.attn" for i in range(6))


def _read(path) -> pd.DataFrame:
    with open_run(path) as run:
        return run.series().drop(columns="run")


def _write(path, steps) -> None:
    with RunWriter(path) as w:
        for step, recs in steps:
            w.write_step(step, recs)


def _same_as_records(tmp_path, steps) -> None:
    _write(tmp_path / "vector", steps)
    _write(tmp_path / "records", [(s, list(expand_records(recs))) for s, recs in steps])
    pd.testing.assert_frame_equal(_read(tmp_path / "vector"), _read(tmp_path / "records"))


def test_a_vector_record_reads_back_as_its_records(tmp_path) -> None:
    vals = (0.5, math.nan, math.inf, -math.inf, 0.0, -2.5)
    steps = [(s, [Record("loss", 1.0 + s), VectorRecord("sa_mean", KEYS, vals), VectorRecord("sa_quantile", KEYS,
              tuple(float(i) for i in range(6)), 3)]) for s in range(3)]
    _same_as_records(tmp_path, steps)
    with open_run(tmp_path / "vector") as run:
        assert run._query("SELECT count(*) FROM vectors")[0][0] == 6  # two vector rows per step
        assert run._query("SELECT count(*) FROM series")[0][0] == 3  # the loss
        got = run.series("sa_mean", "blocks.2.attn")
        assert got.value.tolist() == [math.inf] * 3


@pytest.mark.parametrize("case", ["few keys", "a key twice", "key all", "also a record", "two vectors of one metric"])
def test_a_vector_record_that_would_not_be_one_vector_row_is_written_as_records(tmp_path, case) -> None:
    vec = {
        "few keys": VectorRecord("m", KEYS[:2], (1.0, 2.0)),
        "a key twice": VectorRecord("m", KEYS[:3] + KEYS[:2], (1.0, 2.0, 3.0, 4.0, 5.0)),
        "key all": VectorRecord("m", ("all",) + KEYS[:4], (1.0, 2.0, 3.0, 4.0, 5.0)),
        "also a record": VectorRecord("m", KEYS[:4], (1.0, 2.0, 3.0, 4.0)),
        "two vectors of one metric": VectorRecord("m", KEYS[:4], (1.0, 2.0, 3.0, 4.0)),
    }[case]
    recs = [vec, Record("m", 9.0, KEYS[5])] if case == "also a record" else [vec]
    if case == "two vectors of one metric":
        recs.append(VectorRecord("m", KEYS[2:], (5.0, 6.0, 7.0, 8.0)))  # blocks.2 and .3 again: the later wins
    _same_as_records(tmp_path, [(0, recs)])


def test_a_step_rewritten_with_a_vector_record_replaces_its_rows(tmp_path) -> None:
    with RunWriter(tmp_path) as w:
        w.write_step(0, [Record("g", float(i), k) for i, k in enumerate(KEYS[:2])])  # two keys: rows
        w.write_step(0, [VectorRecord("g", KEYS, tuple(10.0 + i for i in range(6)))])
    assert _read(tmp_path).value.tolist() == [10.0 + i for i in range(6)]


@pytest.mark.parametrize("bad, words", [
    (VectorRecord("m", KEYS, (1.0,)), "6 keys and 1 values"),
    (VectorRecord("m", KEYS[:3] + ("",) + KEYS[4:], (1.0,) * 6), "non-empty str"),
    (VectorRecord("m", KEYS, (1.0, 2.0, "x", 4.0, 5.0, 6.0)), "values[2] (key 'blocks.2.attn')"),
    (VectorRecord("", KEYS, (1.0,) * 6), "metric"),
])
def test_a_bad_vector_record_names_what_to_fix_and_writes_nothing(tmp_path, bad, words) -> None:
    with RunWriter(tmp_path) as w:
        with pytest.raises(StoreError, match="records\\[1\\]") as err:
            w.write_step(0, [Record("loss", 1.0), bad])
        assert words in str(err.value)
    with open_run(tmp_path) as run:
        assert run.series().empty


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 1),
                          st.floats(allow_nan=True, allow_infinity=True)), min_size=1, max_size=12))
def test_any_vector_records_read_back_as_their_records(tmp_path_factory, spec) -> None:
    recs = [VectorRecord(f"m{j}", KEYS[:1] + tuple(f"k{i}" for i in range(1, n)), (value,) * n, j % 2)
            for j, (n, _, value) in enumerate(spec)]
    recs += [Record("m0", 1.0, "extra") for _, extra, _ in spec[:1] if extra]
    _same_as_records(tmp_path_factory.mktemp("vec"), [(0, recs)])


def test_readers_of_a_steps_records_see_a_vector_records_rows() -> None:
    from diagnostics.metrics.context import StepContext
    from diagnostics.tracking.mirrors import scalars_from_records

    vec = VectorRecord("grad_norm", KEYS[:4], (1.0, 2.0, 3.0, 4.0))
    assert scalars_from_records([Record("loss", 0.5), vec], prefix="") == {
        "loss": 0.5, **{f"grad_norm/{k}": float(i + 1) for i, k in enumerate(KEYS[:4])}}
    ctx = StepContext(model=None, step=0, batch=None, loss_fn=None, loss=None)
    ctx.publish_records([vec])
    assert ctx.recorded("grad_norm", KEYS[2]) == 3.0
    assert ctx.recorded_keys("grad_norm") == {("grad_norm", k): float(i + 1) for i, k in enumerate(KEYS[:4])}
