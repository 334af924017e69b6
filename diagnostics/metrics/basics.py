"""Basics every user expects: loss, learning rate, gradient and weight norms, update ratio, non-finite counts.

All read what the training step already computed; none runs a forward or backward pass. Norms are
computed with one fused kernel per call and moved to the host in one transfer. These make up the
``cheap`` preset and run every step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.tracking.context import StepContext


def tensor_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each tensor as a Python float, plus ``"all"`` = sqrt of the sum of squares.

    Cost: one fused norm kernel over all tensors and one device-to-host copy.
    """
    if not tensors:
        return {}
    names = list(tensors)
    values = [tensors[n] for n in names]
    try:
        norms = torch._foreach_norm(values)
    except (RuntimeError, AttributeError, TypeError):  # mixed dtypes/devices or no fused kernel
        norms = [torch.linalg.vector_norm(v) for v in values]
    try:
        host = torch.stack(norms).double().cpu().tolist()
    except RuntimeError:  # mixed dtypes or parameters spread over devices
        host = [float(n) for n in norms]
    out = dict(zip(names, host))
    # Summed in float64 on the host: a float32 sum of squares overflows long before the norms do.
    out["all"] = math.sqrt(math.fsum(x * x for x in host))
    return out


def _grad_norms(ctx: StepContext) -> dict[str, float]:
    return ctx.cached("grad_norms", lambda: tensor_norms(ctx.grads()))


def _weight_norms(ctx: StepContext) -> dict[str, float]:
    return ctx.cached("weight_norms", lambda: tensor_norms(ctx.params()))


def _per_key(metric: str, values: dict[str, float]) -> list[Record]:
    return [Record(metric, float(v), key=k) for k, v in values.items()]


@register
class LossDiagnostic(Diagnostic):
    """The training loss the user passed to ``monitor.step`` (``loss``, key all). Cost: none."""

    name = "loss"
    requires = frozenset({"loss"})
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    allow_nonfinite = True

    def compute(self, ctx: StepContext) -> list[Record]:
        return [] if ctx.loss is None else [Record("loss", float(ctx.loss))]


@register
class LearningRateDiagnostic(Diagnostic):
    """The optimizer's learning rate at the step (``learning_rate``; index = parameter group). Cost: none."""

    name = "learning_rate"
    requires = frozenset({"optimizer"})
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("learning_rate",)

    def compute(self, ctx: StepContext) -> list[Record]:
        if ctx.optimizer is None:
            return []
        out = []
        for i, group in enumerate(ctx.optimizer.param_groups):
            lr = group.get("lr")
            if lr is not None:
                out.append(Record("learning_rate", float(lr.item() if torch.is_tensor(lr) else lr), index=i))
        return out


@register
class GradNormDiagnostic(Diagnostic):
    """L2 norm of the gradient the user's backward produced: ``grad_norm`` for "all" and per parameter.

    Cost: one fused norm over the gradients (about one read of them).
    """

    name = "grad_norm"
    requires = frozenset({"grads"})
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("grad_norm",)
    allow_nonfinite = True

    def compute(self, ctx: StepContext) -> list[Record]:
        return _per_key("grad_norm", _grad_norms(ctx))


@register
class WeightNormDiagnostic(Diagnostic):
    """L2 norm of the parameters: ``weight_norm`` for "all" and per parameter. Cost: one read of them."""

    name = "weight_norm"
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("weight_norm",)
    allow_nonfinite = True

    def compute(self, ctx: StepContext) -> list[Record]:
        return _per_key("weight_norm", _weight_norms(ctx))


@register
class UpdateRatioDiagnostic(Diagnostic):
    """Relative size of the optimizer's step: ``update_ratio`` = ||θ_after − θ_before|| / ||θ_before||.

    Per parameter and "all". Needs the parameters before and after ``optimizer.step()``: the Monitor keeps a
    copy of them on steps where this is due (memory: one copy of the parameters; time: a copy and two
    norms).
    """

    name = "update_ratio"
    requires = frozenset({"update"})
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("update_ratio",)
    allow_nonfinite = True

    def compute(self, ctx: StepContext) -> list[Record]:
        return []

    def compute_after_update(self, ctx: StepContext) -> list[Record]:
        delta = tensor_norms(ctx.update())
        # The weight norms measured before the update, when weight_norm ran this step; else computed.
        before = ctx.cache.get("weight_norms") or tensor_norms(ctx.params_before_update())
        out = []
        for k, d in delta.items():
            w = before.get(k, float("nan"))
            out.append(Record("update_ratio", d / w if w > 0 else (0.0 if d == 0 else float("inf")), key=k))
        return out


@register
class NonFiniteDiagnostic(Diagnostic):
    """Counts of non-finite values: ``nonfinite_grads`` (key all, and per parameter when non-zero) and
    ``nonfinite_loss`` (0/1). A non-zero count also raises a warning Event of kind ``nonfinite``.

    Cost: reuses the gradient norms; elements are counted only in tensors whose norm is not finite.
    """

    name = "nonfinite"
    requires = frozenset({"loss", "grads"})
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("nonfinite_grads", "nonfinite_loss")

    def compute(self, ctx: StepContext) -> Output:
        norms = _grad_norms(ctx)
        grads = ctx.grads()
        counts: dict[str, int] = {}
        for name, value in norms.items():
            if name != "all" and not math.isfinite(value):
                counts[name] = int((~torch.isfinite(grads[name])).sum())
        counts = {k: v for k, v in counts.items() if v}
        records = [Record("nonfinite_grads", float(sum(counts.values())))]
        records += [Record("nonfinite_grads", float(v), key=k) for k, v in counts.items()]
        events = []
        bad_loss = ctx.loss is not None and not math.isfinite(ctx.loss)
        if ctx.loss is not None:
            records.append(Record("nonfinite_loss", float(bad_loss)))
        if counts or bad_loss:
            what = []
            if bad_loss:
                what.append(f"loss = {ctx.loss}")
            if counts:
                what.append(f"{sum(counts.values())} non-finite gradient entries in {', '.join(list(counts)[:5])}")
            events.append(
                Event(
                    kind="nonfinite",
                    message=f"step {ctx.step}: " + "; ".join(what),
                    severity="warning",
                    metric="nonfinite_loss" if bad_loss else "nonfinite_grads",
                    data={"loss": None if ctx.loss is None else repr(ctx.loss), "grads": counts},
                )
            )
        return Output(records=records, events=events)
