"""The suite's configurations: tiny GPT runs that explode and matched runs that do not.

All runs: zoo ``tiny-gpt`` (2 layers, d_model 64, 4 heads, T 64, about 116k parameters), batch 16 x 64
characters of ``pydoc_data.topics``, AdamW (beta1 0.9, beta2 0.95, eps 1e-8, no weight decay), no
gradient clipping, 300 steps at learning rate 1e-3 unless a knob changes it. The mid-run learning-rate
change is the common trigger: at 300 steps this model is otherwise very robust (constant lr up to 0.3,
no qk-LayerNorm, beta2 0.9999 / eps 1e-12 or unscaled embeddings with 10x residual init alone never met
the explosion definition in our sweeps; see FINDINGS.md). Each exploding config has a stable partner that
differs in one safe knob (a lower peak learning rate, a re-warm-up, or the default Adam beta2/eps).

``EXPLODING`` and ``STABLE`` map names to :class:`TrainConfig`; ``SEEDS`` are the seeds of the suite.
The label of a run is what it did (``explosion_step`` in its store), not which dict it came from: a run
of an "exploding" config that did not explode is reported as such.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.explosions.trainer import TrainConfig

__all__ = ["EXPLODING", "STABLE", "ALL", "SEEDS", "PAIRS", "expected_label"]

SEEDS: tuple[int, ...] = (0, 1, 2)

_BASE = TrainConfig(name="base", steps=300, lr=1e-3)
# Learning-rate ramp: from step 100 the lr grows geometrically by bump_factor over 100 steps.
_RAMP = replace(_BASE, bump_step=100, bump_ramp=100)
_QK = {"qk_layernorm": True}

EXPLODING: dict[str, TrainConfig] = {
    # lr ramps 1e-3 -> 1.0: without qk-LayerNorm ...
    "ramp1000": replace(_RAMP, name="ramp1000", bump_factor=1000.0),
    # ... and with it (qk-LayerNorm bounds attention logits but not the rest of the network).
    "ramp1000-qkln": replace(_RAMP, name="ramp1000-qkln", bump_factor=1000.0, model=_QK),
    # lr ramps 1e-3 -> 0.5.
    "ramp500": replace(_RAMP, name="ramp500", bump_factor=500.0),
    # Adam with large beta2 and tiny eps: the ramp to 0.3 that is stable with beta2 0.95 / eps 1e-8 explodes.
    "ramp300-adam-b2": replace(_RAMP, name="ramp300-adam-b2", bump_factor=300.0, beta2=0.9999, eps=1e-12),
    # A sudden 300x jump of the lr at step 150 (no re-warm-up).
    "jump300": replace(_BASE, name="jump300", bump_step=150, bump_factor=300.0),
}

STABLE: dict[str, TrainConfig] = {
    # Same ramp, lower peak lr (1e-3 -> 0.1).
    "ramp100": replace(_RAMP, name="ramp100", bump_factor=100.0),
    "ramp100-qkln": replace(_RAMP, name="ramp100-qkln", bump_factor=100.0, model=_QK),
    # Same ramp to 0.3 with default Adam settings: partner of ramp300-adam-b2 (and a lower-lr ramp500).
    "ramp300": replace(_RAMP, name="ramp300", bump_factor=300.0),
    # The 300x change of jump300, reached by a 100-step re-warm-up from step 150.
    "rewarm300": replace(_BASE, name="rewarm300", bump_step=150, bump_factor=300.0, bump_ramp=100),
    # Unscaled (std 1) embeddings and 10x residual init with the ramp to 0.3: a near miss (loss bumps
    # without exploding), which makes it a hard negative for detectors.
    "ramp300-bigemb": replace(
        _RAMP, name="ramp300-bigemb", bump_factor=300.0, model={"embedding_std": 1.0, "residual_init_scale": 10.0}
    ),
}

ALL: dict[str, TrainConfig] = {**EXPLODING, **STABLE}

#: Exploding config -> its matched stable config.
PAIRS: dict[str, str] = {
    "ramp1000": "ramp100",
    "ramp1000-qkln": "ramp100-qkln",
    "ramp500": "ramp300",
    "ramp300-adam-b2": "ramp300",
    "jump300": "rewarm300",
}


def expected_label(name: str) -> str:
    """``"exploding"`` or ``"stable"``: what the config was designed to do."""
    return "exploding" if name in EXPLODING else "stable"
