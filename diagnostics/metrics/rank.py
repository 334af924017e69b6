"""Rank diagnostics: effective and stable rank of weights, layer-wise gradients and activations; α-ReQ.

Definitions (docs/metrics.md, "Effective rank"): erank(σ) = exp(−Σ p_k log p_k), p_k = σ_k / Σσ over
singular values (RankMe, Roy & Vetterli 2007; the σ-based variant); stable rank ‖W‖_F² / ‖W‖₂²;
α-ReQ = decay exponent of the centred covariance eigenvalues over ranks 11..100, cut at half of
min(tokens − 1, features), and not recorded below 20 fitted ranks (Agrawal et al. 2022).
The maths lives in :mod:`diagnostics.linalg`; these classes choose the matrices and turn the numbers
into records.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

#: α-ReQ's rank window and the fewest ranks it fits (diagnostics.linalg.alpha_req): ranks 11..100, cut at
#: half of min(tokens - 1, features); a layer with fewer than 20 ranks in the window (under 60 features or
#: 61 tokens) gets no value, and the reason is recorded in the step's status.
ALPHA_REQ_WINDOW = (11, 100)
ALPHA_REQ_MIN_RANKS = 20


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    # [out, in, kh, kw] conv kernels become [out, in*kh*kw]: rows are the output units.
    return t.detach().reshape(t.shape[0], -1).float()


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is None or any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _matrices(tensors: dict[str, torch.Tensor], patterns: list[str] | None) -> dict[str, torch.Tensor]:
    chosen = {n: _as_matrix(t) for n, t in tensors.items() if t.ndim >= 2 and _matches(n, patterns)}
    if patterns is not None and not chosen:
        raise ConfigError(f"parameter patterns {patterns} match no matrix-shaped parameter")
    return chosen


def _rank_records(prefix: str, mats: dict[str, torch.Tensor]) -> list[Record]:
    from diagnostics.linalg import effective_rank, singular_values, stable_rank

    out = []
    for name, m in mats.items():
        s = singular_values(m, f"{prefix} rank of {name}")  # one SVD for both ranks
        out.append(Record(f"{prefix}_effective_rank", float(effective_rank(s)), key=name))
        out.append(Record(f"{prefix}_stable_rank", float(stable_rank(s)), key=name))
    return out


def _no_matrix(name: str, what: str) -> Output:
    """The ``nothing_measured`` output of a rank diagnostic that found no matrix-shaped ``what``."""
    return Output(status="nothing_measured", reason=(
        f"no matrix-shaped {what} (2 or more dimensions): {name} measures weight matrices and conv kernels; "
        f"drop {name} from diagnostics"))


def _describe_modules(modules: Any) -> Any:
    """JSON form of a module selection for the run's metadata: names, patterns or class names."""
    if modules is None:
        return "all nn.Linear"
    if isinstance(modules, str):
        return modules
    if isinstance(modules, type):
        return modules.__name__
    if isinstance(modules, (list, tuple)):
        return [m.__name__ if isinstance(m, type) else str(m) for m in modules]
    return repr(modules)  # a predicate


def _patterns(params: str | Iterable[str] | None) -> list[str] | None:
    if params is None:
        return None
    return [params] if isinstance(params, str) else list(params)


class _MatrixRank(Diagnostic):
    """Ranks of one matrix per chosen parameter: the parameter patterns, settings and records they share."""

    preset = "standard"
    default_every = 50

    def __init__(self, every: int | None = None, start: int = 0, params: str | Iterable[str] | None = None) -> None:
        super().__init__(every, start)
        self.params = _patterns(params)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "params": self.params, "variant": "sigma"}


@register
class WeightRankDiagnostic(_MatrixRank):
    """Effective (σ-based) and stable rank of every matrix-shaped parameter (conv kernels as out × rest).

    Metrics ``weight_effective_rank``, ``weight_stable_rank`` (key = parameter name). Cost: one SVD per
    matrix, O(min(m, n)·m·n); no forward or backward pass.
    """

    name = "weight_rank"
    metrics: ClassVar[tuple[str, ...]] = ("weight_effective_rank", "weight_stable_rank")

    def compute(self, ctx: StepContext) -> list[Record] | Output:
        mats = _matrices(ctx.params(), self.params)
        return _rank_records("weight", mats) if mats else _no_matrix("weight_rank", "parameter")


@register
class GradRankDiagnostic(_MatrixRank):
    """Effective and stable rank of each matrix-shaped parameter's gradient (the user's ``.grad``).

    Metrics ``grad_effective_rank``, ``grad_stable_rank`` (key = parameter name). Cost: one SVD per
    gradient matrix; no extra pass. An all-zero gradient has no defined rank and is skipped.
    """

    name = "grad_rank"
    requires = frozenset({"grads"})
    metrics: ClassVar[tuple[str, ...]] = ("grad_effective_rank", "grad_stable_rank")

    def compute(self, ctx: StepContext) -> list[Record] | Output:
        mats = _matrices(ctx.grads(), self.params)
        if not mats:
            return _no_matrix("grad_rank", "parameter with a gradient")
        return _rank_records("grad", {n: m for n, m in mats.items() if bool(m.abs().max() > 0)})


