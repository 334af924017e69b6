"""Per-step signals of one recorded run of the explosion benchmark, and the causal scores built on them.

A run's store (record.py) becomes a :class:`RunSignals`: one float array per signal over steps
0..final_step (NaN where nothing was recorded), per-layer matrices for sigma_1 and sign diversity, and
the run's labels. A *score* turns signals into one number per step, higher meaning "more alarming",
using only steps up to t, with its baseline learned from the run itself: the library's
:class:`~diagnostics.explosion.signal_detector.Feature` (the same code that warns in the loop):

- ``z`` (half-life h): (y_t - mean) / sd, mean and variance exponentially weighted over the steps before
  t with half-life h (the baseline moves with the run; no fixed window, no step marker);
- ``growth`` (window w): y_t - y_{t-w} (on a log scale for positive signals: a growth rate).

Every signal detector gets the same four settings: z with h = 25 and 100, growth with w = 10 and 50.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.explosions.explosion import explosion_step

__all__ = ["RunSignals", "load_run", "score_signal", "SETTINGS"]

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


def score_signal(x: np.ndarray, setting: tuple[str, int], kind: str, direction: str) -> np.ndarray:
    """One setting's score of signal ``x`` per step: the library's
    :class:`~diagnostics.explosion.signal_detector.Feature` (transform ``kind``, method and window from
    ``setting``, ``direction``) fed the steps in order; NaN entries count as not recorded."""
    from diagnostics.explosion.signal_detector import Feature

    how, n = setting
    feature = Feature("signal", transform=kind, direction=direction, method=how, window=n)
    state: dict[str, Any] = {}
    return np.array([feature.update(state, None if math.isnan(v) else float(v)) for v in x], dtype=float)


def summarise(run: RunSignals) -> dict[str, Any]:
    """What a results table lists about a run."""
    return {"name": run.name, "mechanism": run.mechanism, "member": run.member, "seed": run.seed,
            "explosion": run.explosion, "final_step": run.final_step, "perturbation": run.perturbation}
