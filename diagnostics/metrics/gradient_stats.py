"""Gradient statistics: GSNR from per-sample gradients, the gradient noise scale, and a micro-batch GSNR.

GSNR (Liu et al. 2020): per parameter element j, r_j = mean_i(g_ij)² / var_i(g_ij) over per-sample
gradients g_i (population variance, guarded denominator), summarised by mean and median per parameter
tensor and over the whole model. B_simple = tr(Σ)/‖g‖² (McCandlish et al. 2018). The micro-batch
estimator uses micro-batch gradients instead of per-sample ones; it estimates about (micro-batch size) ×
the per-sample GSNR and is therefore stored under its own metric names. The maths lives in
:mod:`diagnostics.gradients`; definitions: docs/metrics.md, "GSNR".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record
from diagnostics._batch import leading_size, slice_batch
from diagnostics._state import eval_mode

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext


def _as_float(v: Any) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def summary_records(prefix: str, summary: Any) -> list[Record]:
    """Records ``{prefix}_mean`` / ``{prefix}_median`` per parameter and "all" from a GSNRSummary."""
    out: list[Record] = []
    for stat in ("mean", "median"):
        for key, value in getattr(summary, stat).items():
            out.append(Record(f"{prefix}_{stat}", _as_float(value), key=str(key)))
    return out


@register
class GSNRDiagnostic(Diagnostic):
    """GSNR from per-sample gradients: ``gsnr_mean``, ``gsnr_median`` (per parameter and "all") and
    ``grad_noise_scale`` (B_simple, key "all").

    Per-sample gradients are taken in eval mode (dropout off, BatchNorm on running statistics) and shared
    with every other diagnostic that needs them at the step. Cost: one vmap(grad) pass over the batch
    (measured by ``benchmarks/overhead.py`` against one training step).
    """

    name = "gsnr"
    requires = frozenset({"per_sample_grads"})
    preset = "standard"
    default_every = 50
    metrics: ClassVar[tuple[str, ...]] = ("gsnr_mean", "gsnr_median", "grad_noise_scale")

    def __init__(self, every: int | None = None, start: int = 0, params: Any = None) -> None:
        super().__init__(every, start)
        self.params = params

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "params": self.params, "mode": "eval", "estimator": "per_sample",
                "variance": "population"}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.gradients import gradient_noise_scale, gsnr, gsnr_summary

        n = leading_size(ctx.batch)
        if n is None or n < 2:
            return Output(status="failed", reason=f"GSNR needs a batch of at least 2 samples, got {n}")
        ps = ctx.per_sample_grads(self.params)
        records = summary_records("gsnr", gsnr_summary(gsnr(ps)))
        b_simple = _as_float(gradient_noise_scale(ps))
        # B_simple is infinite when the mean gradient is indistinguishable from noise at this batch size:
        # no number is stored rather than inf (the GSNR records are still valid).
        if math.isfinite(b_simple):
            records.append(Record("grad_noise_scale", b_simple))
        return Output(records=records, settings={"num_samples": n, "grad_noise_scale_defined": math.isfinite(b_simple)})


@register
class MicrobatchGSNRDiagnostic(Diagnostic):
    """GSNR across micro-batch gradients: ``gsnr_microbatch_mean``, ``gsnr_microbatch_median``.

    The step's batch is split into ``num_microbatches`` equal parts whose gradients are taken with
    ``torch.autograd.grad`` (eval mode; ``.grad`` untouched). This estimates about (micro-batch size) ×
    the per-sample GSNR, so it is a different metric and never mixed with ``gsnr_*``.
    Cost: ``num_microbatches`` forward and backward passes on 1/num_microbatches of the batch (about one
    training step).
    """

    name = "gsnr_microbatch"
    requires = frozenset({"grads"})
    preset = "full"
    default_every = 50
    metrics: ClassVar[tuple[str, ...]] = ("gsnr_microbatch_mean", "gsnr_microbatch_median")

    def __init__(self, every: int | None = None, start: int = 0, num_microbatches: int = 4) -> None:
        super().__init__(every, start)
        if int(num_microbatches) < 2:
            raise ConfigError(f"gsnr_microbatch: num_microbatches must be at least 2, got {num_microbatches}")
        self.num_microbatches = int(num_microbatches)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_microbatches": self.num_microbatches, "mode": "eval",
                "estimator": "microbatch"}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.gradients import gsnr_summary, microbatch_gsnr

        n = leading_size(ctx.batch)
        m = self.num_microbatches
        if n is None or n < m:
            return Output(status="failed", reason=f"batch of {n} samples cannot be split into {m} micro-batches")
        size = n // m
        named = ctx.named_parameters()
        grads_list: list[dict[str, torch.Tensor]] = []
        with eval_mode(ctx.model), torch.enable_grad():
            for i in range(m):
                part = slice_batch(ctx.batch, (i + 1) * size, start=i * size)
                loss = ctx.loss_fn(ctx.model, part)
                gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                grads_list.append({nm: (torch.zeros_like(p) if g is None else g.detach()) for (nm, p), g in zip(named, gs)})
        records = summary_records("gsnr_microbatch", gsnr_summary(microbatch_gsnr(grads_list)))
        if any(not math.isfinite(r.value) for r in records):
            return Output(status="failed", reason="non-finite micro-batch GSNR")
        return Output(records=records, settings={"microbatch_size": size})
