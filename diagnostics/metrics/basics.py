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
from diagnostics.metrics.registry import register
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

#: Default spacing, in steps, of the per-parameter values of the norm diagnostics ("all" is every step).
PER_LAYER_EVERY = 10


def host_norms(tensors: list[torch.Tensor]) -> list[float]:
    """L2 norm of each tensor as a Python float, in order.

    Cost: one fused norm kernel over all tensors and one device-to-host copy (no autograd graph).
    """
    if not tensors:
        return []
    with torch.no_grad():
        try:
            norms = torch._foreach_norm(tensors)
        except (RuntimeError, AttributeError, TypeError):  # mixed dtypes/devices or no fused kernel
            norms = [torch.linalg.vector_norm(v) for v in tensors]
        try:
            # tolist() converts each float32/float16 value to a Python float exactly.
            return torch.stack(norms).cpu().tolist()
        except RuntimeError:  # parameters spread over devices
            return [float(n) for n in norms]


def tensor_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each tensor as a Python float, plus ``"all"`` = sqrt of the sum of squares.

    Cost: one fused norm kernel over all tensors and one device-to-host copy.
    """
    if not tensors:
        return {}
    names = list(tensors)
    out = dict(zip(names, host_norms([tensors[n] for n in names])))
    out["all"] = total_norm(out.values())
    return out


def total_norm(norms: Any) -> float:
    """sqrt of the sum of squares of per-tensor norms.

    Summed in float64 on the host: a float32 sum of squares overflows long before the norms do.
    """
    return math.sqrt(math.fsum(x * x for x in norms))


def _grad_norms(ctx: StepContext) -> dict[str, float]:
    """Per-parameter gradient norms and "all" (sqrt of the float64 sum of their squares), cached for the step."""

    def run() -> dict[str, float]:
        # .grad is read directly (host_norms runs under no_grad): the tensors ctx.grads() would return,
        # without a dict of detached views per step.
        pairs = [(n, p.grad) for n, p in ctx.named_parameters() if p.grad is not None]
        out = dict(zip([n for n, _ in pairs], host_norms([g for _, g in pairs])))
        if out:
            out["all"] = total_norm(out.values())
        return out

    return ctx.cached("grad_norms", run)


class WeightNorms(Mapping[str, float]):
    """Weight norms at a step: ``"all"`` from one reduction over the flat copy of the parameters (the copy
    the update snapshot reuses), per-parameter norms on first access (one fused norm over views of it).

    Falls back to per-tensor norms when the parameters do not share a dtype and device.
    """

    def __init__(self, ctx: StepContext) -> None:
        self._flat = ctx.flat_parameters()
        self._values: dict[str, float] | None = None
        if self._flat is None:
            self._values = tensor_norms(dict(ctx.named_parameters()))
            self.all = self._values.get("all", float("nan"))
        else:
            flat, names, _ = self._flat
            self.all = float(torch.linalg.vector_norm(flat)) if names else float("nan")

    def per_parameter(self) -> dict[str, float]:
        """``{name: norm}`` plus ``"all"``; computed on first call."""
        if self._values is None:
            flat, names, like = self._flat
            views = torch._utils._unflatten_dense_tensors(flat, like)
            self._values = {**dict(zip(names, host_norms(list(views)))), "all": self.all}
        return self._values

    def __getitem__(self, key: str) -> float:
        return self.all if key == "all" else self.per_parameter()[key]

    def __iter__(self) -> Any:
        return iter(self.per_parameter())

    def __len__(self) -> int:
        return len(self.per_parameter())

    def get(self, key: str, default: Any = None) -> Any:
        if key == "all":
            return self.all
        return self.per_parameter().get(key, default)


def _weight_norms(ctx: StepContext) -> WeightNorms:
    return ctx.cached("weight_norms", lambda: WeightNorms(ctx))


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

    def records(self, metric: str, values: Mapping[str, float], step: int) -> list[Record]:
        if not self.per_layer_due(step):
            return [Record(metric, values["all"])] if "all" in values else []
        return [Record(metric, v, key=k) for k, v in values.items()]


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
        return self.records("grad_norm", _grad_norms(ctx), ctx.step)


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
        return self.records("weight_norm", _weight_norms(ctx), ctx.step)


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
        # The norms before the update: weight_norm's when it ran this step (the same flat copy the snapshot
        # is), else from the snapshot.
        before = ctx.cache.get("weight_norms")
        if before is None:
            before = WeightNorms(ctx) if ctx._before_flat is not None else tensor_norms(ctx.params_before_update())
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
        norms = _grad_norms(ctx)
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
