"""Gradient statistics: GSNR from per-sample gradients, the gradient noise scale, and a micro-batch GSNR.

GSNR (Liu et al. 2020), bias-corrected: per parameter element j, r_j = (m_j² − s_j²/N) / s_j² over the N
per-sample gradients of the step's batch (m the mean, s² the unbiased variance), so that an element with
no signal reads about 0 instead of about 1/N; summarised, unclipped, by mean and median per parameter
tensor and over the whole model. The uncorrected ratio m²/var (population variance) is stored as
``gsnr_raw_*``. B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) is the ratio of running averages of
unbiased estimates of its two parts, both stored. The micro-batch estimator uses micro-batch gradients
instead of per-sample ones; it estimates about (micro-batch size) × the per-sample GSNR and is therefore
stored under its own metric names. The maths lives in :mod:`diagnostics.gradients`; definitions:
docs/metrics.md, "GSNR".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diagnostics._batch import leading_size, slice_batch
from diagnostics._state import eval_mode
from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

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


#: Samples per GSNR estimate by default: per-sample gradients of 8 samples cost about one training step
#: or less on the benchmarks' models (benchmarks/RESULTS.md, "GSNR: per-sample gradients layer by layer").
DEFAULT_GSNR_SAMPLES = 8


@register
class GSNRDiagnostic(Diagnostic):
    """GSNR from per-sample gradients and the gradient noise scale.

    Records: ``gsnr_mean``, ``gsnr_median`` (bias-corrected, per parameter and "all"), ``gsnr_raw_mean``,
    ``gsnr_raw_median`` (the uncorrected ratio, same keys), and, key "all", ``grad_noise_trace`` and
    ``grad_noise_sqnorm`` (running averages of the unbiased estimates of tr(Σ) and |G|², decay
    ``noise_ema`` per probe, debiased) and ``grad_noise_scale`` = their ratio when the averaged |G|² is
    positive. The running averages are the diagnostic's state (saved with the run).

    A "sample" is one unit of the batch's leading dimension: an image, or a whole sequence for a
    language model. Per-sample gradients are taken in eval mode (dropout off, BatchNorm on running
    statistics) from the batch's first ``max_samples`` samples (default 8; None: the whole batch) and
    shared with every other diagnostic that needs them at the step. Fewer samples cost less and give a
    noisier estimate: the corrected ratio's remaining bias is a relative ``2 / (N - 3)`` for Gaussian
    gradients (docs/metrics.md, "GSNR"). Cost: the per-sample gradients of N samples (one batched forward
    and backward for models of ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` and Hugging Face
    ``Conv1D``, else one vmap(grad) pass: :func:`diagnostics.gradients.per_sample_gradients`) and one
    pass over them (``benchmarks/overhead.py`` measures it against one training step).
    """

    name = "gsnr"
    requires = frozenset({"per_sample_grads"})
    preset = "standard"
    default_every = 50
    metrics: ClassVar[tuple[str, ...]] = ("gsnr_mean", "gsnr_median", "gsnr_raw_mean", "gsnr_raw_median",
                                          "grad_noise_scale", "grad_noise_trace", "grad_noise_sqnorm")

    def __init__(self, every: int | None = None, start: int = 0, params: Any = None,
                 noise_ema: float = 0.9, max_samples: int | None = DEFAULT_GSNR_SAMPLES) -> None:
        super().__init__(every, start)
        if not (isinstance(noise_ema, (int, float)) and 0.0 <= noise_ema < 1.0):
            raise ConfigError(f"gsnr: noise_ema (decay per probe) must be in [0, 1), got {noise_ema!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 2):
            raise ConfigError(f"gsnr: max_samples must be an integer >= 2 (samples per estimate) or None "
                              f"(the whole batch), got {max_samples!r}")
        self.params = params
        self.max_samples = max_samples
        self.noise_ema = float(noise_ema)
        #: running averages of the two parts of B_simple (NoiseScaleEMA's state).
        self.state.update(noise={"trace": 0.0, "sqnorm": 0.0, "count": 0})

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "params": self.params, "mode": "eval", "estimator": "per_sample",
                "variance": "unbiased", "gsnr": "bias-corrected (m^2 - s^2/N) / s^2, unclipped",
                "gsnr_raw": "m^2 / population variance", "noise_ema": self.noise_ema,
                "max_samples": self.max_samples}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.gradients import NoiseScaleEMA, gradient_moments

        n = leading_size(ctx.batch)
        if n is None or n < 2:
            return Output(status="failed", reason=f"GSNR needs a batch of at least 2 samples, got {n}")
        if self.max_samples is not None:
            n = min(n, self.max_samples)
        moments = gradient_moments(ctx.per_sample_grads(self.params, max_samples=n))
        corrected, raw = moments.summaries()
        records = summary_records("gsnr", corrected) + summary_records("gsnr_raw", raw)
        parts = moments.noise_parts()
        if not (math.isfinite(parts.trace) and math.isfinite(parts.sqnorm)):
            return Output(status="failed", reason="non-finite per-sample gradients")
        ema = NoiseScaleEMA(self.noise_ema, state=self.state["noise"])
        avg = ema.update(parts)
        self.state["noise"] = dict(ema.state)
        records += [Record("grad_noise_trace", avg.trace), Record("grad_noise_sqnorm", avg.sqnorm)]
        # Infinite when the averaged |G|^2 is not positive (the mean gradient cannot be told from noise yet):
        # no number is stored rather than inf; both parts are.
        if math.isfinite(avg.b_simple):
            records.append(Record("grad_noise_scale", avg.b_simple))
        return Output(records=records, settings={"num_samples": n, "grad_noise_scale_defined": math.isfinite(avg.b_simple)})


@register
class MicrobatchGSNRDiagnostic(Diagnostic):
    """GSNR across micro-batch gradients: ``gsnr_microbatch_mean``, ``gsnr_microbatch_median``.

    The bias-corrected estimator of ``gsnr`` over the M micro-batch gradients (N = M in its formula),
    times (M - 3)/(M - 1), which removes the ratio's bias for Gaussian gradients (a micro-batch mean is
    nearly Gaussian; without it the estimate would be 3 times too high at M = 4); M >= 4, default 8.
    The step's batch is split into ``num_microbatches`` equal parts whose gradients are taken with
    ``torch.autograd.grad`` (eval mode; ``.grad`` untouched). This estimates about (micro-batch size) ×
    the per-sample GSNR, so it is a different metric and never mixed with ``gsnr_*``.
    Cost: ``num_microbatches`` forward and backward passes on 1/num_microbatches of the batch (about one
    training step).

    With gradient accumulation, call ``monitor.microbatch()`` after each micro-batch's backward: a step
    with at least 4 of them uses those micro-batch gradients instead (no extra pass: their moments are
    read off the accumulating ``.grad``, :mod:`diagnostics.gradients.accumulation`; training mode, as the
    user's passes ran), and ``settings`` says ``source: "accumulation"`` and how many there were.
    """

    name = "gsnr_microbatch"
    requires = frozenset({"grads"})
    preset = "full"
    default_every = 50
    metrics: ClassVar[tuple[str, ...]] = ("gsnr_microbatch_mean", "gsnr_microbatch_median")
    uses_accumulation = True

    def __init__(self, every: int | None = None, start: int = 0, num_microbatches: int = 8) -> None:
        super().__init__(every, start)
        if int(num_microbatches) < 4:
            raise ConfigError(f"gsnr_microbatch: num_microbatches must be at least 4 (the Gaussian ratio "
                              f"correction (M - 3) / (M - 1) needs it), got {num_microbatches}")
        self.num_microbatches = int(num_microbatches)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_microbatches": self.num_microbatches, "mode": "eval",
                "estimator": "microbatch",
                "gsnr": "bias-corrected (m^2 - s^2/M) / s^2 over M micro-batches, times (M - 3) / (M - 1), unclipped"}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.gradients import gsnr_summary, microbatch_gsnr

        accumulated = ctx.microbatch_moments
        if accumulated is not None and accumulated.n >= 4:
            records = summary_records("gsnr_microbatch", gsnr_summary(accumulated.microbatch_gsnr()))
            if any(not math.isfinite(r.value) for r in records):
                return Output(status="failed", reason="non-finite micro-batch GSNR")
            return Output(records=records, settings={"source": "accumulation", "microbatches": accumulated.n,
                                                     "mode": "train"})
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
        return Output(records=records, settings={"source": "split", "microbatch_size": size})
