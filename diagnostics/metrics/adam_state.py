"""Adam's state at the step: the normalised update, its angle with the gradient, and the v-hat distribution.

Adam (Kingma and Ba 2015) and AdamW (Loshchilov and Hutter 2019) keep per coordinate the moments
m_t = b1 m_{t-1} + (1 - b1) g_t and v_t = b2 v_{t-1} + (1 - b2) g_t^2 and step by
-lr u_t with u_t = m̂_t / (sqrt(v̂_t) + eps), m̂_t = m_t / (1 - b1^t), v̂_t = v_t / (1 - b2^t) (v_t replaced
by the running maximum under ``amsgrad``). The ``adam_state`` diagnostic runs before ``optimizer.step()``
and forms, from the stored m_{t-1}, v_{t-1} and step count t - 1 and this step's gradient, the moments
this step will use, without writing to the optimizer: t is the stored count plus one, and g_t is the
gradient as Adam consumes it (negated under ``maximize``, plus weight_decay * theta for Adam's coupled
L2 decay; AdamW's decoupled decay does not enter u). It records

- ``adam_update_rms``: sqrt(mean u_t^2), per parameter and "all"; 1 for a sign-like update. Spikes well
  above 1 mean v̂ lags a sudden rise in the gradient (Wortsman et al. 2023);
- ``adam_update_grad_cosine``: <u_t, g_t> / (|u_t| |g_t|), per parameter and "all";
- ``adam_sqrt_v_quantile``: quantiles of sqrt(v̂_t) over all coordinates, index 0..6 = min, q 0.05,
  0.25, 0.5, 0.75, 0.95, max (min and max exact; the others on an even stride of at most
  ``max_quantile_coords`` coordinates);
- ``adam_small_grad_fraction``: the fraction of coordinates with g_t^2 < ``small_ratio`` * v̂_t (default
  0.01: the gradient below a tenth of its running RMS), per parameter and "all": the stale second moments
  of Molybog et al. (2023)'s account of Adam instability.

Definitions: docs/metrics.md, "Adam state".

    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    >>> opt = torch.optim.Adam([p], lr=0.1, eps=0.0)
    >>> st = adam_statistics(opt, {id(p): "p"})     # first step: u = g / |g| coordinatewise
    >>> round(st["p"].rms(), 6), round(st["p"].cosine(), 6), st["p"].small_fraction()
    (1.0, 0.912871, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["AdamState", "ParamStats", "QUANTILES", "adam_optimizer", "adam_statistics", "coming_gradient",
           "coming_second_moment", "decoupled_decay"]

#: Quantile levels of ``adam_sqrt_v_quantile`` (index 0..6).
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@dataclass
class ParamStats:
    """Sums over one parameter's coordinates (float64 host values) and its sqrt(v̂) sample."""

    count: int = 0
    sum_u2: float = 0.0
    sum_g2: float = 0.0
    sum_ug: float = 0.0
    small: int = 0
    v_min: float = math.inf
    v_max: float = -math.inf
    sample: list[torch.Tensor] = field(default_factory=list)

    def rms(self) -> float:
        return math.sqrt(self.sum_u2 / self.count) if self.count else math.nan

    def cosine(self) -> float:
        den = math.sqrt(self.sum_u2 * self.sum_g2)
        return self.sum_ug / den if den > 0 else math.nan

    def small_fraction(self) -> float:
        return self.small / self.count if self.count else math.nan

    def merge(self, other: ParamStats) -> None:
        self.count += other.count
        self.sum_u2 += other.sum_u2
        self.sum_g2 += other.sum_g2
        self.sum_ug += other.sum_ug
        self.small += other.small
        self.v_min = min(self.v_min, other.v_min)
        self.v_max = max(self.v_max, other.v_max)
        self.sample += other.sample


def adam_optimizer(opt: Any) -> torch.optim.Adam | None:
    """``opt`` (or the optimizer it wraps, one level down) when it is torch's Adam or AdamW, else None."""
    for cand in (opt, getattr(opt, "optimizer", None)):
        if isinstance(cand, torch.optim.Adam):
            return cand
    return None


def _scalar(x: Any) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


