"""Attention statistics per attention module: largest pre-softmax logit, mean and minimum head entropy.

The ``attention_stats`` diagnostic runs one no-grad, eval-mode forward over the first samples of the
step's batch (about ``max_tokens`` tokens) with a scoped :class:`~torch.overrides.TorchFunctionMode`
that sees the attention calls, and forward hooks on every module that tell which module made each call:

- ``F.scaled_dot_product_attention`` (any model that calls it, Hugging Face's ``sdpa`` attention
  included), with its ``attn_mask``, ``is_causal``, ``scale`` and ``enable_gqa``: the logits are formed
  again from query and key in chunks (:func:`~diagnostics.metrics.attention_stats.sdpa_statistics`),
  never the whole attention matrix at once;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, which then takes its Python path rather
  than the fused fast path): queries and keys are projected again with the module's weights, with its
  masks, key bias and zero-attention column;
- a softmax over the last dimension called inside a module whose class name contains "attention" or
  "attn" (Hugging Face's ``eager`` attention, explicit-matmul models such as the zoo's tiny GPT): the
  logits the model formed are read in chunks.

The intercepted call itself runs unchanged; the mode and the hooks exist only during this forward.
Definitions: docs/metrics.md, "Attention and output logits".
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diagnostics._batch import leading_size, samples_for_tokens, slice_batch
from diagnostics._state import eval_mode
from diagnostics.errors import ConfigError
from diagnostics.metrics.attention_stats import (
    DEFAULT_CHUNK_ELEMENTS,
    AttentionStats,
    logit_statistics,
    mha_query_key,
    sdpa_statistics,
)
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["AttentionProbe", "AttentionStatistics", "first_samples"]

_ATTENTION_CLASS = re.compile(r"attn|attention", re.IGNORECASE)
_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
#: Key of calls made by the model's own forward rather than a submodule.
ROOT_KEY = "(model)"


class _Mode(TorchFunctionMode):
    """Hands the attention calls to the probe, then runs every call unchanged."""

    def __init__(self, probe: AttentionProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.probe.on_sdpa(args, kwargs)
        elif func is _MHA:
            self.probe.on_mha(args, kwargs)
        elif func in _SOFTMAX:
            self.probe.on_softmax(args, kwargs)
        return func(*args, **kwargs)


class AttentionProbe:
    """Collects :class:`AttentionStats` per module name while :meth:`watch` is active.

    Args:
        model: the model whose forward is watched.
        modules: glob patterns of module names to record (None: every module that makes an attention
            call); a softmax counts as attention inside these modules whatever their class.
        chunk_elements: logit entries formed at once.
    """

    def __init__(self, model: nn.Module, modules: tuple[str, ...] = (), chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.model = model
        self.patterns = modules
        self.chunk_elements = chunk_elements
        self.stats: dict[str, AttentionStats] = {}
        self.calls = 0
        self._stack: list[tuple[str, nn.Module]] = []

    def _chosen(self, name: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def _current(self) -> tuple[str, nn.Module] | None:
        return self._stack[-1] if self._stack else None

    def _add(self, st: AttentionStats) -> None:
        cur = self._current()
        name = cur[0] if cur else ROOT_KEY
        if not self._chosen(name):
            return
        self.calls += 1
        self.stats[name] = self.stats[name].merge(st) if name in self.stats else st

    def on_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        p = {**dict(zip(names, args)), **kwargs}
        self._add(sdpa_statistics(
            p["query"], p["key"], p.get("attn_mask"), bool(p.get("is_causal", False)), p.get("scale"),
            bool(p.get("enable_gqa", False)), self.chunk_elements,
        ))

    def on_mha(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        q, k, mask = mha_query_key(*args, **kwargs)
        self._add(sdpa_statistics(q, k, mask, chunk_elements=self.chunk_elements))

    def on_softmax(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cur = self._current()
        if cur is None:
            return
        name, module = cur
        if not ((self.patterns and self._chosen(name)) or _ATTENTION_CLASS.search(type(module).__name__)):
            return
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2 or dim not in (-1, x.dim() - 1):
            return
        self._add(logit_statistics(x, self.chunk_elements))

    @contextlib.contextmanager
    def watch(self) -> Iterator[AttentionProbe]:
        """Hooks on every module (which module is running) and the mode, removed in ``finally``."""
        handles = []
        stack = self._stack

        def push(name: str, module: nn.Module) -> Any:
            return lambda _m, _a: stack.append((name, module))

        def pop(_m: nn.Module, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        try:
            for name, module in self.model.named_modules():
                if not name:
                    continue
                handles.append(module.register_forward_pre_hook(push(name, module)))
                handles.append(module.register_forward_hook(pop, always_call=True))
            with _Mode(self):
                yield self
        finally:
            for h in handles:
                h.remove()
            stack.clear()


def first_samples(batch: Any, max_tokens: int) -> Any:
    """The first samples of the batch holding about ``max_tokens`` tokens (no random numbers drawn)."""
    n, keep = leading_size(batch), samples_for_tokens(batch, max_tokens)
    return batch if n is None or keep is None or keep >= n else slice_batch(batch, keep)


def _as_patterns(modules: str | Iterable[str] | None) -> tuple[str, ...]:
    if modules is None:
        return ()
    return (modules,) if isinstance(modules, str) else tuple(modules)


@register
class AttentionStatistics(Diagnostic):
    """Largest pre-softmax logit and attention entropy per attention module (``attn_*``).

    Per module that made an attention call (key = module name) and for the whole model ("all"):
    ``attn_logit_max`` (largest allowed logit; "all": over modules), ``attn_entropy_mean`` (mean entropy
    in nats over heads, batch and queries; "all": mean over modules), ``attn_entropy_min`` (the smallest
    head's mean entropy; "all": over modules), and ``attn_modules`` (how many modules were measured).

    Args:
        every, start: schedule (default every 10 steps).
        max_tokens: tokens of the forward (the first samples of the step's batch that hold about this
            many; whole sequences are kept).
        modules: glob patterns of module names to record (None: every module making an attention call).
        chunk_elements: logit entries formed at once (memory about six float32 buffers of that size).

    Cost per step: one no-grad forward over about ``max_tokens`` tokens with every torch call passing
    through a Python mode (a few microseconds each), plus forming each attention call's logits again
    (O(B H L S E), as the attention itself; for ``nn.MultiheadAttention`` also two input projections).
    Memory: O(chunk_elements), never the batch's whole attention matrix. 3 records per module plus 4.
    A forward without any attention call records ``attn_modules`` = 0 with the status
    ``nothing_measured`` (the Monitor reports it once as a ``misuse`` event).
    """

    name = "attention_stats"
    requires = frozenset({"activations"})
    preset = "standard"
    default_every = 10
    allow_nonfinite = True  # a logit that overflowed is stored as the inf it is
    metrics: ClassVar[tuple[str, ...]] = ("attn_logit_max", "attn_entropy_mean", "attn_entropy_min", "attn_modules")

    def __init__(
        self,
        every: int | None = None,
        start: int = 0,
        *,
        max_tokens: int = 1024,
        modules: str | Iterable[str] | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(every, start)
        if int(max_tokens) < 1 or int(chunk_elements) < 1:
            raise ConfigError(f"attention_stats: max_tokens and chunk_elements must be >= 1, got {max_tokens}, "
                              f"{chunk_elements}")
        self.max_tokens = int(max_tokens)
        self.modules = _as_patterns(modules)
        self.chunk_elements = int(chunk_elements)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_tokens": self.max_tokens, "modules": list(self.modules) or "all",
                "chunk_elements": self.chunk_elements, "mode": "eval"}

    def measure(self, model: nn.Module, loss_fn: Any, batch: Any) -> dict[str, AttentionStats]:
        """``{module name: statistics}`` of one no-grad, eval-mode forward over the batch's first samples."""
        probe = AttentionProbe(model, self.modules, self.chunk_elements)
        sub = first_samples(batch, self.max_tokens)
        with torch.no_grad(), eval_mode(model), probe.watch():
            loss_fn(model, sub)
        return probe.stats

    def compute(self, ctx: StepContext) -> Output:
        stats = self.measure(ctx.model, ctx.loss_fn, ctx.batch)
        records = [Record("attn_modules", float(len(stats)))]
        if not stats:
            where = f" matching {list(self.modules)}" if self.modules else ""
            return Output(records=records, status="nothing_measured", reason=(
                "no attention call in the forward: the model calls neither F.scaled_dot_product_attention, "
                f"nn.MultiheadAttention nor a softmax inside an attention module{where}. Name the attention "
                "modules with modules=[...] (a softmax inside them counts), or drop attention_stats from diagnostics"))
        means, mins, tops = [], [], []
        for name, st in stats.items():
            heads = st.head_entropy_mean()
            top = st.logit_max
            if heads.numel():
                mean = float(st.head_entropy_sum.sum() / st.head_rows.sum())
                low = float(heads.min())
                records += [Record("attn_entropy_mean", mean, name), Record("attn_entropy_min", low, name)]
                means.append(mean)
                mins.append(low)
            if top > -math.inf:
                records.append(Record("attn_logit_max", top, name))
                tops.append(top)
        if tops:
            records.append(Record("attn_logit_max", max(tops)))
        if means:
            records += [Record("attn_entropy_mean", sum(means) / len(means)), Record("attn_entropy_min", min(mins))]
        return Output(records=records, settings={"modules": list(stats)})
