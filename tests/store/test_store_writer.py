"""RunWriter: round trips, replacement semantics, validation before writing, version and path errors."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pandas as pd
import pytest

from diagnostics.errors import SchemaVersionError, StoreError
from diagnostics.store import SCHEMA_VERSION, Event, Record, RunWriter, Status, open_run, schema


def test_round_trip_every_column(tmp_path):
    clock = iter([1000.0, 1001.5, 1002.0, 1003.0])
    with RunWriter(
        tmp_path / "run", name="demo", meta={"config": {"lr": 0.1}}, clock=lambda: next(clock)
    ) as w:
        w.write_step(
            3,
            [Record("loss", 0.5), Record("hessian_eigenvalue", 7.25, key="all", index=2),
             Record("grad_norm", 1.5, key="fc.weight")],
            [Event("edge_of_stability", "sharp", severity="warning", metric="sharpness", key="all",
                   data={"ratio": 1.02, "ok": True, "layers": ["a", "b"]}),
             Event("nonfinite", "no metric")],
            [Status("hessian_eigen", "not_converged", "budget", 0.25, 60), Status("basics", seconds=0.01)],
        )  # fmt: skip
        w.write_step(4, [Record("loss", 0.25)], source="ckpt/step4.pt")
    run = open_run(tmp_path / "run")
    assert run.name == "demo"
    s = run.series()
    assert list(s.columns) == ["run", "step", "metric", "key", "index", "value", "source"]
    assert s.to_dict("records") == [
        {"run": "demo", "step": 3, "metric": "grad_norm", "key": "fc.weight", "index": 0, "value": 1.5, "source": None},
        {"run": "demo", "step": 3, "metric": "hessian_eigenvalue", "key": "all", "index": 2, "value": 7.25,
         "source": None},
        {"run": "demo", "step": 3, "metric": "loss", "key": "all", "index": 0, "value": 0.5, "source": None},
        {"run": "demo", "step": 4, "metric": "loss", "key": "all", "index": 0, "value": 0.25,
         "source": "ckpt/step4.pt"},
    ]  # fmt: skip
    assert s["step"].dtype == np.int64 and s["index"].dtype == np.int64 and s["value"].dtype == np.float64
    e = run.events()
    assert list(e.columns) == [
        "run",
        "step",
        "kind",
        "severity",
        "metric",
        "key",
        "message",
        "data",
        "time",
        "source",
    ]
    first = e.iloc[0].to_dict()
    assert first == {"run": "demo", "step": 3, "kind": "edge_of_stability", "severity": "warning",
                     "metric": "sharpness", "key": "all", "message": "sharp",
                     "data": {"ratio": 1.02, "ok": True, "layers": ["a", "b"]}, "time": 1001.5, "source": None}  # fmt: skip
    assert e.iloc[1]["metric"] is None and e.iloc[1]["key"] is None and e.iloc[1]["data"] == {}
    st = run.status()
    assert list(st.columns) == [
        "run",
        "step",
        "diagnostic",
        "status",
        "reason",
        "seconds",
        "num_matvecs",
        "source",
    ]
    assert st[["diagnostic", "status", "reason", "seconds"]].values.tolist() == [
        ["basics", "ok", None, 0.01],
        ["hessian_eigen", "not_converged", "budget", 0.25],
    ]
    assert st["num_matvecs"].tolist() == [pd.NA, 60]
    assert run.sources()[["source", "step", "time"]].values.tolist() == [["ckpt/step4.pt", 4, 1002.0]]
    assert run.metrics() == ["grad_norm", "hessian_eigenvalue", "loss"]
    assert run.steps() == [3, 4]
    meta = run.meta
    assert meta["config"] == {"lr": 0.1} and meta["run_name"] == "demo"
    assert meta["schema_version"] == SCHEMA_VERSION and meta["created"] == "1970-01-01T00:16:40+00:00"
    assert "python" in meta["versions"]


def test_nan_and_infinities_round_trip(tmp_path):
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324]
    with RunWriter(tmp_path) as w:
        w.write_step(0, [Record("x", v, index=i) for i, v in enumerate(values)])
        w.write_step(1, [Record("y", np.float32("nan")), Record("z", np.float64("-inf"))])
    s = open_run(tmp_path).series()
    got = s[s.metric == "x"]["value"].tolist()
    assert math.isnan(got[0]) and got[1] == math.inf and got[2] == -math.inf and got[3:] == values[3:]
    assert math.isnan(s[s.metric == "y"]["value"].item()) and s[s.metric == "z"]["value"].item() == -math.inf
    # In the file itself: NaN is NULL, infinities are stored as REAL infinities.
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    raw = dict(conn.execute("SELECT idx, value FROM series WHERE metric = 'x'").fetchall())
    assert raw[0] is None and raw[1] == math.inf and raw[2] == -math.inf


def test_numpy_and_int_values_are_accepted(tmp_path):
    with RunWriter(tmp_path) as w:
        w.write_step(np.int64(2), [Record("a", np.float32(0.5), index=np.int32(1)), Record("b", 3),
                                   Record("c", np.array(2.5))])  # fmt: skip
    s = open_run(tmp_path).series()
    assert s["value"].tolist() == [0.5, 3.0, 2.5] and s["index"].tolist() == [1, 0, 0]


def test_rewriting_a_step_replaces_rows_and_different_metrics_add_up(tmp_path):
    with RunWriter(tmp_path) as w:
        w.write_step(1, [Record("loss", 1.0)], [Event("nonfinite", "m")], [Status("basics")])
        w.write_step(1, [Record("update_ratio", 0.1)])  # after the optimizer step: same step, other metric
        w.write_step(1, [Record("loss", 2.0)], [Event("nonfinite", "m")], [Status("basics", seconds=2.0)])
        w.write_step(1, [Record("loss", 3.0)], source="ck.pt")  # another source keeps its own row
        w.write_step(1, [Record("loss", 4.0)], source="ck.pt")
    run = open_run(tmp_path)
    s = run.series()
    assert s[["metric", "value", "source"]].values.tolist() == [
        ["loss", 2.0, None],
        ["loss", 4.0, "ck.pt"],
        ["update_ratio", 0.1, None],
    ]
    assert len(run.events()) == 1
    assert run.status()["seconds"].tolist() == [2.0]
    assert len(run.sources()) == 1


def test_resume_appends_and_refuses_without_resume(tmp_path):
    with RunWriter(tmp_path, meta={"config": {"a": 1}}) as w:
        w.write_step(0, [Record("loss", 1.0)], source="a.pt")
    with RunWriter(tmp_path, resume=True) as w:
        assert w.completed_sources() == {"a.pt"}
        w.write_step(1, [Record("loss", 0.5)], source="b.pt")
        assert w.completed_sources() == {"a.pt", "b.pt"}
    run = open_run(tmp_path)
    assert run.steps() == [0, 1] and run.meta["config"] == {"a": 1}
    with pytest.raises(
        StoreError, match=r"already holds a run \(2 steps.*another run directory.*resume=True.*overwrite=True"
    ):
        RunWriter(tmp_path, resume=False)
    with RunWriter(tmp_path, resume=False, overwrite=True) as w:
        assert w.completed_sources() == set()
    assert open_run(tmp_path).steps() == []


def test_resume_false_on_a_run_with_only_meta_is_fine(tmp_path):
    RunWriter(tmp_path).close()
    RunWriter(tmp_path, resume=False).close()


def test_set_meta_converts_numpy_and_rejects_objects_before_writing(tmp_path):
    with RunWriter(tmp_path) as w:
        w.set_meta("model_summary", {"num_params": np.int64(10), "shape": (2, 5), "arr": np.arange(3),
                                     "flag": np.bool_(True), "x": np.float32(0.5)})  # fmt: skip
        with pytest.raises(StoreError, match=r"meta\['config'\]\['opt'\].*object.*not JSON-serialisable"):
            w.set_meta("config", {"lr": 0.1, "opt": object()})
        with pytest.raises(StoreError, match="str keys"):
            w.set_meta("config", {1: 2})
        with pytest.raises(StoreError, match="schema_version"):
            w.set_meta("schema_version", 3)
    meta = open_run(tmp_path).meta
    assert meta["model_summary"] == {
        "num_params": 10,
        "shape": [2, 5],
        "arr": [0, 1, 2],
        "flag": True,
        "x": 0.5,
    }
    assert "config" not in meta


def test_bad_meta_in_constructor_creates_nothing(tmp_path):
    with pytest.raises(StoreError, match=r"meta\['config'\]\['f'\].*function"):
        RunWriter(tmp_path / "new", meta={"config": {"f": print}})
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "records, match",
    [
        ([Record("loss", "1.0")], r"records\[1\] \(metric 'loss'\)\.value must be a real number, got str"),
        ([Record("loss", None)], r"value must be a real number, got NoneType"),
        ([Record("loss", True)], r"value must be a real number, got bool"),
        ([Record("", 1.0)], r"records\[1\].*\.metric must be a non-empty str"),
        ([Record("loss", 1.0, key=None)], r"\.key must be a non-empty str"),
        ([Record("loss", 1.0, index=1.5)], r"\.index must be an int"),
        ([("loss", 1.0)], r"records\[1\] is a tuple, expected diagnostics.store.Record"),
    ],
)
def test_bad_records_write_nothing(tmp_path, records, match):
    with RunWriter(tmp_path) as w:
        with pytest.raises(StoreError, match=match):
            w.write_step(5, [Record("ok", 1.0), *records], [Event("nonfinite", "m")], [Status("basics")])
    run = open_run(tmp_path)
    assert run.steps() == [] and len(run.events()) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"events": [Event("k", "m", severity="fatal")]},
            r"events\[0\] \(kind 'k'\)\.severity must be one of",
        ),
        ({"events": [Event("k", "m", data={"t": object()})]}, r"events\[0\] \(kind 'k'\)\.data\['t'\]"),
        ({"events": [Event("k", "m", data=[1])]}, r"\.data must be a dict"),
        ({"statuses": [Status("d", "broken")]}, r"statuses\[0\] \(diagnostic 'd'\)\.status must be one of"),
        ({"statuses": [Status("d", num_matvecs=2.5)]}, r"num_matvecs must be an int"),
        ({"step": "3"}, r"step must be an int"),
        ({"source": ""}, r"source must be a non-empty str"),
    ],
)
def test_bad_events_statuses_steps_write_nothing(tmp_path, kwargs, match):
    args = {"step": 1, "records": [Record("loss", 1.0)], **kwargs}
    with RunWriter(tmp_path) as w:
        with pytest.raises(StoreError, match=match):
            w.write_step(**args)
    assert open_run(tmp_path).steps() == []


def test_closed_writer_raises(tmp_path):
    w = RunWriter(tmp_path)
    w.close()
    w.close()
    with pytest.raises(StoreError, match="closed"):
        w.write_step(0, [Record("loss", 1.0)])


def test_unwritable_directory_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=f"cannot create run directory {blocker / 'run'}"):
        RunWriter(blocker / "run")


def test_read_only_directory_names_the_path(tmp_path, monkeypatch):
    # Root ignores permission bits, so simulate the check's answer rather than chmod.
    monkeypatch.setattr("diagnostics.store.writer.os.access", lambda path, mode: False)
    with pytest.raises(StoreError, match=f"run directory {tmp_path} is not writable"):
        RunWriter(tmp_path)


def _set_version(path, version):
    conn = sqlite3.connect(path / "run.sqlite")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.commit()
    conn.close()


def test_newer_schema_is_refused_with_both_versions(tmp_path):
    with RunWriter(tmp_path) as w:
        w.write_step(0, [Record("loss", 1.0)])
    _set_version(tmp_path, SCHEMA_VERSION + 1)
    pattern = rf"schema version {SCHEMA_VERSION + 1}.*schema version {SCHEMA_VERSION} at most; upgrade"
    with pytest.raises(SchemaVersionError, match=pattern):
        RunWriter(tmp_path)
    with pytest.raises(SchemaVersionError, match=pattern):
        open_run(tmp_path)


def test_older_schema_without_migration_is_refused(tmp_path):
    RunWriter(tmp_path).close()
    _set_version(tmp_path, 0)
    with pytest.raises(
        StoreError, match="schema version 0, which this training-diagnostics .* cannot migrate"
    ):
        RunWriter(tmp_path)


def test_older_schema_is_migrated_by_the_writer(tmp_path, monkeypatch):
    with RunWriter(tmp_path) as w:
        w.write_step(0, [Record("loss", 1.0)])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(schema, "READABLE_FROM", SCHEMA_VERSION + 1)  # a change the reader cannot skip
    monkeypatch.setitem(schema.MIGRATIONS, SCHEMA_VERSION, ["ALTER TABLE series ADD COLUMN note TEXT"])
    with pytest.raises(StoreError, match="open it once with RunWriter"):
        open_run(tmp_path)
    with RunWriter(tmp_path) as w:
        w.write_step(1, [Record("loss", 0.5)])
    run = open_run(tmp_path)
    assert run.meta["schema_version"] == SCHEMA_VERSION + 1 and run.steps() == [0, 1]


def test_a_version_1_store_is_read_as_it_is_and_migrated_by_a_resuming_writer(tmp_path):
    layers = [Record("grad_norm", float(i), key=f"layer{i}.weight") for i in range(6)]
    with RunWriter(tmp_path) as w:
        # Written long, as version 1 did: one row per layer (too few keys to become a vector).
        for r in layers[:3]:
            w.write_step(0, [Record("loss", 1.0), r])
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("DROP TABLE vectors")
    conn.commit()
    conn.close()
    _set_version(tmp_path, 1)
    with open_run(tmp_path) as run:
        assert run.schema_version == 1 and run.metrics() == ["grad_norm", "loss"] and run.steps() == [0]
        assert sorted(run.series("grad_norm").key) == ["layer0.weight", "layer1.weight", "layer2.weight"]
    with RunWriter(tmp_path) as w:  # resuming migrates: the vectors table appears, old rows stay
        w.write_step(1, [Record("loss", 0.5), *layers])
    with open_run(tmp_path) as run:
        assert run.meta["schema_version"] == SCHEMA_VERSION == 2
        df = run.series("grad_norm")
        assert list(df.step) == [0, 0, 0, 1, 1, 1, 1, 1, 1] and df.value.tolist()[3:] == [0, 1, 2, 3, 4, 5]
        assert run._query("SELECT count(*) FROM vectors")[0][0] == 1


def test_not_a_store(tmp_path):
    (tmp_path / "run.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="not a run store"):
        RunWriter(tmp_path)
    with pytest.raises(StoreError, match="not a run store"):
        open_run(tmp_path)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a training-diagnostics run store"):
        open_run(other)


def test_wal_mode_and_normal_sync(tmp_path):
    w = RunWriter(tmp_path)
    assert w._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert w._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    w.close()


def test_writes_from_several_threads_stay_whole(tmp_path):
    import threading

    with RunWriter(tmp_path) as w:

        def work(t):
            for step in range(t * 100, t * 100 + 20):
                w.write_step(step, [Record("m", float(i), index=i) for i in range(10)], source=f"s{step}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    run = open_run(tmp_path)
    assert len(run.steps()) == 80 and (run.series().groupby("step").size() == 10).all()
