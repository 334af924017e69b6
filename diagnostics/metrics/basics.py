"""Basics every user expects: loss, learning rate, gradient and weight norms, update ratio, non-finite counts.

All read what the training step already computed; none runs a forward or backward pass. Norms are
computed with one fused kernel per call and moved to the host in one transfer. These make up the
``cheap`` preset and run every step.

The norm diagnostics (``grad_norm``, ``weight_norm``, ``update_ratio``) record the whole-model value
("all") at every step they run and the per-parameter values every ``per_layer_every`` steps (default
:data:`PER_LAYER_EVERY`, and at the first step they run): per-parameter rows are most of what the
``cheap`` preset writes, and committing them every step cost more than the rest of the monitoring.
``per_layer_every=1`` records them at every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.norms import host_norms, total_norm
from diagnostics.metrics.registry import register
from diagnostics.store.records import Event, Record, VectorRecord

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

#: Default spacing, in steps, of the per-parameter values of the norm diagnostics ("all" is every step).
PER_LAYER_EVERY = 10


class _NormDiagnostic(Diagnostic):
    """A norm diagnostic: "all" at every step it runs, per-parameter values every ``per_layer_every`` steps.

    Args:
        every: schedule of the diagnostic (default every step).
        start: first step.
        per_layer_every: per-parameter values are recorded at the first step the diagnostic runs and then
            whenever at least this many steps have passed since the last per-parameter record; 1 records
            them at every step it runs.
    """

    def __init__(self, every: int | None = None, start: int = 0, per_layer_every: int = PER_LAYER_EVERY) -> None:
        super().__init__(every=every, start=start)
        if isinstance(per_layer_every, bool) or not isinstance(per_layer_every, int) or per_layer_every < 1:
            raise ConfigError(f"{self.name}: per_layer_every must be a positive int, got {per_layer_every!r}")
        self.per_layer_every = per_layer_every
        self._last_per_layer: int | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "per_layer_every": self.per_layer_every}

    def per_layer_due(self, step: int) -> bool:
        """Whether this step records per-parameter values (call once per step; it advances the schedule)."""
        last = self._last_per_layer
        if last is None or step < last or step - last >= self.per_layer_every:
            self._last_per_layer = step
            return True
        return False

    def records(self, metric: str, values: Mapping[str, float], step: int) -> list[Record | VectorRecord]:
        whole: list[Record | VectorRecord] = [Record(metric, values["all"])] if "all" in values else []
        if not self.per_layer_due(step):
            return whole
        keys = tuple(k for k in values if k != "all")
        # The per-parameter values as one VectorRecord (their vector row), not a Record per parameter.
        return whole + [VectorRecord(metric, keys, tuple(values[k] for k in keys))] if keys else whole


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
class GradNormDiagnostic(_NormDiagnostic):
    """L2 norm of the gradient the user's backward produced: ``grad_norm`` for "all" and per parameter.

    "all" every step, per parameter every ``per_layer_every`` steps (default 10). Cost: one fused norm
    over the gradients (about one read of them).
    """

    name = "grad_norm"
    requires = frozenset({"grads"})
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("grad_norm",)
    allow_nonfinite = True

    def compute(self, ctx: StepContext) -> list[Record]:
        return self.records("grad_norm", ctx.grad_norms(), ctx.step)


@register
class WeightNormDiagnostic(_NormDiagnostic):
    """L2 norm of the parameters: ``weight_norm`` for "all" and per parameter. Cost: one read of them.

    "all" every step, per parameter every ``per_layer_every`` steps (default 10).
    """

    name = "weight_norm"
    preset = "cheap"
    reads_only = True
    metrics: ClassVar[tuple[str, ...]] = ("weight_norm",)
    allow_nonfinite = True

    def compute(self, ctx: StepContext) -> list[Record]:
        return self.records("weight_norm", ctx.weight_norms(), ctx.step)


@register
class UpdateRatioDiagnostic(_NormDiagnostic):
    """Relative size of the optimizer's step: ``update_ratio`` = ||θ_after − θ_before|| / ||θ_before||.

    Not recorded for a parameter whose norm is zero before the step (the ratio is undefined there).

    "all" every step, per parameter every ``per_layer_every`` steps (default 10). Needs the parameters
    before and after ``optimizer.step()``: the Monitor copies them on steps where this is due (memory:
    one copy of the parameters; time: a copy, a subtraction and a norm, each one kernel when the
    parameters share a dtype and device; the norms before the update are weight_norm's when it ran).
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
        per_layer = self.per_layer_due(ctx.step)
        flat = ctx.update_flat()
        if flat is not None and not per_layer:
            # "all" only: one reduction over the flat update instead of one per parameter.
            delta = {"all": float(torch.linalg.vector_norm(flat))}
            names: list[str] = []
        else:
            update = ctx.update()
            names = list(update)
            delta = dict(zip(names, host_norms([update[n] for n in names])))
            delta["all"] = float(torch.linalg.vector_norm(flat)) if flat is not None else total_norm(delta.values())
            names = names if per_layer else []  # not flat (mixed dtypes, FSDP shards): rows as sparse as flat
        # The norms before the update: weight_norm's when it ran this step (the same flat copy the snapshot
        # is), else from the snapshot.
        before = ctx.weight_norms_before_update()
        out = []
        for k in names + ["all"]:
            d, w = delta[k], before.get(k, float("nan"))
            if not w > 0:
                # A parameter that is exactly zero before the step (a bias at initialisation) has no
                # relative update: the ratio is left out rather than recorded as infinite.
                continue
            out.append(Record("update_ratio", d / w, key=k))
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
        norms = ctx.grad_norms()
        counts: dict[str, int] = {}
        if not math.isfinite(norms.get("all", 0.0)):  # a non-finite entry makes the total non-finite
            grads = ctx.grads()
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
