"""Reader: filters pushed into SQL, several runs, export, concurrent reading of a run being written."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest

from diagnostics.errors import StoreError
from diagnostics.store import Event, Record, Run, Runs, RunWriter, Status, open_run, open_runs


def _write(path, name=None, scale=1.0, steps=3):
    with RunWriter(path, name=name) as w:
        for step in range(steps):
            w.write_step(
                step,
                [Record("loss", scale * (step + 1)), Record("grad_norm", 2.0 * scale, key="all"),
                 Record("grad_norm", 1.0, key="fc.weight"), Record("grad_norm", math.nan, key="fc.bias"),
                 Record("hessian_eigenvalue", 5.0, index=0), Record("hessian_eigenvalue", 3.0, index=1)],
                [Event("edge_of_stability", "hit", metric="sharpness", data={"s": step})] if step == 1 else [],
                [Status("basics", seconds=0.1)],
            )  # fmt: skip
    return path


def test_filters(tmp_path):
    run = open_run(_write(tmp_path / "a"))
    s = run.series("grad_norm")
    assert set(s.metric) == {"grad_norm"} and len(s) == 9
    assert s["step"].is_monotonic_increasing
    s = run.series(["loss", "hessian_eigenvalue"], key="all")
    assert s.groupby("metric").size().to_dict() == {"hessian_eigenvalue": 6, "loss": 3}
    s = run.series(key=["fc.weight", "fc.bias"])
    assert set(s.key) == {"fc.weight", "fc.bias"} and s[s.key == "fc.bias"]["value"].isna().all()
    assert run.series(metric=[]).empty and run.series("nope").empty
    assert list(run.series("nope").columns) == ["run", "step", "metric", "key", "index", "value", "source"]
    with pytest.raises(StoreError, match="metric filter must be a str or a list of str"):
        run.series(metric=[1])


def test_open_by_file_or_dir_and_missing(tmp_path):
    _write(tmp_path / "a")
    assert (
        open_run(tmp_path / "a" / "run.sqlite").steps() == open_run(str(tmp_path / "a")).steps() == [0, 1, 2]
    )
    with pytest.raises(StoreError, match=r"no run store at .*nowhere.*run.sqlite"):
        open_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no run store"):
        open_run(tmp_path / "empty")


def test_open_runs_has_run_column_and_distinct_names(tmp_path):
    _write(tmp_path / "x" / "run", scale=1.0)
    _write(tmp_path / "y" / "run", scale=10.0)
    _write(tmp_path / "z", name="x/run", scale=100.0)  # collides with the disambiguated name
    runs = open_runs([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"])
    assert isinstance(runs, Runs) and len(runs) == 3
    assert len(set(runs.names)) == 3
    assert runs.names[:2] == ["x/run", "y/run"]
    loss = runs.series("loss")
    assert loss.groupby("run", sort=False)["value"].sum().tolist() == [6.0, 60.0, 600.0]
    assert list(runs.events()["run"]) == runs.names
    assert set(runs.status()["run"]) == set(runs.names)
    assert set(runs.meta) == set(runs.names)
    assert runs.metrics() == ["grad_norm", "hessian_eigenvalue", "loss"] and runs.steps() == [0, 1, 2]
    assert isinstance(runs["y/run"], Run) and runs[0].name == "x/run"
    with pytest.raises(KeyError, match="no run named"):
        runs["nope"]
    single = open_runs(str(tmp_path / "z"))
    assert single.names == ["x/run"]
    with pytest.raises(StoreError, match="at least one"):
        open_runs([])


def test_export_csv_and_parquet(tmp_path):
    run = open_run(_write(tmp_path / "a"))
    out = run.export(tmp_path / "out" / "series.csv")
    back = pd.read_csv(out)
    assert list(back.columns) == ["run", "step", "metric", "key", "index", "value", "source"]
    assert len(back) == len(run.series()) and back["value"].isna().sum() == 3
    out = run.export(tmp_path / "series.parquet", "parquet")
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back[["step", "metric", "index", "value"]],
                                  run.series()[["step", "metric", "index", "value"]], check_dtype=False)  # fmt: skip
    ev = pd.read_csv(run.export(tmp_path / "events.csv", table="events"))
    assert json.loads(ev["data"][0]) == {"s": 1}
    runs = open_runs([tmp_path / "a"])
    assert len(pd.read_parquet(runs.export(tmp_path / "all.parquet", "parquet", table="status"))) == 3
    with pytest.raises(StoreError, match="unknown export format 'xlsx'"):
        run.export(tmp_path / "x.xlsx", "xlsx")
    with pytest.raises(StoreError, match="unknown table"):
        run.export(tmp_path / "x.csv", table="nope")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    run = open_run(_write(tmp_path / "a"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes find_spec raise / import fail
    monkeypatch.setattr("diagnostics.store.reader.importlib.util.find_spec", lambda name: None)
    with pytest.raises(StoreError, match="pip install pyarrow.*format='csv'"):
        run.export(tmp_path / "x.parquet", "parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_reader_follows_a_run_being_written(tmp_path):
    w = RunWriter(tmp_path)
    w.write_step(0, [Record("loss", 1.0)])
    run = open_run(tmp_path)  # while the writer holds the database open
    assert run.steps() == [0]
    w.write_step(1, [Record("loss", 0.5)])
    w.set_meta("config", {"a": 1})
    assert run.steps() == [0, 1] and run.meta["config"] == {"a": 1}
    # The reader cannot write.
    with pytest.raises(Exception, match="readonly"):
        run._conn.execute("DELETE FROM series")
    w.close()
    assert len(run.series()) == 2
    run.close()
    # A finished run opens again after the writer is gone.
    with open_run(tmp_path) as again:
        assert again.steps() == [0, 1]


def test_run_with_only_meta_reads_empty_frames(tmp_path):
    RunWriter(tmp_path, name="n").close()
    run = open_run(tmp_path)
    assert run.series().empty and run.events().empty and run.status().empty and run.sources().empty
    assert run.steps() == [] and run.metrics() == [] and run.name == "n"
