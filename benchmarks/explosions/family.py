"""The explosion benchmark's model family, its mechanisms and their twins.

Every run trains a character-level GPT (zoo ``tiny-gpt`` class) with d_model 128, 4 layers, 4 heads,
T 64 (826k parameters with pre-LN) on ``pydoc_data.topics`` text, batch 8 x 64, AdamW (beta1 0.9,
beta2 0.95, eps 1e-8, weight decay 0.1), no clipping, 1,000 steps: linear warm-up over 100 steps, then
cosine decay to 10% of the peak learning rate, unless the mechanism changes the schedule.

Each mechanism is a pair of configurations that differ in one knob: the ``exploding`` member is meant to
diverge, the ``stable`` twin is the same run with the knob that prevents it. A run's label is what it
did (the explosion rule on its losses), not which member it is.

``MECHANISMS`` maps a mechanism name to (exploding config, stable config); ``SEEDS`` are the suite's
seeds and ``QUICK`` the subset ``--quick`` runs.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.explosions.trainer import TrainConfig

__all__ = ["BASE", "MECHANISMS", "SEEDS", "QUICK", "configs", "perturbation_start"]

SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)

_GPT = {"d_model": 128, "n_layers": 4, "n_heads": 4}

BASE = TrainConfig(
    name="base",
    model=_GPT,
    steps=1000,
    batch_size=8,
    block_size=64,
    lr=1e-3,
    warmup_steps=100,
    schedule="cosine",
    weight_decay=0.1,
)


def _cfg(name: str, **changes) -> TrainConfig:
    model = {**_GPT, **changes.pop("model", {})}
    return replace(BASE, name=name, model=model, **changes)


_QK = {"qk_layernorm": True}
_NO_NORM = {"norm": "none"}

#: mechanism -> (exploding member, stable twin). The learning rates come from a seed-0 sweep (FINDINGS.md):
#: with pre-LN the model trains at a constant 0.3 for 1,000 steps and explodes at 0.4 and above.
MECHANISMS: dict[str, tuple[TrainConfig, TrainConfig]] = {
    # 1. attention-logit growth: no qk-LayerNorm at a high constant learning rate, vs with it.
    "attention-logits": (
        _cfg("attn-noqk-lr0.4", lr=0.4, schedule="constant"),
        _cfg("attn-qkln-lr0.4", lr=0.4, schedule="constant", model=_QK),
    ),
    # 2. output-logit divergence: no weight decay, no z-loss, vs z-loss 1e-4.
    "output-logits": (
        _cfg("logits-wd0-lr0.4", lr=0.4, schedule="constant", weight_decay=0.0),
        _cfg("logits-wd0-zloss-lr0.4", lr=0.4, schedule="constant", weight_decay=0.0, z_loss=1e-4),
    ),
    # 3. no normalisation, warm-up to a high learning rate, vs the pre-LN model.
    "no-norm": (
        _cfg("nonorm-lr1e-2", lr=1e-2, model=_NO_NORM),
        _cfg("preln-lr1e-2", lr=1e-2),
    ),
    # 4. Adam: beta2 0.999 with a tiny eps, vs beta2 0.95 (same eps).
    "adam-beta2": (
        _cfg("adam-b2-0.999-lr0.3", lr=0.3, schedule="constant", beta2=0.999, eps=1e-12),
        _cfg("adam-b2-0.95-lr0.3", lr=0.3, schedule="constant", beta2=0.95, eps=1e-12),
    ),
    # 5. a constant learning rate at the edge of the stable range (no normalisation): onset at a random
    #    step, vs 0.7 x that rate.
    "edge-lr": (
        _cfg("edge-nonorm-lr5e-3", lr=5e-3, schedule="constant", model=_NO_NORM),
        _cfg("edge-nonorm-lr3.5e-3", lr=3.5e-3, schedule="constant", model=_NO_NORM),
    ),
    # 6. a learning-rate ramp from step 300 over 200 steps: x1000 (to about 0.6) vs x100.
    "lr-ramp": (
        _cfg("ramp-x1000", bump_step=300, bump_ramp=200, bump_factor=1000.0),
        _cfg("ramp-x100", bump_step=300, bump_ramp=200, bump_factor=100.0),
    ),
}


def configs() -> dict[str, TrainConfig]:
    """Every configuration of the suite by name."""
    return {c.name: c for pair in MECHANISMS.values() for c in pair}


def perturbation_start(cfg: TrainConfig) -> int | None:
    """The step at which the perturbation that causes the explosion starts, when it has one (a ramp or a
    jump of the learning rate); None for mechanisms that are unstable from the start."""
    return cfg.bump_step


#: (mechanism, seed) pairs of ``--quick``.
QUICK: tuple[tuple[str, int], ...] = tuple((mech, 0) for mech in MECHANISMS)
