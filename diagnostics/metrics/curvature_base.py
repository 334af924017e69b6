"""What the curvature diagnostics share: parameter blocks, budgets, failures and the top eigenspace.

The curvature diagnostics (``hessian_*`` and ``ggn_*`` in :mod:`diagnostics.metrics.curvature`,
``sharpness``, ``grad_subspace``) all measure a Hessian or Gauss-Newton operator of the mean loss on the
run's fixed probe data (``ctx.curvature``), optionally per parameter block.

Blocks (``params=``): ``None`` is the whole model (key ``"all"``); a mapping ``{block name: names or
globs}`` or a list of names/globs (each entry its own block, keyed by itself) gives one estimate per
block. Each block is the curvature of the mean loss with respect to those parameters, the others held
constant.

Failures. A product that is not finite stops the estimate (:class:`~diagnostics.linalg.finite.FiniteChecked`):
the output is ``failed`` with the reason and no numbers. Definitions: docs/metrics.md, "Hessian spectra".
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diagnostics.errors import ConfigError, LossError
from diagnostics.linalg.finite import NonFiniteProductError
from diagnostics.metrics.base import Diagnostic, Output

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = [
    "KINDS",
    "BlockRuns",
    "CallTime",
    "Eigenspace",
    "ProbeInCalls",
    "advance_blocks",
    "check_budget",
    "check_kind",
    "check_max_memory",
    "failed",
    "pause",
    "parse_blocks",
    "run_guarded",
    "worst_status",
]

KINDS = ("hessian", "ggn")

# Block spec as passed to ctx.curvature: None (all trainable parameters) or a tuple of names/globs.
BlockParams = tuple[str, ...] | None


def parse_blocks(params: Any, owner: str) -> dict[str, BlockParams]:
    """Normalise a ``params=`` option into ``{block key: parameter selection}``.

    ``None`` -> ``{"all": None}``; a string -> one block keyed by the string; a list of strings -> one
    block per entry keyed by the entry; a mapping ``{name: str | list[str]}`` -> named blocks.

    Raises:
        ConfigError: empty selection, a block name that is not a string, or a value of the wrong type.
    """
    if params is None:
        return {"all": None}
    if isinstance(params, str):
        return {params: (params,)}
    if isinstance(params, Mapping):
        out: dict[str, BlockParams] = {}
        for name, sel in params.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{owner}: block names in params= must be non-empty strings, got {name!r}")
            if isinstance(sel, str):
                out[name] = (sel,)
            elif isinstance(sel, Sequence) and sel and all(isinstance(s, str) for s in sel):
                out[name] = tuple(sel)
            else:
                raise ConfigError(
                    f"{owner}: params[{name!r}] must be a parameter name/glob or a non-empty list of them, got {sel!r}"
                )
        if not out:
            raise ConfigError(f"{owner}: params= is an empty mapping; give at least one block or None for the whole model")
        return out
    if isinstance(params, Sequence) and all(isinstance(s, str) for s in params):
        if not params:
            raise ConfigError(f"{owner}: params= is an empty list; give names/globs or None for the whole model")
        return {s: (s,) for s in params}
    raise ConfigError(
        f"{owner}: params= must be None, a name/glob, a list of names/globs or a dict {{block: names}}, got {params!r}"
    )


def check_kind(kind: str, owner: str) -> str:
    """``kind`` itself when it is "hessian" or "ggn"; ConfigError otherwise."""
    if kind not in KINDS:
        raise ConfigError(f"{owner}: kind must be 'hessian' or 'ggn', got {kind!r}")
    return kind


def check_budget(max_matvecs: int | None, max_seconds: float | None, owner: str) -> None:
    """ConfigError unless ``max_matvecs`` is a positive int or None and ``max_seconds`` positive or None."""
    if max_matvecs is not None and (not isinstance(max_matvecs, int) or isinstance(max_matvecs, bool) or max_matvecs < 1):
        raise ConfigError(f"{owner}: max_matvecs must be a positive int or None, got {max_matvecs!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ConfigError(f"{owner}: max_seconds must be a positive number or None, got {max_seconds!r}")


def check_max_memory(max_memory: int | None, owner: str) -> None:
    """Raise ConfigError unless ``max_memory`` is None or a positive number of bytes."""
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0):
        raise ConfigError(f"{owner}: max_memory must be a positive number of bytes or None, got {max_memory!r}")


def failed(reason: str, num_matvecs: int | None = None, settings: dict[str, Any] | None = None) -> Output:
    """A failed Output: a reason, the cost spent, no numbers."""
    return Output(records=[], status="failed", reason=reason, num_matvecs=num_matvecs, settings=dict(settings or {}))


def run_guarded(fn: Any) -> tuple[Any, str | None]:
    """Call ``fn()``; a non-finite product or a non-finite probe loss becomes ``(None, reason)``."""
    try:
        return fn(), None
    except NonFiniteProductError as exc:
        return None, str(exc)
    except LossError as exc:  # the curvature operator checks the probe loss when it linearises a batch
        return None, f"probe loss is not usable: {exc}"


def worst_status(statuses: list[str]) -> str:
    """The first of "failed", "not_converged" and "continues" (a run that goes on) found, else "ok"."""
    return next((s for s in ("failed", "not_converged", "continues") if s in statuses), "ok")


class CallTime:
    """The time one call of a probe cut into calls may still take (``seconds``; None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._start = time.perf_counter()
        #: Set by the caller once a run advanced in this call (each call advances at least one).
        self.advanced = False

    def left(self) -> float | None:
        """Seconds left of the call, None without a limit."""
        return None if self.seconds is None else self.seconds - (time.perf_counter() - self._start)

    def spent(self) -> bool:
        """True when a run advanced in this call and its time is up: the next run waits for the next call."""
        left = self.left()
        return self.advanced and left is not None and left <= 0


class ProbeInCalls:
    """A diagnostic whose probe may span calls: ``self.unfinished`` (anything with ``close()``) holds the
    probe between the calls; put before the :class:`~diagnostics.metrics.base.Diagnostic` base."""

    unfinished: Any = None

    @property
    def unfinished_run(self) -> bool:
        return self.unfinished is not None

    def drop_unfinished(self) -> None:
        if self.unfinished is not None:
            self.unfinished.close()
            self.unfinished = None


class BlockRuns:
    """A probe over the blocks of a diagnostic that may span calls: per block its raw operator, the
    finite-checked one and its stepped run (:class:`~diagnostics.linalg.stepped.SteppedRun`), the results
    of the blocks done, the products so far and the step the probe began."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.blocks: dict[str, list[Any]] = {}  # key -> [raw operator, checked operator, run | None]
        self.results: dict[str, Any] = {}
        self.products = 0

    def close(self) -> None:
        for _, _, run in self.blocks.values():
            if run is not None:
                run.close()


def advance_blocks(owner: Any, probe: BlockRuns, cut: float | None, make_run: Any,
                   finite: Any, nonfinite: str = "non-finite result") -> tuple[Output | None, int]:
    """Advance the probe's runs block by block within ``cut`` seconds (None: to the end).

    ``make_run(checked operator)`` starts a block's run; ``finite(result)`` says whether its numbers are
    finite (else the output is ``failed`` with ``nonfinite`` as the reason). Returns ``(None, products)``
    when every block has its result, else the output of this call (``continues``: ``owner.unfinished``
    then holds the probe, its raw operators frozen at the parameters of the step it began; ``failed``:
    the probe is closed) and the products it spent. Cost: the products.
    """
    clock = CallTime(cut)
    spent = 0
    for key, block in probe.blocks.items():
        if key in probe.results:
            continue
        _, op, run = block
        if clock.spent():
            return pause(owner, probe, key, spent, cut), spent
        left = clock.left()
        before = op.num_matvecs
        if run is None:
            run = block[2] = make_run(op)
        result, why = run_guarded(lambda run=run, left=left: run.advance(None, left))
        used = op.num_matvecs - before
        spent += used
        probe.products += used
        clock.advanced = True
        if why is None and result is None:
            return pause(owner, probe, key, spent, cut), spent
        if result is None or not finite(result):
            probe.close()
            return failed(f"{key}: {why or nonfinite}", spent), spent
        probe.results[key] = result
    return None, spent


def pause(owner: Any, probe: BlockRuns, key: str, spent: int, cut: float | None) -> Output:
    """Keep ``probe`` in ``owner.unfinished`` for the next call: status ``continues``, no numbers. Cost:
    the first pause copies the parameters and buffers (per block)."""
    for raw, _, _ in probe.blocks.values():
        if not raw.frozen:
            raw.freeze()
    owner.unfinished = probe
    return Output(records=[], status="continues", num_matvecs=spent,
                  reason=f"{key}: stopped by the budget's {cut:.3g} s per call; the probe of step {probe.step} "
                         f"continues at the next call ({probe.products} products so far)",
                  settings={"probe_step": probe.step})


@dataclass(frozen=True)
class Eigenspace:
    """One probe's top eigenpairs of one block, as ``hessian_top`` shares them (``ctx.top_eigenspace``).

    Attributes:
        kind: "hessian" or "ggn".
        block: the block key ("all" or a block name).
        step: the training step of the probe.
        eigenvalues: float64 ``[k]``, descending.
        eigenvectors: ``[P, k]`` orthonormal columns (operator dtype, operator device).
        converged: bool ``[k]``.
        param_names: the parameters of the block, in flattening order.
        param_numels: their sizes, to flatten other ``{name: tensor}`` dicts in the same order.
    """

    kind: str
    block: str
    step: int
    eigenvalues: Tensor
    eigenvectors: Tensor
    converged: Tensor
    param_names: tuple[str, ...]
    param_numels: tuple[int, ...]

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: tensor}`` -> flat ``[P]`` in this eigenspace's order (missing names are zeros). Cost: one copy."""
        parts = []
        for n, numel in zip(self.param_names, self.param_numels):
            t = tensors.get(n)
            if t is None:
                parts.append(torch.zeros(numel, dtype=self.eigenvectors.dtype, device=self.eigenvectors.device))
            else:
                parts.append(t.detach().reshape(-1).to(dtype=self.eigenvectors.dtype, device=self.eigenvectors.device))
        return torch.cat(parts)


class CurvatureDiagnostic(Diagnostic):
    """Options common to the curvature diagnostics: the curvature kind, the blocks and a seed.

    A class that measures one kind only (``hessian_top`` measures the Hessian, ``ggn_top`` the GGN)
    sets ``curvature_kind``; its ``kind=`` option must then agree. Classes with ``curvature_kind = None``
    (``grad_subspace``) take either kind per instance.
    """

    requires = frozenset({"curvature"})
    #: The kind this class measures ("hessian" or "ggn"), or None when ``kind=`` chooses per instance.
    curvature_kind: ClassVar[str | None] = None
    #: Metric suffixes; the prefix is "hessian_" or "ggn_".
    _suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, every: int | None = None, start: int = 0, *, kind: str | None = None, params: Any = None,
                 seed: int = 0) -> None:
        super().__init__(every=every, start=start)
        fixed = type(self).curvature_kind
        kind = check_kind(kind if kind is not None else fixed or "hessian", self.name)
        if fixed is not None and kind != fixed:
            raise ConfigError(f"{self.name} measures the {fixed}, not the {kind}: use the {kind}_* diagnostic")
        self.kind = kind
        self.blocks = parse_blocks(params, self.name)
        self.seed = int(seed)
        self.prefix = f"{kind}_"
        self.metrics = tuple(self.prefix + s for s in self._suffixes)

    def operators(self, ctx: StepContext) -> Iterator[tuple[str, Any]]:
        """``(block key, operator)`` per block; ``ctx.curvature`` builds each once per step."""
        for key, sel in self.blocks.items():
            yield key, ctx.curvature(self.kind, None if sel is None else list(sel))

    def block_params(self, key: str) -> list[str] | None:
        """The parameter selection of block ``key`` as ``ctx.curvature`` takes it."""
        sel = self.blocks[key]
        return None if sel is None else list(sel)

    def settings(self) -> dict[str, Any]:
        blocks = {k: (None if v is None else list(v)) for k, v in self.blocks.items()}
        return {**super().settings(), "kind": self.kind, "blocks": blocks, "seed": self.seed}
