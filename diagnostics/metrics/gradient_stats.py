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

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diagnostics._batch import leading_size, slice_batch
from diagnostics._state import autograd_on, eval_mode
from diagnostics.errors import ConfigError
from diagnostics.gradients.ratio_reduction import GSNRReduction, ratio_dtype
from diagnostics.gradients.stats import GradientMoments
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record, VectorRecord

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext


def summary_records(prefix: str, summary: Any) -> list[Record | VectorRecord]:
    """Records ``{prefix}_mean`` / ``{prefix}_median`` from a GSNRSummary: key "all" as a :class:`Record`,
    the parameters' values as one :class:`VectorRecord` per statistic (stored as one vector row)."""
    out: list[Record | VectorRecord] = []
    for stat in ("mean", "median"):
        values, metric = getattr(summary, stat), f"{prefix}_{stat}"
        if "all" in values:
            out.append(Record(metric, float(values["all"])))
        keys = tuple(str(k) for k in values if k != "all")
        if keys:
            out.append(VectorRecord(metric, keys, tuple(float(values[k]) for k in keys)))
    return out


def _all_finite(summary: Any) -> bool:
    """Whether every mean and median of a GSNRSummary is finite."""
    return all(math.isfinite(v) for stat in (summary.mean, summary.median) for v in stat.values())


#: Captured per-sample gradients of at least this many bytes are reduced to their GSNR ratios parameter by
#: parameter (:meth:`TrainingStepCapture.reduction`) instead of being formed in one ``[n, P]`` buffer first.
MOMENTS_DIRECTLY_BYTES = 16 << 20


def _moments_directly(selected: dict[str, torch.Tensor], n: int) -> bool:
    """Whether ``n`` samples' gradients of ``selected`` are large enough to skip the ``[n, P]`` buffer: on a
    small model its one reduction costs fewer calls than one per parameter."""
    return n * sum(p.numel() * p.element_size() for p in selected.values()) >= MOMENTS_DIRECTLY_BYTES


