"""run_summary (what ``tdiag ls`` prints) against a brute-force pandas reference on synthetic stores."""

from __future__ import annotations

import math

import pytest

from diagnostics.errors import StoreError
from diagnostics.store import Event, Record, RunWriter, combine_runs, open_run
from diagnostics.store.summary import run_summary
from diagnostics.testing.synthetic import write_synthetic_run


def reference(path, max_events=20):
    """The summary from whole tables in pandas: every row read, grouped in memory."""
    with open_run(path) as run:
        meta, series, events, status = run.meta, run.series(), run.events(), run.status()
        sources, steps = run.sources(), run.steps()
    metrics = []
    for metric, df in series.groupby("metric", sort=True):
        last_step = int(df["step"].max())
        last = df[(df["step"] == last_step) & (df["index"] == df["index"].min())]
        at_all = last[last["key"] == "all"]
        value = float(at_all["value"].iloc[0]) if not at_all.empty else (
            float(last["value"].iloc[0]) if len(last) == 1 else None)
        metrics.append({"metric": metric, "keys": df["key"].nunique(), "steps": df["step"].nunique(),
                        "first_step": int(df["step"].min()), "last_step": last_step, "last_value": value,
                        "last_min": float(last["value"].min()), "last_max": float(last["value"].max())})
    bad = status[status["status"] != "ok"]
    return {
        "run": meta.get("run_name"), "created": meta.get("created"), "steps": len(steps),
        "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
        "checkpoints_analysed": len(sources), "metrics": metrics, "num_events": len(events),
        "events": [(int(e.step), e.kind, e.severity, e.key, e.message) for e in events.head(max_events).itertuples()],
        "not_ok": {str(k): int(v) for k, v in bad.groupby("status").size().items()},
    }


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def check(path, max_events=20):
    got, want = run_summary(path, max_events=max_events), reference(path, max_events)
    for field in ("run", "created", "steps", "first_step", "last_step", "checkpoints_analysed", "num_events",
                  "not_ok"):
        assert got[field] == want[field], field
    assert [(e["step"], e["kind"], e["severity"], e["key"], e["message"]) for e in got["events"]] == want["events"]
    assert [m["metric"] for m in got["metrics"]] == [m["metric"] for m in want["metrics"]]
    for g, w in zip(got["metrics"], want["metrics"]):
        assert all(same(g[k], w[k]) for k in w), (g, w)
    return got


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("summary")
    healthy = write_synthetic_run(d / "healthy", steps=41, layers=1, seed=0)
    boom = write_synthetic_run(d / "boom", steps=90, layers=1, seed=1, explode_at=60)
    combined = combine_runs([healthy, boom], d / "combined").path.parent
    return {"healthy": healthy, "boom": boom, "combined": combined, "dir": d}


def test_matches_the_reference_on_synthetic_runs(stores):
    got = check(stores["boom"], max_events=5)
    by_metric = {m["metric"]: m for m in got["metrics"]}
    assert by_metric["loss"]["kind"] == "scalar" and math.isnan(by_metric["loss"]["last_value"])
    assert by_metric["sa_sign_diversity"]["last_value"] is None and by_metric["sa_sign_diversity"]["keys"] == 5
    assert len(got["events"]) == 5 < got["num_events"]
    check(stores["healthy"])


def test_matches_the_reference_with_several_sources(stores):
    # Two inputs, each its own source: the 'all' row of the first source wins, as in the reference.
    check(stores["combined"])


def test_rows_only_per_layer_unknown_metric_and_nan(tmp_path):
    with RunWriter(tmp_path / "run") as w:
        w.write_step(0, [Record("custom", 1.0, key="a"), Record("custom", 2.0, key="b")])
        w.write_step(1, [Record("custom", math.nan, key="a"), Record("custom", 3.0, key="b"),
                         Record("solo", 4.0, key="only")], [Event("note", "hello", key="a")])
    got = check(tmp_path / "run")
    custom, solo = got["metrics"]
    assert custom["kind"] is None and custom["last_value"] is None
    assert custom["last_min"] == custom["last_max"] == 3.0 and solo["last_value"] == 4.0


def test_not_a_run(tmp_path):
    with pytest.raises(StoreError):
        run_summary(tmp_path)
