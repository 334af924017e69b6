"""Per-step signals of one recorded run of the explosion benchmark, and the causal scores built on them.

A run's store (record.py) becomes a :class:`RunSignals`: one float array per signal over steps
0..final_step (NaN where nothing was recorded), per-layer matrices for sigma_1 and sign diversity, and
the run's labels. A *score* turns signals into one number per step, higher meaning "more alarming",
using only steps up to t, with its baseline learned from the run itself:

- ``z`` (half-life h): (x_t - mean) / sd, mean and variance exponentially weighted over the steps before
  t with half-life h (the baseline moves with the run; no fixed window, no step marker);
- ``growth`` (window w): x_t - x_{t-w} (on a log scale for positive signals: a growth rate).

Every signal detector gets the same four settings: z with h = 25 and 100, growth with w = 10 and 50.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.explosions.explosion import explosion_step

__all__ = ["RunSignals", "load_run", "ema_z", "growth", "SETTINGS", "transform"]

#: (metric, key) of the whole-model signals read from a store, by signal name.
SCALARS: dict[str, tuple[str, str]] = {
    "loss": ("loss", "all"),
    "lr": ("learning_rate", "all"),
    "grad_norm": ("grad_norm", "all"),
    "attn_logit_max": ("attn_logit_max", "all"),
    "attn_entropy_min": ("attn_entropy_min", "all"),
    "output_logit_max": ("output_logit_max", "all"),
    "output_log_z_max": ("output_log_z_max", "all"),
    "adam_update_rms": ("adam_update_rms", "all"),
    "adam_update_grad_cosine": ("adam_update_grad_cosine", "all"),
    "adam_small_grad_fraction": ("adam_small_grad_fraction", "all"),
}
#: per-layer signals (metric -> matrix name)
LAYERED = {"sa_sigma1": "sigma1", "sa_sign_diversity": "sign_diversity"}

#: the four settings every signal detector is tuned over
SETTINGS: tuple[tuple[str, int], ...] = (("z", 25), ("z", 100), ("growth", 10), ("growth", 50))


@dataclass
class RunSignals:
    """One run: its name, mechanism, member ("exploding" or "stable" twin), seed, labels and signals."""

    name: str
    mechanism: str
    member: str
    seed: int
    final_step: int
    explosion: int | None
    perturbation: int | None
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [steps, layers]
    layer_names: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.final_step + 1

    def label(self, factor: float = 2.0, patience: int = 10) -> int | None:
        """The explosion step under another factor or patience (warm-up 20), from the stored losses."""
        return explosion_step(list(self.scalars["loss"]), factor=factor, patience=patience)


def load_run(run_dir: str | Path, mechanisms: dict[str, tuple[str, str]]) -> RunSignals | None:
    """Read one complete run store; None when the run is incomplete. ``mechanisms`` maps a config name
    to (mechanism, member)."""
    from diagnostics.store import open_run

    with open_run(run_dir) as run:
        meta = run.meta
        if not meta.get("complete"):
            return None
        cfg = meta["config"]
        metrics = [m for m, _ in SCALARS.values()] + list(LAYERED)
        df = run.series(metrics)
    final = int(meta["final_step"])
    mech, member = mechanisms[cfg["name"]]
    bump = cfg.get("bump_step")
    out = RunSignals(
        name=f"{cfg['name']}__s{cfg['seed']}", mechanism=mech, member=member, seed=int(cfg["seed"]),
        final_step=final, explosion=meta.get("explosion_step"), perturbation=bump,
    )
    df = df[(df["index"] == 0) & (df["step"] <= final)]
    for name, (metric, key) in SCALARS.items():
        sub = df[(df["metric"] == metric) & (df["key"] == key)]
        arr = np.full(final + 1, np.nan)
        arr[sub["step"].to_numpy()] = sub["value"].to_numpy()
        out.scalars[name] = arr
    for metric, name in LAYERED.items():
        sub = df[df["metric"] == metric]
        keys = sorted(set(sub["key"]))
        mat = np.full((final + 1, len(keys)), np.nan)
        col = {k: i for i, k in enumerate(keys)}
        mat[sub["step"].to_numpy(), sub["key"].map(col).to_numpy()] = sub["value"].to_numpy()
        out.layers[name] = mat
        out.layer_names = keys
    return out


def transform(x: np.ndarray, kind: str) -> np.ndarray:
    """``log`` (positive signals; non-positive -> NaN), ``slog`` (sign * log1p |x|) or ``raw``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "log":
            return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)
        if kind == "slog":
            return np.sign(x) * np.log1p(np.abs(x))
    return x.astype(float)


def ema_z(x: np.ndarray, half_life: int, min_obs: int = 20) -> np.ndarray:
    """Causal z-score of each entry against the exponentially weighted mean and variance of the finite
    entries before it (half-life in steps); NaN for the first ``min_obs`` finite entries. A non-finite
    entry after that scores +inf (a signal that overflowed has left its range). Cost O(n)."""
    alpha = 1.0 - 0.5 ** (1.0 / half_life)
    out = np.full(x.shape, np.nan)
    mean = var = 0.0
    seen = 0
    for t, v in enumerate(x):
        if not math.isfinite(v):
            if seen >= min_obs:
                out[t] = math.inf
            continue
        if seen >= min_obs:
            sd = math.sqrt(var) + 1e-3 * abs(mean) + 1e-8
            out[t] = (v - mean) / sd
        if seen == 0:
            mean, var = v, 0.0
        else:
            d = v - mean
            mean += alpha * d
            var = (1 - alpha) * (var + alpha * d * d)
        seen += 1
    return out


def growth(x: np.ndarray, window: int) -> np.ndarray:
    """x_t - x_{t-window} (NaN where either is missing; +inf where x_t is not finite but was)."""
    out = np.full(x.shape, np.nan)
    if len(x) > window:
        a, b = x[window:], x[:-window]
        with np.errstate(invalid="ignore"):
            d = a - b
        d = np.where(~np.isfinite(a) & np.isfinite(b), np.inf, d)
        out[window:] = d
    return out


def score_signal(x: np.ndarray, setting: tuple[str, int], kind: str, direction: str) -> np.ndarray:
    """One setting's score of signal ``x``: transformed by ``kind``, then z or growth, signed by
    ``direction`` ("up", "down" or "both" = absolute value)."""
    y = transform(x, kind)
    how, n = setting
    s = ema_z(y, n) if how == "z" else growth(y, n)
    if direction == "down":
        s = -s
    elif direction == "both":
        s = np.abs(s)
    return s


def summarise(run: RunSignals) -> dict[str, Any]:
    """What a results table lists about a run."""
    return {"name": run.name, "mechanism": run.mechanism, "member": run.member, "seed": run.seed,
            "explosion": run.explosion, "final_step": run.final_step, "perturbation": run.perturbation}