def decoupled_decay(opt: Any, group: Mapping[str, Any]) -> bool:
    """True when ``group``'s weight decay is AdamW's decoupled one (it never enters the gradient)."""
    return isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def coming_gradient(opt: Any, group: Mapping[str, Any], p: torch.Tensor, grad: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The gradient Adam's coming ``step()`` consumes for ``p`` given its ``grad`` (normally ``p.grad``), in
    ``dtype`` on ``grad``'s device: complex as real pairs, negated under ``maximize``, plus
    ``weight_decay * p`` for coupled decay.

    Cost: one or two elementwise passes over ``p``.
    """
    g = grad.detach()
    g = (torch.view_as_real(g) if g.is_complex() else g).to(dtype)
    if group.get("maximize", False):
        g = -g
    wd = _scalar(group.get("weight_decay", 0.0))
    if wd and not decoupled_decay(opt, group):
        theta = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
        g = g + wd * theta.to(device=g.device, dtype=dtype).reshape(g.shape)
    return g


def coming_second_moment(group: Mapping[str, Any], state: Mapping[str, Any], g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(v_t, t)``: the second moment Adam's coming step forms from its state and gradient ``g``
    (:func:`coming_gradient`), ``v_t = beta2 v_{t-1} + (1 - beta2) g^2`` (``v_0 = 0``), the running maximum
    with ``max_exp_avg_sq`` under ``amsgrad``, and ``t`` = the state's step + 1. ``v_hat = v_t / (1 - beta2^t)``.

    Cost: two elementwise passes over ``g``.
    """
    b2 = _scalar(group["betas"][1])
    t = _scalar(state.get("step", 0)) + 1
    v = state.get("exp_avg_sq")
    like = {"device": g.device, "dtype": g.dtype}
    v = (1 - b2) * g * g if v is None else _real(v).to(**like).reshape(g.shape) * b2 + (1 - b2) * g * g
    if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
        v = torch.maximum(_real(state["max_exp_avg_sq"]).to(**like).reshape(g.shape), v)
    return v, t


def adam_statistics(
    opt: torch.optim.Adam, names: Mapping[int, str], small_ratio: float = 0.01, stride: int = 1
) -> dict[str, ParamStats]:
    """Per parameter (by ``names[id(p)]``) the statistics of the update Adam is about to make.

    Reads ``opt.state`` and ``.grad``; writes nothing. Parameters without a gradient are skipped (Adam
    skips them too). ``stride`` thins the sqrt(v̂) sample kept for the quantiles.

    Cost: about ten elementwise passes over each parameter, one parameter at a time and, on the CPU, a
    chunk of :data:`_CPU_CHUNK` elements at a time (temporaries of a few chunks), and one host transfer
    per parameter (per chunk on the CPU).
    """
    out: dict[str, ParamStats] = {}
    with torch.no_grad():
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None or p.grad.is_sparse:
                    continue
                st = opt.state.get(p, {})
                name = names.get(id(p), f"group{gi}.param{pi}")
                ps = _parameter_stats(opt, group, p, st, small_ratio, stride)
                if name in out:
                    out[name].merge(ps)
                else:
                    out[name] = ps
    return out


#: Elements of a parameter whose statistics are formed at once on the CPU: the ten or so temporaries then
#: stay small instead of each being as large as the parameter and mapped afresh (154 MB each for GPT-2
#: small's embedding). On a GPU, whose allocator keeps its blocks, the whole parameter at once.
_CPU_CHUNK = 1 << 20


def _parameter_stats(opt: torch.optim.Adam, group: Mapping[str, Any], p: torch.Tensor, st: Mapping[str, Any],
                     small_ratio: float, stride: int) -> ParamStats:
    """:class:`ParamStats` of one parameter's coming update, a chunk of its elements at a time on the CPU."""
    b1, b2 = (_scalar(b) for b in group["betas"])
    eps = _scalar(group["eps"])
    wdt = torch.float64 if p.dtype == torch.float64 else torch.float32
    # 1-D views, complex as real pairs (a copy only of a tensor that is not contiguous)
    flat = {"p": _real(p.detach()).reshape(-1), "grad": _real(p.grad.detach()).reshape(-1)}
    flat.update({k: _real(st[k].detach()).reshape(-1) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                 if torch.is_tensor(st.get(k))})
    size = flat["grad"].numel()
    chunk = _CPU_CHUNK if flat["grad"].device.type == "cpu" else max(size, 1)
    total = ParamStats()
    for lo in range(0, size, chunk):
        part = {k: t[lo : lo + chunk] for k, t in flat.items()}
        state = {**st, **{k: part[k] for k in ("exp_avg_sq", "max_exp_avg_sq") if k in part}}
        g = coming_gradient(opt, group, part["p"], part["grad"], wdt)
        v, t = coming_second_moment(group, state, g)
        m = part.get("exp_avg")
        m = (1 - b1) * g if m is None else m.to(wdt) * b1 + (1 - b1) * g
        vhat = v / (1 - b2**t)
        root = vhat.sqrt()
        u = (m / (1 - b1**t)) / (root + eps)
        # Dot products in the working dtype (one fused pass each, no float64 copies of the parameter); the
        # chunks' and parameters' results are added up in Python floats.
        low, high = torch.aminmax(root)
        sums = torch.stack([
            torch.dot(u, u), torch.dot(g, g), torch.dot(u, g),
            (g * g < small_ratio * vhat).sum().to(wdt), low, high,
        ]).tolist()
        # The quantiles' sample: every stride-th element of the whole parameter, whatever the chunks.
        sample = root[(-lo) % stride :: stride].float().cpu()
        total.merge(ParamStats(g.numel(), sums[0], sums[1], sums[2], int(sums[3]), sums[4], sums[5], [sample]))
    return total


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _quantiles(total: ParamStats) -> list[float]:
    sample = torch.cat(total.sample) if total.sample else torch.zeros(0)
    if sample.numel() == 0:
        return []
    # numpy selects by partition, O(n); torch.quantile sorts, about 10x slower at 10^5 coordinates. Both
    # interpolate linearly between order statistics, so the values are the same.
    inner = np.quantile(sample.double().numpy(), QUANTILES[1:-1]).tolist()
    return [total.v_min, *inner, total.v_max]


@register
class AdamState(Diagnostic):
    """Statistics of the Adam/AdamW update about to be made (``adam_*``); read from the optimizer's state.

    Args:
        every, start: schedule (default every 10 steps).
        small_ratio: threshold of ``adam_small_grad_fraction``: coordinates with g^2 < small_ratio * v̂.
        max_quantile_coords: coordinates of sqrt(v̂) the quantiles are computed from (an even stride over
            the model when it has more).

    Other optimizers get the status ``failed`` with the reason (this diagnostic reads Adam's moments).
    Cost: about ten elementwise passes over the parameters before ``optimizer.step()``, one parameter
    at a time; no forward, no backward, no random numbers.
    """

    name = "adam_state"
    requires = frozenset({"optimizer", "grads"})
    preset = "standard"
    default_every = 10
    reads_only = True
    # It only reads, but about ten elementwise passes per parameter, one parameter at a time, cost a run a
    # sixth of a training step on a 116k-parameter GPT: a budget schedules it like the probes.
    budgeted = True
    allow_nonfinite = True  # a non-finite gradient makes the statistics non-finite: that is the news
    metrics: ClassVar[tuple[str, ...]] = (
        "adam_update_rms", "adam_update_grad_cosine", "adam_sqrt_v_quantile", "adam_small_grad_fraction",
    )

    def __init__(
        self, every: int | None = None, start: int = 0, *, small_ratio: float = 0.01,
        max_quantile_coords: int = 1 << 16,
    ) -> None:
        super().__init__(every, start)
        if not float(small_ratio) > 0 or int(max_quantile_coords) < 1:
            raise ConfigError(f"adam_state: small_ratio must be > 0 and max_quantile_coords >= 1, got "
                              f"{small_ratio}, {max_quantile_coords}")
        self.small_ratio = float(small_ratio)
        self.max_quantile_coords = int(max_quantile_coords)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "small_ratio": self.small_ratio,
                "max_quantile_coords": self.max_quantile_coords, "quantiles": list(QUANTILES)}

    def compute(self, ctx: StepContext) -> Output:
        opt = adam_optimizer(ctx.optimizer)
        if opt is None:
            # Nothing to measure (a misuse report naming the fix), not a failed estimate.
            if ctx.optimizer is None:
                why = "no optimizer was given to the Monitor: pass optimizer= to the Monitor"
            else:
                why = (f"the optimizer is {type(ctx.optimizer).__name__}: train with Adam or AdamW, or drop "
                       "adam_state from diagnostics")
            return Output(status="nothing_measured",
                          reason=f"adam_state reads the state of torch.optim.Adam or AdamW; {why}")
        names = {id(p): n for n, p in ctx.named_parameters()}
        coords = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.grad is not None)
        stride = max(1, math.ceil(coords / self.max_quantile_coords))
        stats = adam_statistics(opt, names, self.small_ratio, stride)
        if not stats:
            return Output(status="failed", reason="no parameter of the optimizer has a gradient")
        total = ParamStats()
        records: list[Record] = []
        for name, ps in stats.items():
            total.merge(ps)
            records += [Record("adam_update_rms", ps.rms(), name),
                        Record("adam_small_grad_fraction", ps.small_fraction(), name)]
            if ps.sum_g2 > 0:
                records.append(Record("adam_update_grad_cosine", ps.cosine(), name))
        records += [Record("adam_update_rms", total.rms()),
                    Record("adam_small_grad_fraction", total.small_fraction())]
        if total.sum_g2 > 0:
            records.append(Record("adam_update_grad_cosine", total.cosine()))
        records += [Record("adam_sqrt_v_quantile", q, index=i) for i, q in enumerate(_quantiles(total))]
        return Output(records=records, settings={"coordinates": coords, "quantile_stride": stride})
