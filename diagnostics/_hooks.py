"""Scoped forward hooks that capture module inputs and outputs into containers the caller owns.

Every handle is removed in ``finally``; nothing is set on modules or parameters. Captured tensors are
flattened to ``[rows, features]`` (rows = tokens or samples), detached, and capped at ``max_rows`` per
module, chosen by an even stride (no random numbers drawn), so memory stays within a token budget
whatever the batch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from diagnostics._batch import tensor_leaves
from diagnostics.errors import ConfigError

ModuleSpec = None | str | Iterable[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool]


class HookClock:
    """Seconds spent inside the hooks it wrapped, since the last :meth:`take`.

    A diagnostic's hooks on the user's training forward run between two calls of the Monitor, where
    the Monitor's own clock would count them as training: wrapping them here lets the Monitor charge
    them to the diagnostic instead. Wall time on the host (on CUDA, the launches, not the kernels).
    """

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook`` with its wall time added to this clock. Cost: two clock reads per call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    def take(self) -> float:
        """The seconds since the last call (and start counting afresh)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def training_forward(module: nn.Module) -> bool:
    """Whether the forward now running through ``module`` is a training forward: gradients enabled and the
    module in train mode. The hooks that observe the user's training forward between two ``monitor.step``
    calls skip any other forward, such as a validation pass under ``torch.no_grad``,
    ``torch.inference_mode`` or ``model.eval()``, which would otherwise be measured in its place."""
    return module.training and torch.is_grad_enabled()


class TrainingForwardGate:
    """Open while a training forward of ``model`` (:func:`training_forward` at its entry) runs.

    Hooks on the model's submodules that observe the user's training forward ask :meth:`allows`, so the
    decision is the whole forward's: a part the model itself runs under ``no_grad`` or in eval mode (a
    frozen encoder, a target network) is still measured within a training forward, and nothing of a
    validation forward is. A submodule called on its own, outside a forward of the model (a
    LightningModule whose ``training_step`` calls ``self.net(x)``), is judged by its own state. Holds a
    forward pre-hook and a forward hook on ``model`` until :meth:`remove`; register it before the hooks
    that read it, so that on the model itself its pre-hook runs first.
    """

    __slots__ = ("_depth", "_handles", "open")

    def __init__(self, model: nn.Module) -> None:
        self.open = False
        self._depth = 0
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._leave, always_call=True)]

    def _enter(self, model: nn.Module, _args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self.open = training_forward(model)

    def _leave(self, _model: nn.Module, _args: Any, _out: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.open = False

    def allows(self, module: nn.Module) -> bool:
        """Whether ``module``, now running, runs in a training forward: the model's decision inside a forward
        of the model, else :func:`training_forward` of ``module``."""
        return self.open if self._depth else training_forward(module)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()


def select_modules(model: nn.Module, modules: ModuleSpec = None) -> dict[str, nn.Module]:
    """Resolve a module selection to ``{name: module}`` in ``named_modules()`` order.

    Args:
        modules: None (every ``nn.Linear``), a module class or tuple of classes, a name or glob pattern or
            a list of them, or a predicate ``f(name, module) -> bool``.

    Returns:
        The selected modules. Raises ConfigError naming a pattern that matches nothing.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if modules is None:
        modules = nn.Linear
    if isinstance(modules, type) or (
        isinstance(modules, tuple) and modules and all(isinstance(t, type) for t in modules)
    ):
        return {n: m for n, m in named if isinstance(m, modules)}
    if callable(modules) and not isinstance(modules, str):
        return {n: m for n, m in named if modules(n, m)}
    patterns = [modules] if isinstance(modules, str) else list(modules)
    chosen: dict[str, nn.Module] = {}
    for pat in patterns:
        hits = [(n, m) for n, m in named if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"module pattern {pat!r} matches no submodule of the model; "
                f"names look like: {', '.join(n for n, _ in named[:8])}"
            )
        chosen.update(hits)
    return {n: m for n, m in named if n in chosen}


def first_tensor(x: Any) -> torch.Tensor | None:
    """The first floating tensor in a module's output or input (tuples from attention modules, dicts)."""
    return next((t for t in tensor_leaves(x) if t.is_floating_point()), None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # Features live in the last dimension for Linear/attention/LayerNorm outputs; conv maps put them in
    # dim 1, so move channels last before flattening.
    if t.ndim == 4:
        t = t.movedim(1, -1)
    if t.ndim == 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])


class _Collector:
    """Appends capped, detached row blocks for one module into the caller's list."""

    def __init__(self, out: list[torch.Tensor], max_rows: int | None) -> None:
        self.out = out
        self.max_rows = max_rows
        self.count = 0

    def add(self, value: Any) -> None:
        t = first_tensor(value)
        if t is None:
            return
        rows = _rows(t.detach())
        if self.max_rows is not None:
            room = self.max_rows - self.count
            if room <= 0:
                return
            if rows.shape[0] > room:
                # An even stride keeps tokens from every sample and position without drawing random numbers.
                idx = torch.linspace(0, rows.shape[0] - 1, room, device=rows.device).round().long()
                rows = rows.index_select(0, idx)
        self.out.append(rows.clone())
        self.count += rows.shape[0]


@contextlib.contextmanager
def capture_outputs(
    modules: Mapping[str, nn.Module], into: dict[str, list[torch.Tensor]], *, max_rows: int | None = None
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each module's output as ``[rows, features]`` blocks in ``into[name]`` while the block runs.

    Cost: one detached copy of at most ``max_rows`` rows per module and forward call.
    """
    handles = []
    try:
        for name, module in modules.items():
            col = _Collector(into.setdefault(name, []), max_rows)
            handles.append(module.register_forward_hook(lambda _m, _i, out, col=col: col.add(out)))
        yield into
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_inputs(
    modules: Mapping[str, nn.Module], into: dict[str, list[torch.Tensor]], *, max_rows: int | None = None
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each module's (first floating) input as ``[rows, features]`` blocks in ``into[name]``.

    Uses forward pre-hooks. Cost: one detached copy of at most ``max_rows`` rows per module and call.
    """
    handles = []
    try:
        for name, module in modules.items():
            col = _Collector(into.setdefault(name, []), max_rows)
            handles.append(module.register_forward_pre_hook(lambda _m, args, col=col: col.add(args)))
        yield into
    finally:
        for h in handles:
            h.remove()


def concat(captured: Mapping[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join each module's captured blocks into one ``[rows, features]`` tensor (modules never called dropped)."""
    return {n: torch.cat(blocks, 0) for n, blocks in captured.items() if blocks}
