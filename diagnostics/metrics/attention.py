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
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diagnostics._batch import leading_size, samples_for_tokens, slice_batch
from diagnostics._hooks import training_forward
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


def _first_rows(mask: Any, q: torch.Tensor) -> Any:
    """A mask broadcast against queries ``q`` cut to ``q``'s samples: only a mask with the same number of
    dimensions carries a batch dimension (a shorter one broadcasts over the batch and stays whole)."""
    if not torch.is_tensor(mask):
        return mask
    mask = mask.detach()
    if mask.dim() == q.dim() and mask.shape[0] > q.shape[0]:
        return mask[: q.shape[0]]
    return mask


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

    def __init__(
        self,
        model: nn.Module,
        modules: tuple[str, ...] = (),
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        max_tokens: int | None = None,
    ):
        self.model = model
        self.patterns = modules
        self.chunk_elements = chunk_elements
        # On the training forward the calls see the whole batch: keep the first samples holding about
        # max_tokens query positions, so the cost is the same as the extra forward's.
        self.max_tokens = max_tokens
        self.stats: dict[str, AttentionStats] = {}
        self.calls = 0
        self._stack: list[tuple[str, nn.Module]] = []

    def _chosen(self, name: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def _current(self) -> tuple[str, nn.Module] | None:
        return self._stack[-1] if self._stack else None

    def _first(self, t: Any) -> Any:
        """The first samples of a [B, ..., L, E] tensor holding about ``max_tokens`` queries, detached."""
        if not torch.is_tensor(t):
            return t
        t = t.detach()
        if self.max_tokens is None or t.dim() < 3:
            return t
        keep = max(1, self.max_tokens // max(1, t.shape[-2]))
        return t[:keep] if keep < t.shape[0] else t

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
        q, k, mask = self._first(p["query"]), self._first(p["key"]), p.get("attn_mask")
        mask = _first_rows(mask, q)
        with torch.no_grad():
            self._add(sdpa_statistics(
                q, k, mask, bool(p.get("is_causal", False)),
                p.get("scale"), bool(p.get("enable_gqa", False)), self.chunk_elements,
            ))

    def on_mha(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            q, k, mask = mha_query_key(*args, **kwargs)
            if self.max_tokens is not None:
                q, k = self._first(q), self._first(k)
                mask = _first_rows(mask, q)
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
        with torch.no_grad():
            self._add(logit_statistics(self._first(x), self.chunk_elements))

    @contextlib.contextmanager
    def watch(self, training_only: bool = False) -> Iterator[AttentionProbe]:
        """Hooks on every module (which module is running) and the mode, removed in ``finally``.

        The mode is active only while the model's own forward runs (entered by a forward pre-hook on the
        model, left by its forward hook), so the rest of a training step, the optimizer's many small
        calls above all, does not pass through it. ``training_only``: only for a training forward
        (:func:`~diagnostics._hooks.training_forward`), not a validation forward.
        """
        handles = []
        stack = self._stack
        mode = _Mode(self)
        depth = [0]
        entered = [False]

        def push(name: str, module: nn.Module) -> Any:
            return lambda _m, _a: stack.append((name, module))

        def pop(_m: nn.Module, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        def enter(m: nn.Module, _a: Any) -> None:
            depth[0] += 1
            if depth[0] == 1 and (not training_only or training_forward(m)):
                mode.__enter__()
                entered[0] = True

        def leave(_m: nn.Module, _a: Any, _o: Any) -> None:
            depth[0] -= 1
            if depth[0] == 0 and entered[0]:
                mode.__exit__(None, None, None)
                entered[0] = False

        try:
            handles.append(self.model.register_forward_pre_hook(enter))
            handles.append(self.model.register_forward_hook(leave, always_call=True))
            for name, module in self.model.named_modules():
                if not name:
                    continue
                handles.append(module.register_forward_pre_hook(push(name, module)))
                handles.append(module.register_forward_hook(pop, always_call=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            if entered[0]:  # a forward that raised before its forward hook
                mode.__exit__(None, None, None)
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

    Cost per step: when the Monitor observes the training forward (the diagnostic is due at every
    step), forming the logits again on the first samples of it; otherwise one no-grad forward over
    about ``max_tokens`` tokens. Either way every torch call of that forward passes
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
    # Its probe intercepts every torch function of the observed forward (a tiny GPT's training step took
    # 43 ms instead of 30 with it): time a budget could not see, so a budget lets it run its own forward.
    cheap_to_observe = False

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
        self._observed: tuple[weakref.ref[nn.Module], AttentionProbe] | None = None
        self.last_source: str | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_tokens": self.max_tokens, "modules": list(self.modules) or "all",
                "chunk_elements": self.chunk_elements}

    def measure(self, model: nn.Module, loss_fn: Any, batch: Any) -> dict[str, AttentionStats]:
        """``{module name: statistics}`` of one no-grad, eval-mode forward over the batch's first samples."""
        probe = AttentionProbe(model, self.modules, self.chunk_elements)
        sub = first_samples(batch, self.max_tokens)
        with torch.no_grad(), eval_mode(model), probe.watch():
            loss_fn(model, sub)
        return probe.stats

    @contextlib.contextmanager
    def observe_training_forward(self, model: nn.Module) -> Iterator[None]:
        """Read the attention calls of the user's next training forward (held open by the Monitor between
        two steps when this diagnostic is due at every step), on the first samples holding about
        ``max_tokens`` queries. The statistics are formed from detached tensors under no_grad, so the
        training graph is untouched; the training forward runs in train mode (dropout as in training).
        When no forward ran before the next ``compute``, that step falls back to its own forward. A
        validation forward in between (under ``torch.no_grad``, ``torch.inference_mode`` or
        ``model.eval()``) is not read.
        """
        probe = AttentionProbe(model, self.modules, self.chunk_elements, max_tokens=self.max_tokens)
        with probe.watch(training_only=True):
            yield
        self._observed = (weakref.ref(model), probe)

    def compute(self, ctx: StepContext) -> Output:
        observed, self._observed = self._observed, None
        if observed is not None and observed[0]() is ctx.model and observed[1].calls:
            stats, self.last_source = observed[1].stats, "training_forward"
        else:
            stats, self.last_source = self.measure(ctx.model, ctx.loss_fn, ctx.batch), "extra_forward"
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
        return Output(records=records, settings={"modules": list(stats), "source": self.last_source})