def _reduced(grads: dict[str, torch.Tensor]) -> GSNRReduction:
    """The :class:`GSNRReduction` of per-sample gradients ``{name: [N, *shape]}`` (on the first one's device,
    ratios in :func:`ratio_dtype`), fed parameter by parameter. Cost: the moments' two passes over the
    gradients, no model-wide moments."""
    first = next(iter(grads.values()))
    out = GSNRReduction([(k, g.shape[1:]) for k, g in grads.items()], first.shape[0], first.device,
                        dtype=ratio_dtype(g.dtype for g in grads.values()))
    for k, g in grads.items():
        out.add(k, g.to(first.device))
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

    From the training step (``from_training_step=True``, the default): when the Monitor expects this
    diagnostic to run at the next step, it holds hooks on the user's training forward that keep the
    inputs and output gradients of the first N samples in those layers
    (:class:`~diagnostics.gradients.training_capture.TrainingStepCapture`), and the per-sample gradients
    are formed from them: no forward or backward of its own. The first time, they are checked against
    its own eval-mode pass on two samples; if they differ (dropout or BatchNorm in train mode, a loss
    other than the Monitor's ``loss_fn``, gradient accumulation, mixed precision) or the model has a
    layer the capture cannot split by sample, it uses its own pass for the rest of the run. The output's
    settings say which (``source``) and why.
    """

    name = "gsnr"
    requires = frozenset({"per_sample_grads"})
    preset = "standard"
    default_every = 50
    metrics: ClassVar[tuple[str, ...]] = ("gsnr_mean", "gsnr_median", "gsnr_raw_mean", "gsnr_raw_median",
                                          "grad_noise_scale", "grad_noise_trace", "grad_noise_sqnorm")

    observes_training_backward = True

    def __init__(self, every: int | None = None, start: int = 0, params: Any = None,
                 noise_ema: float = 0.9, max_samples: int | None = DEFAULT_GSNR_SAMPLES,
                 from_training_step: bool = True) -> None:
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
        self.from_training_step = bool(from_training_step)
        # (the model, weakly referenced; step, capture, selected parameters) of the training step observed
        # for the next call.
        self._captured: tuple[weakref.ref[torch.nn.Module], int, Any, dict[str, torch.Tensor]] | None = None
        #: None until the captured gradients were checked against the own pass; then whether they agreed.
        self.capture_agrees: bool | None = None
        #: why the training step is not used (None while it is, or before it was tried).
        self.capture_note: str | None = None
        #: where the last run's per-sample gradients came from: "training_step" or "own_pass".
        self.last_source: str | None = None
        #: runs whose per-sample gradients came from the training step.
        self.training_step_runs = 0
        self._flat: tuple[torch.Tensor, Any] | None = None  # this call's captured [n, P] gradients and layout
        # (the model, weakly referenced; selected parameters, their layer owners): walked once per model.
        self._owners: tuple[weakref.ref[torch.nn.Module], dict[str, torch.Tensor], Any] | None = None
        self._buffer: Any = None  # the captures' FlatGradientBuffer, kept from call to call

    @contextlib.contextmanager
    def observe_training_forward(self, model: torch.nn.Module, step: int) -> Iterator[None]:
        """Hold hooks that keep what the training step at ``step`` gives for the per-sample gradients (the
        Monitor enters this at the end of the previous step when this diagnostic may run at ``step``)."""
        from diagnostics.gradients.per_sample_layers import layer_owners
        from diagnostics.gradients.training_capture import FlatGradientBuffer, TrainingStepCapture
        from diagnostics.loss import select_params

        self._captured = None
        if not self.from_training_step or self.capture_agrees is False:
            yield
            return
        if self._owners is None or self._owners[0]() is not model:
            selected = select_params(model, self.params)
            self._owners = (weakref.ref(model), selected, layer_owners(model, selected))
        _, selected, owners = self._owners
        if owners is None:
            self.capture_agrees = False
            self.capture_note = ("a selected parameter is outside nn.Linear, nn.Embedding, nn.LayerNorm and "
                                 "Hugging Face Conv1D layers, whose per-sample gradients the training step gives")
            yield
            return
        if self._buffer is None:
            self._buffer = FlatGradientBuffer()
        capture = TrainingStepCapture(model, owners, self.max_samples or 2**62, self.hook_clock, self._buffer)
        with capture:
            yield
        self._captured = (weakref.ref(model), int(step), capture, selected)

    def _from_training_step(self, ctx: StepContext, n: int) -> dict[str, torch.Tensor] | GSNRReduction | None:
        """The per-sample gradients captured from this step's training backward (or, for a large model once
        they were checked, their ratios straight away), or None (then :attr:`capture_note` says why).
        Checks them once against the own pass on two samples."""
        from diagnostics.gradients.per_sample import _CHECK_SAMPLES, gradients_agree

        captured, self._captured = self._captured, None
        if captured is None or captured[0]() is not ctx.model or captured[1] != ctx.step:
            return None
        capture, selected = captured[2], captured[3]
        large = _moments_directly(selected, n)
        got: Any = None
        if self.capture_agrees is None:
            # A large model's check forms only the two compared samples' gradients; all are then reduced.
            got = capture.gradients(selected, samples=_CHECK_SAMPLES if large else None)
            if self._unusable(got, capture):
                return None
            own = ctx.per_sample_grads(self.params, max_samples=_CHECK_SAMPLES)
            self.capture_agrees = gradients_agree({k: v[:_CHECK_SAMPLES] for k, v in got.items()}, own)
            if not self.capture_agrees:
                self.capture_note = ("the training step's per-sample gradients differ from eval-mode ones of loss_fn "
                                     "(dropout or BatchNorm in train mode, another loss, gradient accumulation or "
                                     "mixed precision): own passes from now on")
                return None
        if large:
            got = capture.reduction(selected)
        elif got is None:
            got = capture.gradients(selected)
        if self._unusable(got, capture):
            return None
        self.capture_note = None
        if isinstance(got, GSNRReduction):
            return got
        if capture.flat is not None:  # the moments from one [n, P] tensor
            self._flat = (capture.flat[:n], capture.layout)
        k = next(iter(got.values())).shape[0]
        return got if k == n else {name: v[:n] for name, v in got.items()}

    def _unusable(self, got: Any, capture: Any) -> bool:
        """Whether the capture gave a sentence instead of gradients (kept in :attr:`capture_note`; a problem
        of the model's structure, the same at every step, ends the use of the training step)."""
        if not isinstance(got, str):
            return False
        self.capture_note = got
        if capture.problem is not None:
            self.capture_agrees = False
        return True

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "params": self.params, "mode": "eval", "estimator": "per_sample",
                "variance": "unbiased", "gsnr": "bias-corrected (m^2 - s^2/N) / s^2, unclipped",
                "gsnr_raw": "m^2 / population variance", "noise_ema": self.noise_ema,
                "max_samples": self.max_samples, "from_training_step": self.from_training_step}

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.gradients import NoiseScaleEMA, gradient_moments

        n = leading_size(ctx.batch)
        if n is None or n < 2:
            return Output(status="failed", reason=f"GSNR needs a batch of at least 2 samples, got {n}")
        if self.max_samples is not None:
            n = min(n, self.max_samples)
        self._flat = None
        grads = self._from_training_step(ctx, n)
        source = self.last_source = "own_pass" if grads is None else "training_step"
        self.training_step_runs += grads is not None
        if grads is None:
            grads = ctx.per_sample_grads(self.params, max_samples=n)
        flat, self._flat = self._flat, None
        if isinstance(grads, GSNRReduction):
            moments: GradientMoments | GSNRReduction = grads
        elif flat is not None:
            moments = GradientMoments.from_flat(*flat)
        elif _moments_directly({k: g[0] for k, g in grads.items()}, len(next(iter(grads.values())))):
            moments = _reduced(grads)  # a large model's own pass: no model-wide moments either
        else:
            moments = gradient_moments(grads)
        n = moments.n
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
        settings = {"num_samples": n, "grad_noise_scale_defined": math.isfinite(avg.b_simple), "source": source}
        if self.capture_note is not None:
            settings["training_step_not_used"] = self.capture_note
        return Output(records=records, settings=settings)


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
            summary = gsnr_summary(accumulated.microbatch_gsnr())
            records = summary_records("gsnr_microbatch", summary)
            if not _all_finite(summary):
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
        with eval_mode(ctx.model), autograd_on():
            for i in range(m):
                part = slice_batch(ctx.batch, (i + 1) * size, start=i * size)
                loss = ctx.loss_fn(ctx.model, part)
                gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                grads_list.append({nm: (torch.zeros_like(p) if g is None else g.detach()) for (nm, p), g in zip(named, gs)})
        summary = gsnr_summary(microbatch_gsnr(grads_list))
        records = summary_records("gsnr_microbatch", summary)
        if not _all_finite(summary):
            return Output(status="failed", reason="non-finite micro-batch GSNR")
        return Output(records=records, settings={"source": "split", "microbatch_size": size})
