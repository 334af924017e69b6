"""Train one run of the explosion benchmark, recording every candidate signal every step with the Monitor.

The signals are the library's own diagnostics, all due at every step (``budget=None``), measured on the
training forward the Monitor observes:

- ``loss``, ``learning_rate``, ``grad_norm``;
- ``attention_stats`` (largest attention logit, attention entropy; first 128 tokens of the batch);
- ``output_logits`` (largest output logit, log Z; first 128 tokens);
- ``adam_state`` (update RMS, update/gradient cosine, fraction of coordinates with g^2 << v-hat, sqrt(v-hat)
  quantiles) on the update the optimizer is about to make;
- ``spectral_alignment`` (sign diversity, mean, |mean|, sigma_1 per linear map; 256 tokens).

With ``run_dir=None`` the run trains without recording (the sweep that chooses the configurations).
The explosion rule, the stop rule (20 steps after the explosion) and the schedule come from trainer.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.explosions.explosion import explosion_step
from benchmarks.explosions.trainer import StopRule, TrainConfig, set_learning_rate, setup, update

__all__ = ["lm_loss", "train", "DIAGNOSTICS"]


def lm_loss(model: nn.Module, batch: Any, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy, plus ``z_loss`` * mean(log Z^2) when ``z_loss`` > 0."""
    x, y = batch
    logits = model(x)
    flat = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, y.reshape(-1))
    if z_loss > 0:
        loss = loss + z_loss * torch.logsumexp(flat, -1).pow(2).mean()
    return loss


#: The Monitor's diagnostics and their options (every one due at every step).
DIAGNOSTICS: dict[str, dict[str, Any]] = {
    "loss": {},
    "learning_rate": {},
    "grad_norm": {},
    "attention_stats": {"max_tokens": 128},
    "output_logits": {"max_tokens": 128},
    "adam_state": {},
    "spectral_alignment": {"max_tokens": 256},
}


def train(cfg: TrainConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg`` (one thread is the caller's choice); record into ``run_dir`` when given.

    Returns:
        ``{"explosion_step", "final_step", "seconds", "losses"}``; the same (but the losses) is stored as
        run metadata with ``complete`` = True once the run finished.
    """
    from diagnostics.tracking import Monitor

    model, batches, opt = setup(cfg)

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        return lm_loss(m, batch, cfg.z_loss)

    rule = StopRule(cfg.stop_after_explosion)
    mon = None
    if run_dir is not None:
        mon = Monitor(
            model,
            loss_fn,
            run=run_dir,
            diagnostics={k: {**v, "every": 1} for k, v in DIAGNOSTICS.items()},
            optimizer=opt,
            budget=None,
            meta=asdict(cfg),
            name=cfg.run_name,
        )
    t0 = time.perf_counter()
    step = -1
    try:
        for step, batch in enumerate(batches):
            set_learning_rate(cfg, opt, step)
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if mon is not None:
                mon.step(step, batch, loss)
            if rule.stop(step, value):
                break
            update(cfg, model, opt)
        result = {
            "explosion_step": explosion_step(rule.losses),
            "final_step": step,
            "seconds": time.perf_counter() - t0,
            "nonfinite": not math.isfinite(rule.losses[-1]) if rule.losses else False,
        }
        if mon is not None:
            for k, v in result.items():
                mon.set_meta(k, v)
            mon.set_meta("complete", True)
        return {**result, "losses": rule.losses}
    finally:
        if mon is not None:
            mon.close()
