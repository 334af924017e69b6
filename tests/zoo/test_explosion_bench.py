"""The explosion benchmark's recording, causal scores and leave-one-mechanism-out scoring."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.explosions import score as score_mod
from benchmarks.explosions.signals import RunSignals, load_run, score_signal


def test_auroc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)
    y = rng.random(200) < 0.3
    assert score_mod.auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    s[:10] = np.nan  # no opinion ranks lowest
    assert score_mod.auroc(s, y) == pytest.approx(roc_auc_score(y, np.where(np.isnan(s), -1e9, s)))
    assert math.isnan(score_mod.auroc(s, np.zeros(200, bool)))


def test_scores_are_causal() -> None:
    rng = np.random.default_rng(1)
    x = np.exp(rng.normal(size=300))
    y = x.copy()
    y[200:] *= 50.0  # the future changes
    for setting in (("z", 25), ("growth", 10)):
        a, b = score_signal(x, setting, "log", "up"), score_signal(y, setting, "log", "up")
        np.testing.assert_array_equal(a[:200], b[:200])
        assert not np.array_equal(a[200:], b[200:])
    down = score_signal(x, ("z", 25), "log", "down")
    np.testing.assert_array_equal(down[20:], -score_signal(x, ("z", 25), "log", "up")[20:])


def fake_run(name: str, mech: str, explosion: int | None, seed: int, lead_signal: bool) -> RunSignals:
    rng = np.random.default_rng(seed)
    n = 400 if explosion is None else explosion + 20
    loss = 3 + 0.05 * rng.normal(size=n)
    warn = rng.normal(size=n)
    if explosion is not None and lead_signal:
        warn[explosion - 60:] += np.linspace(0, 30, n - explosion + 60)  # rises 60 steps before
    run = RunSignals(name, mech, "exploding" if explosion else "stable", seed, n - 1, explosion, None)
    ones = np.ones(n)
    run.scalars = {k: ones.copy() for k in ("lr", "grad_norm", "attn_logit_max", "attn_entropy_min",
                                            "output_logit_max", "output_log_z_max", "adam_update_rms",
                                            "adam_update_grad_cosine", "adam_small_grad_fraction")}
    run.scalars["loss"] = np.exp(loss)
    run.scalars["grad_norm"] = np.exp(warn)
    run.layers = {"sigma1": np.ones((n, 2)), "sign_diversity": np.full((n, 2), 0.5)}
    run.layer_names = ["a", "b"]
    return run


def test_leave_one_mechanism_out_finds_the_leading_signal(monkeypatch) -> None:
    monkeypatch.setattr(score_mod, "BOOTSTRAP", 20)
    runs = []
    for mech in ("m1", "m2", "m3"):
        for seed in range(4):
            runs.append(fake_run(f"{mech}x{seed}", mech, 250 + 10 * seed, seed, True))
            runs.append(fake_run(f"{mech}s{seed}", mech, None, 100 + seed, True))
    res = score_mod.evaluate(runs, detectors=["grad_norm", "loss", "step"])
    g, lo = res["detectors"]["grad_norm"], res["detectors"]["loss"]
    assert g["pooled"]["auroc_50"] > 0.9 and g["pooled"]["recall_10"] >= 0.9
    assert g["pooled"]["false_alarms"] <= 0.25
    assert lo["pooled"]["auroc_50"] < 0.75  # the loss carries no warning here
    lo_iv = g["interval"]["auroc_50"]
    assert lo_iv[0] <= g["pooled"]["auroc_50"] <= lo_iv[1]
    assert set(g["settings"]) == {"m1", "m2", "m3"}
    assert res["detectors"]["combination"]["pooled"]["auroc_50"] > 0.9


def test_threshold_lets_at_most_ten_percent_of_stable_runs_alarm() -> None:
    stable = [fake_run(f"s{i}", "m", None, i, False) for i in range(20)]
    scores = {r.name: np.full(10, float(i)) for i, r in enumerate(stable)}
    tau = score_mod._threshold(stable, scores)
    assert sum(float(s.max()) > tau for s in scores.values()) == 2


def test_recorded_run_has_every_signal(tmp_path) -> None:
    import torch

    from benchmarks.explosions.family import BASE
    from benchmarks.explosions.record import train

    torch.manual_seed(0)
    cfg = replace(BASE, name="probe", model={"d_model": 32, "n_layers": 2, "n_heads": 2}, steps=25,
                  warmup_steps=5, z_loss=1e-4)
    res = train(cfg, tmp_path / "run")
    assert res["final_step"] == 24 and res["explosion_step"] is None
    run = load_run(tmp_path / "run", {"probe": ("m", "stable")})
    assert run is not None and run.steps == 25
    for name, arr in run.scalars.items():
        assert np.isfinite(arr[1:]).all(), name  # every signal every step (adam's first step included)
    assert run.layers["sigma1"].shape == (25, len(run.layer_names)) and len(run.layer_names) >= 12
    assert np.isfinite(run.layers["sign_diversity"][1:]).all()


def test_gpt_without_normalisation() -> None:
    import torch
    from torch import nn

    from diagnostics.errors import ConfigError
    from diagnostics.zoo import get_model

    plain = get_model("tiny-gpt", seed=0, norm="none")
    assert not any(isinstance(m, nn.LayerNorm) for m in plain.modules())
    normed = get_model("tiny-gpt", seed=0)
    assert sum(isinstance(m, nn.LayerNorm) for m in normed.modules()) == 2 * 2 + 1
    ids = torch.randint(0, 96, (2, 8))
    assert plain(ids).shape == normed(ids).shape == (2, 8, 96)
    with pytest.raises(ConfigError, match="norm"):
        get_model("tiny-gpt", norm="post")


@pytest.mark.parametrize("det,setting", [("sa_sign_diversity", ("z", 25)), ("sigma1", ("growth", 10)),
                                         ("grad_norm", ("z", 25)), ("attn_logit_max", ("growth", 10))])
def test_benchmark_scores_are_the_library_detectors(det: str, setting: tuple) -> None:
    from benchmarks.explosions.detectors import DETECTORS, library_feature
    from diagnostics.explosion.signal_detector import SignalDetectorCore

    rng = np.random.default_rng(3)
    run = fake_run("r", "m", 200, 0, True)
    run.layers = {"sigma1": np.exp(rng.normal(size=(220, 3))), "sign_diversity": rng.random((220, 3))}
    run.layers["sigma1"][50, 1] = np.nan  # a layer without a record at a step
    run.layer_names = ["a", "b", "c"]
    run.scalars["attn_logit_max"] = rng.normal(size=220) * 5
    bench = DETECTORS[det].fn(run, setting)
    core = SignalDetectorCore([library_feature(det, setting)], threshold=1e9)
    metric = core.features[0].metric
    matrix = {"sa_sigma1": "sigma1", "sa_sign_diversity": "sign_diversity"}.get(metric)
    state: dict = {}
    lib = []
    for t in range(run.steps):
        if matrix:
            vals = {(metric, k): float(run.layers[matrix][t, j]) for j, k in enumerate(run.layer_names)
                    if not np.isnan(run.layers[matrix][t, j])}
        else:
            vals = {(metric, "all"): float(run.scalars[det][t])}
        lib.append(core.update(state, t, vals)[0])
    np.testing.assert_allclose(np.nan_to_num(bench, nan=-7.0), np.nan_to_num(np.array(lib), nan=-7.0), rtol=1e-12)