@register
class ActivationRankDiagnostic(Diagnostic):
    """Effective and stable rank and α-ReQ of chosen layers' outputs (tokens × features).

    Metrics ``activation_effective_rank``, ``activation_stable_rank``, ``activation_alpha_req`` (key =
    module name; α-ReQ over ranks 11..100 cut at half of min(tokens − 1, features), only where that
    leaves at least 20 ranks, i.e. at least 60 features and 61 tokens; a layer without a value is named,
    with the reason, in the step's status reason). Outputs are captured by
    scoped forward hooks on one no-grad, eval-mode forward over a subsample of the step's batch, at most
    ``max_tokens`` rows per layer. A ``rank_collapse`` warning event fires when a layer's effective rank
    falls below ``collapse_ratio`` times its baseline: its value at the first probe ``baseline_after``
    steps or more into the run (the rank of a freshly initialised network is not a healthy reference:
    it drops early in every run). The event fires once per collapse and re-arms when the rank recovers.

    Cost: one forward pass on about ``max_tokens`` tokens, plus one SVD and one covariance
    eigendecomposition per layer of at most ``max_tokens`` × features.
    """

    name = "activation_rank"
    requires = frozenset({"activations"})
    preset = "standard"
    default_every = 50
    metrics: ClassVar[tuple[str, ...]] = (
        "activation_effective_rank",
        "activation_stable_rank",
        "activation_alpha_req",
    )

    def __init__(
        self,
        every: int | None = None,
        start: int = 0,
        modules: Any = None,
        max_tokens: int = 1024,
        collapse_ratio: float | None = 0.25,
        baseline_after: int = 100,
    ) -> None:
        super().__init__(every, start)
        if int(max_tokens) < 2:
            raise ConfigError(f"activation_rank: max_tokens must be at least 2, got {max_tokens}")
        self.modules = modules
        self.max_tokens = int(max_tokens)
        self.collapse_ratio = collapse_ratio
        self.baseline_after = int(baseline_after)
        #: Baseline effective rank per layer and the layers in collapse (saved with the run).
        self.state.update(baseline={}, collapsed=[])

    @property
    def baseline(self) -> dict[str, float]:
        """Baseline effective rank per layer (taken ``baseline_after`` steps into the run)."""
        return self.state["baseline"]

    @property
    def collapsed(self) -> list[str]:
        """Layers whose effective rank is below ``collapse_ratio`` times their baseline."""
        return self.state["collapsed"]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "modules": _describe_modules(self.modules),
            "max_tokens": self.max_tokens,
            "mode": "eval",
            "variant": "sigma",
            "collapse_ratio": self.collapse_ratio,
            "baseline_after": self.baseline_after,
            "alpha_req": {"ranks": list(ALPHA_REQ_WINDOW), "edge_fraction": 0.5, "min_ranks": ALPHA_REQ_MIN_RANKS,
                          "eigenvalues": "centred covariance", "weights": "1/i"},
        }

    def compute(self, ctx: StepContext) -> Output:
        from diagnostics.linalg import alpha_req, effective_rank, singular_values, stable_rank

        acts = ctx.activations(self.modules, max_tokens=self.max_tokens)
        if not acts:
            return Output(status="nothing_measured", settings={"num_layers": 0}, reason=(
                f"no output captured from {_describe_modules(self.modules)} in the forward over the step's batch "
                "(the default measures nn.Linear layers). Choose the layers with modules= (names, globs, types "
                "such as nn.Conv2d, or a predicate), or drop activation_rank from diagnostics"))
        records: list[Record] = []
        events: list[Event] = []
        skipped: list[str] = []
        for name, x in acts.items():
            x = x.float()
            if x.shape[0] < 2:
                continue
            sigma = singular_values(x, f"activation rank of {name}")  # one SVD for both ranks
            er = float(effective_rank(sigma))
            records.append(Record("activation_effective_rank", er, key=name))
            records.append(Record("activation_stable_rank", float(stable_rank(sigma)), key=name))
            fit = alpha_req(x, *ALPHA_REQ_WINDOW, min_ranks=ALPHA_REQ_MIN_RANKS)
            if fit.ok and math.isfinite(fit.alpha):
                records.append(Record("activation_alpha_req", fit.alpha, key=name))
            else:
                # Too few ranks to fit (narrow layer, few tokens, dead units): no number rather than one
                # from a handful of points; the ranks above are still recorded.
                skipped.append(f"{name}: {fit.reason}")
            if ctx.step - self.start < self.baseline_after or not math.isfinite(er):
                continue
            base = self.baseline.setdefault(name, er)
            below = self.collapse_ratio is not None and er < self.collapse_ratio * base
            if not below:
                if name in self.collapsed:
                    self.collapsed.remove(name)
                continue
            if name not in self.collapsed:
                self.collapsed.append(name)
                events.append(
                    Event(
                        kind="rank_collapse",
                        message=f"{name}: activation effective rank {er:.2f} fell below "
                        f"{self.collapse_ratio} x its baseline {base:.2f} (step {self.baseline_after} or later)",
                        severity="warning",
                        metric="activation_effective_rank",
                        key=name,
                        data={"effective_rank": er, "baseline": base},
                    )
                )
        reason = f"alpha-ReQ not fitted for {len(skipped)} layer(s): " + "; ".join(skipped) if skipped else None
        return Output(records=records, events=events, reason=reason[:500] if reason else None,
                      settings={"num_layers": len(acts), "alpha_req_skipped": skipped})
