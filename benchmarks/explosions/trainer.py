"""Train the zoo's tiny GPT on stdlib text with knobs that cause loss explosions, recording every step.

Per step the run store gets (metric IDs as in diagnostics/store/catalog.py where they exist there):
- ``loss``, ``nonfinite_loss``, ``learning_rate``, ``grad_norm`` (key ``all``);
- ``max_attention_logit`` per attention module (key ``blocks.{i}.attn``): max pre-softmax logit over the
  causally allowed entries of the training batch;
- ``activation_kurtosis`` per block output (key ``blocks.{i}``): E[(h - mean)^4] / var^2 over all entries
  of the residual stream after the block;
- spectral alignment per nn.Linear (key = module name): ``sa_positive_fraction``, ``sa_sign_diversity``,
  ``sa_mean``, ``sa_mean_abs``, ``sa_quantile`` (index 0..4), ``sa_histogram`` (index 0..19),
  ``sa_sigma1``, from the layer's inputs in the training forward pass (subsampled to ``sa_tokens``
  tokens) and the top right singular vector of its weight at that step.

v1 comes by default from ``torch.linalg.svd`` of each weight (exact; the 13 SVDs are the largest part of
the recording cost), or with ``v1_method="power"`` from the library's warm-started power iteration. Its
sign is carried from step to step (flipped when its dot product with the previous v1 is negative), so
the signed statistics form a continuous series.

Run meta: ``config`` (the TrainConfig), ``model_summary``, ``explosion_step`` (see explosion.py, null for
runs that did not explode), ``final_step``, ``seconds``, ``seconds_per_step``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.explosions.explosion import explosion_step
from diagnostics.errors import ConfigError
from diagnostics.metrics.alignment_stats import alignment_cosines, alignment_statistics
from diagnostics.store.records import Record
from diagnostics.zoo import count_parameters, get_model
from diagnostics.zoo.data import char_batches, pydoc_tokens

__all__ = ["TrainConfig", "train", "learning_rate_at", "setup", "StopRule", "update"]


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        name: configuration name (without the seed).
        model: GPTConfig options for ``get_model("tiny-gpt", ...)``.
        steps: optimizer steps.
        batch_size, block_size: batch shape [B, T].
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up from lr/warmup_steps to lr (0: none).
        schedule: "constant" after warm-up, or "cosine" decay to 10% of lr at the last step.
        bump_step, bump_factor, bump_ramp: from ``bump_step`` on, the learning rate is multiplied by
            ``bump_factor``; with ``bump_ramp`` > 0 the multiplier grows geometrically from 1 to
            ``bump_factor`` over that many steps (an instability that builds up rather than a jump).
        beta1, beta2, eps, weight_decay: AdamW settings.
        grad_clip: max gradient norm (None: no clipping).
        z_loss: weight of the z-loss, z_loss * mean(log Z^2) over positions, added to the cross-entropy
            (PaLM's auxiliary loss that keeps the output log-partition near 0; 0: none).
        seed: model init and batch-sampling seed.
        sa_tokens: tokens per layer used for the alignment statistics (evenly strided subsample).
        v1_method: "svd" (full ``torch.linalg.svd`` per weight and step: the exact reference the suite
            was recorded with) or "power" (``diagnostics.linalg.power.top_singular_vector`` warm-started
            from the previous step's v1, the in-loop method; several times cheaper).
        stop_after_explosion: extra steps to keep training once the explosion is certain (then stop).
    """

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 16
    block_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "constant"
    bump_step: int | None = None
    bump_factor: float = 1.0
    bump_ramp: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    z_loss: float = 0.0
    seed: int = 0
    sa_tokens: int = 256
    v1_method: str = "svd"
    stop_after_explosion: int = 20

    def with_seed(self, seed: int) -> TrainConfig:
        return replace(self, seed=seed)

    @property
    def run_name(self) -> str:
        return f"{self.name}__s{self.seed}"


