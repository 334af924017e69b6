"""The exploratory sweep behind configs.py: single knobs and combinations, seed 0, nothing recorded.

    python -m benchmarks.explosions.sweep                 # every candidate (about 25 runs, ~5-20 s each)
    python -m benchmarks.explosions.sweep lr3e-1 J300     # a few

Prints per candidate: explosion step (explosion.py), last step, seconds, min loss, max loss after step
20, and the loss every 25 steps. FINDINGS.md lists the outcome.
"""

from __future__ import annotations

import math
import sys

import torch

from benchmarks.explosions.trainer import TrainConfig, train

_L4 = {"n_layers": 4}
_QK = {"qk_layernorm": True}
_BIGEMB = {"embedding_std": 1.0, "residual_init_scale": 10.0}
_ADAM = {"beta2": 0.9999, "eps": 1e-12}
_RAMP = {"lr": 1e-3, "bump_step": 100, "bump_ramp": 100}

CANDIDATES: dict[str, dict] = {
    # high constant lr, no warm-up, with and without qk-LayerNorm
    "lr1e-2": {"lr": 1e-2},
    "lr3e-2": {"lr": 3e-2},
    "lr1e-1": {"lr": 1e-1},
    "lr3e-1": {"lr": 3e-1},
    "lr3e-1-warm100": {"lr": 3e-1, "warmup_steps": 100},
    "lr3e-2-qkln": {"lr": 3e-2, "model": _QK},
    "lr1e-1-qkln": {"lr": 1e-1, "model": _QK},
    "lr1-qkln": {"lr": 1.0, "model": _QK},
    "lr1e-2-l4d128": {"lr": 1e-2, "model": {"n_layers": 4, "d_model": 128}},
    "lr3e-2-b8-l4": {"lr": 3e-2, "batch_size": 8, "model": _L4},
    "lr3e-2-tied": {"lr": 3e-2, "model": {"tie_weights": True}},
    # Adam with large beta2 and tiny eps
    "adam-lr3e-3": {"lr": 3e-3, **_ADAM},
    "adam-lr1e-2": {"lr": 1e-2, **_ADAM},
    "adam-lr3e-2": {"lr": 3e-2, **_ADAM},
    "adam-lr3e-2-l4": {"lr": 3e-2, **_ADAM, "model": _L4},
    "lr3e-1-adam": {"lr": 3e-1, **_ADAM},
    # unscaled embeddings, large residual init
    "bigemb-lr3e-3": {"lr": 3e-3, "model": _BIGEMB},
    "bigemb-lr1e-2": {"lr": 1e-2, "model": _BIGEMB},
    "bigemb-scale8-adam": {"lr": 1e-2, "beta2": 0.999, "eps": 1e-12, "model": {**_BIGEMB, "embedding_scale": 8.0}},
    # learning-rate jump at step 150 and ramps from step 100 over 100 steps
    "J30": {"lr": 1e-3, "bump_step": 150, "bump_factor": 30},
    "J50": {"lr": 1e-3, "bump_step": 150, "bump_factor": 50},
    "J100": {"lr": 1e-3, "bump_step": 150, "bump_factor": 100},
    "J300": {"lr": 1e-3, "bump_step": 150, "bump_factor": 300},
    "J30-qkln": {"lr": 1e-3, "bump_step": 150, "bump_factor": 30, "model": _QK},
    "J100-qkln": {"lr": 1e-3, "bump_step": 150, "bump_factor": 100, "model": _QK},
    "R100-r50": {**_RAMP, "bump_factor": 100, "bump_ramp": 50},
    "R100-r50-qkln": {**_RAMP, "bump_factor": 100, "bump_ramp": 50, "model": _QK},
    "R100-r50-adam": {**_RAMP, "bump_factor": 100, "bump_ramp": 50, **_ADAM},
    "R300": {**_RAMP, "bump_factor": 300},
    "R300-adam": {**_RAMP, "bump_factor": 300, **_ADAM},
    "R300-bigemb": {**_RAMP, "bump_factor": 300, "model": _BIGEMB},
    "R500": {**_RAMP, "bump_factor": 500},
    "R500-qkln": {**_RAMP, "bump_factor": 500, "model": _QK},
    "R1000": {**_RAMP, "bump_factor": 1000},
    "R1000-qkln": {**_RAMP, "bump_factor": 1000, "model": _QK},
}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    names = argv or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        print(f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}", file=sys.stderr)
        return 2
    for name in names:
        res = train(TrainConfig(name, steps=300, **CANDIDATES[name]), None)
        losses = res["losses"]
        late = [v if math.isfinite(v) else math.inf for v in losses[20:]]
        print(
            f"{name:20s} explosion={res['explosion_step']} last={res['final_step']} {res['seconds']:.1f}s "
            f"min={min(losses):.2f} max20+={max(late):.2f} | " + " ".join(f"{v:.2f}" for v in losses[::25]),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
