"""The synthetic run holds every metric ID, events and statuses, and is reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diagnostics.errors import StoreError
from diagnostics.store import open_run
from diagnostics.testing.synthetic import (
    SCHEDULE,
    SYNTHETIC_EVENT_KINDS,
    SYNTHETIC_METRICS,
    write_synthetic_run,
)

CONTRACT_METAKEYS = {"run_name", "created", "schema_version", "versions", "config", "model_summary",
                     "model_fingerprint", "diagnostics", "gradients_seen", "loss_reduction", "curvature_mode",
                     "num_classes"}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    healthy = open_run(write_synthetic_run(d / "healthy", steps=120, layers=2))
    exploding = open_run(
        write_synthetic_run(d / "exploding", steps=120, layers=2, explode_at=80, name="boom")
    )
    return healthy, exploding


def test_every_metric_and_meta_key(runs):
    healthy, exploding = runs
    assert sorted(healthy.metrics()) == sorted(SYNTHETIC_METRICS) == sorted(exploding.metrics())
    assert sorted({m for _, ms in SCHEDULE.values() for m in ms} | {"monitor_seconds", "monitor_overhead", "monitor_stride"}) == sorted(
        SYNTHETIC_METRICS
    )
    assert CONTRACT_METAKEYS <= set(healthy.meta)
    assert healthy.name == "healthy" and exploding.name == "boom"
    assert set(healthy.series("monitor_seconds")["key"]) == set(SCHEDULE)


def test_statuses_and_events(runs):
    healthy, exploding = runs
    st = healthy.status()
    assert {"ok", "not_converged", "failed"} == set(st.status)
    failed = st[st.status == "failed"].iloc[0]
    # A failed estimate writes no numbers at its step.
    assert (
        healthy.series(failed["diagnostic"].replace("_eigen", "_eigenvalue"))
        .query(f"step == {failed['step']}")
        .empty
    )
    nc = st[st.status == "not_converged"].iloc[0]
    conv = healthy.series("hessian_converged").query(f"step == {nc['step']}")["value"].tolist()
    assert conv == [1.0, 1.0, 0.0]
    assert {"edge_of_stability", "nonfinite", "estimator_failed"} <= set(healthy.events()["kind"])
    assert set(exploding.events()["kind"]) == set(SYNTHETIC_EVENT_KINDS)


def test_values_are_consistent(runs):
    healthy, exploding = runs
    s = healthy.series()
    hist = s[s.metric == "sa_histogram"].groupby(["step", "key"])["value"].sum()
    assert np.allclose(hist, 1.0)
    w = s[s.metric == "hessian_density_weight"]
    assert w["index"].max() == 15
    assert np.allclose(w.groupby(["step", w["index"] // 8])["value"].sum(), 1.0)
    eig = s[s.metric == "hessian_eigenvalue"].pivot(index="step", columns="index", values="value")
    assert (eig[0] >= eig[1]).all() and (eig[1] >= eig[2]).all()
    ratio = s[s.metric == "sharpness_ratio"].set_index("step")["value"]
    lr = s[s.metric == "learning_rate"].set_index("step")["value"]
    sharp = s[s.metric == "sharpness"].set_index("step")["value"]
    assert np.allclose(ratio, sharp * lr.loc[ratio.index] / 2)
    loss = exploding.series("loss")["value"].tolist()
    assert all(math.isfinite(v) for v in loss[:80]) and math.isinf(loss[88]) and math.isnan(loss[-1])
    div = exploding.series("sa_sign_diversity").pivot(index="step", columns="key", values="value")
    assert div.loc[75].min() < 0.2 < div.loc[0].median()


def test_reproducible_and_refuses_existing(tmp_path):
    a = open_run(write_synthetic_run(tmp_path / "a", steps=30, layers=1, seed=3, name="x"))
    b = open_run(write_synthetic_run(tmp_path / "b", steps=30, layers=1, seed=3, name="x"))
    assert a.series().equals(b.series())
    assert a.events().equals(b.events()) and a.status().equals(b.status()) and a.meta == b.meta
    with pytest.raises(StoreError, match="already holds a run"):
        write_synthetic_run(tmp_path / "a", steps=5)
    write_synthetic_run(tmp_path / "a", steps=5, overwrite=True)
    assert open_run(tmp_path / "a").steps() == list(range(5))