def learning_rate_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate used for the update of ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    elif cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    else:
        lr = cfg.lr
    if cfg.bump_step is not None and step >= cfg.bump_step:
        if cfg.bump_ramp > 0:
            frac = min(1.0, (step - cfg.bump_step + 1) / cfg.bump_ramp)
            lr *= cfg.bump_factor**frac
        else:
            lr *= cfg.bump_factor
    return lr


def setup(cfg: TrainConfig) -> tuple[nn.Module, Iterator[tuple[torch.Tensor, torch.Tensor]], torch.optim.Optimizer]:
    """The run's tiny GPT (train mode), its batches and its AdamW optimizer, all seeded from ``cfg.seed``."""
    model = get_model("tiny-gpt", seed=cfg.seed, block_size=cfg.block_size, **cfg.model)
    model.train()
    batches = char_batches(pydoc_tokens("train"), cfg.batch_size, cfg.block_size, cfg.steps, seed=1000 + cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    return model, iter(batches), opt


def set_learning_rate(cfg: TrainConfig, opt: torch.optim.Optimizer, step: int) -> float:
    """Put the schedule's learning rate for ``step`` into every parameter group; returns it."""
    lr = learning_rate_at(cfg, step)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StopRule:
    """The losses so far and when to stop: at a non-finite loss, or ``stop_after_explosion`` steps after
    the explosion (explosion.py) was first detected."""

    stop_after: int
    losses: list[float] = field(default_factory=list)
    exploded_at: int | None = None

    def stop(self, step: int, loss: float) -> bool:
        """Record ``loss`` of ``step``; True when training should stop before this step's update."""
        self.losses.append(loss)
        if not math.isfinite(loss):
            return True
        if self.exploded_at is None:
            self.exploded_at = explosion_step(self.losses)
        return self.exploded_at is not None and step >= self.exploded_at + self.stop_after


def update(cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The optimizer step, after clipping the gradient norm to ``cfg.grad_clip`` when set."""
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


def _kurtosis(h: torch.Tensor) -> float:
    h = h.detach().double().reshape(-1)
    c = h - h.mean()
    var = c.pow(2).mean()
    return float(c.pow(4).mean() / var.pow(2)) if var > 0 else float("nan")


class _Probes:
    """Scoped hooks on the training forward pass: layer inputs, attention logits, block outputs."""

    def __init__(self, model: nn.Module, sa_tokens: int) -> None:
        self.model = model
        self.sa_tokens = sa_tokens
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.inputs: dict[str, torch.Tensor] = {}
        self.max_logit: dict[str, float] = {}
        self.kurtosis: dict[str, float] = {}
        self.handles: list = []

    def _linear_pre(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            stride = max(1, x.shape[0] // self.sa_tokens)
            self.inputs[name] = x[::stride][: self.sa_tokens].clone()

        return hook

    def _logits(self, name: str, mask: torch.Tensor):
        def hook(module, args, out):
            t = out.shape[-1]
            allowed = out.detach().masked_fill(~mask[:t, :t], float("-inf"))
            self.max_logit[name] = float(allowed.amax())

        return hook

    def _block(self, name: str):
        def hook(module, args, out):
            self.kurtosis[name] = _kurtosis(out)

        return hook

    def __enter__(self) -> _Probes:
        for name, m in self.linears.items():
            self.handles.append(m.register_forward_pre_hook(self._linear_pre(name)))
        for i, block in enumerate(self.model.blocks):
            attn = block.attn
            self.handles.append(attn.logits.register_forward_hook(self._logits(f"blocks.{i}.attn", attn.causal_mask)))
            self.handles.append(block.register_forward_hook(self._block(f"blocks.{i}")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _top_right_singular(w: torch.Tensor, prev: torch.Tensor | None, method: str) -> tuple[float, torch.Tensor]:
    if method == "power":
        from diagnostics.linalg.power import top_singular_vector

        sigma, _, v1, _ = top_singular_vector(w.double(), v0=prev, iters=200, tol=1e-8)
        return float(sigma), v1
    _, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return float(s[0]), vh[0]


def _alignment_records(probes: _Probes, prev_v1: dict[str, torch.Tensor], method: str = "svd") -> list[Record]:
    out: list[Record] = []
    for name, module in probes.linears.items():
        x = probes.inputs.get(name)
        if x is None:
            continue
        w = module.weight.detach()
        if not torch.isfinite(w).all() or not torch.isfinite(x).all():
            continue
        prev = prev_v1.get(name)
        sigma1, v1 = _top_right_singular(w, prev, method)
        if prev is not None and torch.dot(prev, v1) < 0:
            v1 = -v1  # carry the sign so that p+ and the mean are continuous series
        prev_v1[name] = v1
        st = alignment_statistics(alignment_cosines(x.double(), v1))
        out += [
            Record("sa_positive_fraction", st["positive_fraction"], name),
            Record("sa_sign_diversity", st["sign_diversity"], name),
            Record("sa_mean", st["mean"], name),
            Record("sa_mean_abs", st["mean_abs"], name),
            Record("sa_sigma1", sigma1, name),
        ]
        out += [Record("sa_quantile", q, name, i) for i, q in enumerate(st["quantiles"])]
        out += [Record("sa_histogram", h, name, i) for i, h in enumerate(st["histogram"])]
    return out


def train(cfg: TrainConfig, run_dir: str | Path | None = None, *, record: bool = True) -> dict[str, Any]:
    """Train one run; write every step to a RunWriter store at ``run_dir`` (when given and ``record``).

    Single-threaded is the caller's choice (``torch.set_num_threads(1)``; run_suite does it).

    Returns:
        dict with ``losses`` (list per step), ``explosion_step`` (int or None), ``final_step``,
        ``seconds``, ``num_params``.
    """
    if cfg.v1_method not in ("svd", "power"):
        raise ConfigError(f"v1_method must be 'svd' or 'power', got {cfg.v1_method!r}")
    model, batches, opt = setup(cfg)
    loss_fn = nn.CrossEntropyLoss()
    writer = None
    if run_dir is not None and record:
        from diagnostics.store import RunWriter

        writer = RunWriter(
            run_dir,
            name=cfg.run_name,
            overwrite=True,
            meta={
                "config": asdict(cfg),
                "model_summary": {
                    "num_params": count_parameters(model),
                    "parameters": {n: list(p.shape) for n, p in model.named_parameters()},
                },
                "loss_reduction": "mean",
            },
        )
    rule = StopRule(cfg.stop_after_explosion)
    losses = rule.losses
    prev_v1: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    step = -1
    try:
        for step, (x, y) in enumerate(batches):
            lr = set_learning_rate(cfg, opt, step)
            probes = _Probes(model, cfg.sa_tokens) if writer else None
            if probes:
                with probes:
                    logits = model(x)
            else:
                logits = model(x)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            gnorm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            value = float(loss.detach())
            if writer:
                recs = [
                    Record("loss", value),
                    Record("nonfinite_loss", 0.0 if math.isfinite(value) else 1.0),
                    Record("learning_rate", lr),
                    Record("grad_norm", gnorm),
                ]
                recs += [Record("max_attention_logit", v, k) for k, v in probes.max_logit.items()]
                recs += [Record("activation_kurtosis", v, k) for k, v in probes.kurtosis.items()]
                recs += _alignment_records(probes, prev_v1, cfg.v1_method)
                writer.write_step(step, recs)
            if rule.stop(step, value):
                break
            update(cfg, model, opt)
        seconds = time.perf_counter() - t0
        result = {
            "losses": losses,
            "explosion_step": explosion_step(losses),
            "final_step": step,
            "seconds": seconds,
            "num_params": count_parameters(model),
        }
        if writer:
            writer.set_meta("explosion_step", result["explosion_step"])
            writer.set_meta("final_step", step)
            writer.set_meta("seconds", seconds)
            writer.set_meta("seconds_per_step", seconds / max(1, step + 1))
            writer.set_meta("complete", True)
        return result
    finally:
        if writer:
            writer.close()
