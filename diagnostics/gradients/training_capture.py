"""Per-sample gradients read off the user's own training step: no forward or backward of our own.

For layers whose parameter gradient is a sum over positions of (input) x (output gradient) (the layers of
:mod:`diagnostics.gradients.per_sample_layers`), the training backward already computes everything a
sample's gradient needs: each layer's input in the forward and the gradient of its output in the
backward. :class:`TrainingStepCapture` holds hooks on the model for the next training forward that keep
both for the batch's first ``n`` samples (a copy of those rows only), and :meth:`gradients` forms the
samples' gradients from them with one batched product per layer call.

What the capture sees is the gradient of the user's loss, in the user's mode (dropout on in train mode)
and precision, which equals the per-sample gradient of :func:`~diagnostics.gradients.per_sample_gradients`
(sample i's own loss, eval mode) only when the loss is the mean of equally weighted per-sample losses
over the batch, no layer behaves differently in train mode, and the forward runs in the parameters'
precision; the caller checks that once against its own pass (``GSNRDiagnostic`` does). Only the first
forward of the model after the hooks are installed is kept (with gradient accumulation, the first
micro-batch).

A lookup shared by the whole batch (a position embedding called with ``arange(T)`` or ids ``[1, T]``) has
one output for all samples, whose gradient is already summed over them. When that output is only added
to another tensor (token plus position embeddings), the gradient of the sum is each sample's gradient of
the lookup's output: after the forward the capture finds that addition in the autograd graph and keeps
the first ``n`` rows of its gradient. A layer whose input does not lead with the batch, a shared lookup
used otherwise, or a model called with no batch dimension leaves the capture unusable, and
:meth:`gradients` says why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics._batch import leading_size, tensor_leaves
from diagnostics._hooks import HookClock, training_forward
from diagnostics.gradients.per_sample_layers import Owners, accumulate_call
from diagnostics.gradients.ratio_reduction import GSNRReduction, ratio_dtype
from diagnostics.gradients.stats import GradientMoments, _moments

__all__ = ["FlatGradientBuffer", "TrainingStepCapture"]


class _Call:
    __slots__ = ("module", "attrs", "x", "g", "shared", "node")

    def __init__(self, module: nn.Module, attrs: dict[str, str], x: Tensor, shared: bool = False,
                 node: Any = None) -> None:
        self.module, self.attrs, self.x, self.shared, self.node = module, attrs, x, shared, node
        self.g: Tensor | None = None


def _consumers(roots: list[Any], targets: set[Any]) -> dict[Any, list[Any]]:
    """``{target node: the autograd nodes that take its output}``, searched from ``roots`` backwards."""
    found: dict[Any, list[Any]] = {t: [] for t in targets}
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if nxt in found:
                found[nxt].append(node)
            stack.append(nxt)
    return found


class FlatGradientBuffer:
    """The ``[n, P]`` buffer :meth:`TrainingStepCapture.gradients` writes the samples' gradients into, with
    a view per parameter, kept from one capture to the next while the parameters' shapes, dtype and device
    and ``n`` stay the same (a small model's GSNR runs every few steps, and on it making the buffer and
    its views costs about as much as filling them).

    A buffer over ``max_bytes`` (16 MB by default: the size from which GSNR reduces each parameter's
    samples apart instead, so only a large model's first check asks for more) is made for its call and not
    kept. Whoever holds one must not keep a capture's gradients past the next capture that uses it.
    """

    def __init__(self, max_bytes: int = 16 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._key: tuple[Any, ...] | None = None
        self._value: tuple[Tensor, dict[str, Tensor], list[tuple[str, torch.Size]]] | None = None

    def take(self, selected: dict[str, Tensor],
             n: int) -> tuple[Tensor, dict[str, Tensor], list[tuple[str, torch.Size]]]:
        """``(flat, views, layout)`` for ``n`` samples of the ``selected`` parameters (which share a dtype and
        device): the kept ones when they fit, else new ones, kept instead."""
        first = next(iter(selected.values()))
        key = (n, first.dtype, first.device, *((k, p.shape) for k, p in selected.items()))
        if self._key == key and self._value is not None:
            flat, views, layout = self._value
            return flat, dict(views), layout
        flat = torch.empty((n, sum(p.numel() for p in selected.values())), dtype=first.dtype, device=first.device)
        views, at = {}, 0
        for k, p in selected.items():
            views[k] = flat[:, at:at + p.numel()].view(n, *p.shape)
            at += p.numel()
        layout = [(k, p.shape) for k, p in selected.items()]
        if flat.numel() * flat.element_size() <= self.max_bytes:
            self._key, self._value = key, (flat, views, layout)
        return flat, dict(views), layout


class TrainingStepCapture:
    """Hooks that keep, for the first ``n`` samples of the model's next forward, the inputs and output
    gradients of the layers owning the selected parameters.

    Use as a context manager around the training forward and backward (the hooks are removed on exit);
    then call :meth:`gradients`. Cost per hooked layer call: one copy of ``n`` rows of its input in the
    forward and of its output gradient in the backward, and two Python calls (timed by ``clock``).
    """

    def __init__(self, model: nn.Module, owners: Owners, n: int, clock: HookClock | None = None,
                 buffer: FlatGradientBuffer | None = None) -> None:
        self.model, self.owners, self.n = model, owners, int(n)
        self._buffer = buffer  # where :meth:`gradients` writes, kept by the caller from one capture to the next
        self.calls: list[_Call] = []
        self.batch: int | None = None  # the leading size of the captured forward's input
        self.problem: str | None = None  # why the capture cannot be used, once known
        #: after :meth:`gradients`: the gradients as one ``[n, P]`` tensor when the parameters share a dtype
        #: and device (else None), and each parameter's name and shape in its columns, in order.
        self.flat: Tensor | None = None
        self.layout: list[tuple[str, torch.Size]] = []
        self._forwards = 0  # model forwards completed while the hooks were held
        self._depth = 0  # > 0 inside the model's forward
        self._attrs = {id(m): attrs for m, attrs in owners}
        self._wrap = (lambda f: f) if clock is None else clock.wrap
        self._handles: list[Any] = []

    def __enter__(self) -> TrainingStepCapture:
        wrap = self._wrap
        # Layers first: when the model is itself a hooked layer, its layer hook runs before the model
        # forward is counted as done (forward hooks run in the order they were registered).
        for module, _ in self.owners:
            self._handles.append(module.register_forward_hook(wrap(self._layer)))
        self._handles.append(self.model.register_forward_pre_hook(wrap(self._enter_model), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(wrap(self._leave_model), always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- hooks ----------------------------------------------------------------------------------------
    # Only training forwards count (gradients enabled and the model in train mode as its forward starts):
    # a validation forward between two steps, under no_grad or in eval mode, is passed over.
    def _enter_model(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not training_forward(m):
            return
        self._depth += 1
        if self._forwards == 0 and self._depth == 1:
            self.batch = leading_size((args, kwargs))

    def _leave_model(self, m: nn.Module, _args: Any, out: Any) -> None:
        if not training_forward(m):
            return
        self._depth -= 1
        if self._depth == 0:
            self._forwards += 1
            if self._forwards == 1 and self.problem is None:
                self._watch_shared(out)

    def _watch_shared(self, out: Any) -> None:
        """For each lookup shared by the batch (a position embedding), hook the sum it is added to: the
        gradient of that sum, per sample, is the gradient of the lookup's output for that sample."""
        shared = [c for c in self.calls if c.shared]
        if not shared:
            return
        roots = [t.grad_fn for t in tensor_leaves(out) if t.grad_fn is not None]
        found = _consumers(roots, {c.node for c in shared})
        for c in shared:
            users = found[c.node]
            add = users[0] if len(users) == 1 else None
            if add is None or type(add).__name__ != "AddBackward0" or getattr(add, "_saved_alpha", 1) != 1:
                names = sorted({type(u).__name__ for u in users}) or ["nothing in the model's output"]
                self.problem = (f"a lookup shared by the batch ({type(c.module).__name__}) is used by "
                                f"{', '.join(names)}, not only added to a tensor led by the batch")
                return
            add.register_prehook(self._wrap(self._keep_sum_gradient(c)))

    def _keep_sum_gradient(self, call: _Call) -> Any:
        n, B = self.n, self.batch

        def keep(grad_outputs: tuple[Tensor, ...]) -> None:
            g = grad_outputs[0]
            if g is None or g.dim() < 2 or g.shape[0] != B:
                self.problem = "the sum a shared lookup is added to is not led by the batch"
                return
            call.g = g[:n].detach().clone()

        return keep

    def _layer(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # Inside a training forward (self._depth), a part run under no_grad has no backward to read.
        if self._forwards or not self._depth or self.problem is not None or not torch.is_grad_enabled():
            return
        x = args[0] if args else None
        B = self.batch
        if isinstance(module, nn.Embedding) and isinstance(x, Tensor) and isinstance(output, Tensor) \
                and B is not None and B > 1 and output.grad_fn is not None \
                and (x.dim() == 1 or (x.dim() >= 2 and x.shape[0] == 1)):
            # Positions looked up once for the whole batch: their gradient is read where they are added. A
            # 1-D lookup is taken for positions even when as long as the batch; one index per sample
            # would fail the shape check of :meth:`gradients` (its sum has no position dimension).
            self.calls.append(_Call(module, self._attrs[id(module)], x.detach(), True, output.grad_fn))
            return
        if not isinstance(x, Tensor) or not isinstance(output, Tensor) or x.dim() < 2 or B is None \
                or x.shape[0] != B or output.shape[0] != B:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            self.problem = (f"{type(module).__name__} was called on an input of shape {shape}, not led by the "
                            f"batch of {B} (a lookup shared by all samples, such as a position embedding)")
            return
        if not output.requires_grad:
            return
        call = _Call(module, self._attrs[id(module)], x[: self.n].detach().clone())
        self.calls.append(call)
        n = self.n

        def keep(g: Tensor, call: _Call = call) -> None:
            call.g = g[:n].detach().clone()

        output.register_hook(self._wrap(keep))

    # --- result ---------------------------------------------------------------------------------------
    def _samples(self) -> int | str:
        """How many samples the captured gradients have (``min(n, B)``), or a sentence saying why there are none."""
        if self.problem is not None:
            return self.problem
        if not self.calls:
            return "no training forward with gradients ran while the hooks were held"
        if any(c.g is None for c in self.calls):
            return "the training forward's backward did not reach every hooked layer"
        B = int(self.batch or 0)
        n = min(self.n, B)
        if n < 2:
            return f"the captured batch holds {B} sample(s); at least 2 are needed"
        return n

    def _add_call(self, c: _Call, out: dict[str, Tensor], written: set[str], n: int) -> str | None:
        """Add this layer call's per-sample contributions into ``out`` (:func:`accumulate_call`); a sentence
        when the call cannot be used (then :attr:`problem` says it too)."""
        # Under autocast the captured tensors may be half precision: the sums run in the parameters'.
        dtype = out[next(iter(c.attrs.values()))].dtype
        x = c.x if c.shared else c.x[:n] if not c.x.is_floating_point() or c.x.dtype == dtype else c.x[:n].to(dtype)
        g = c.g[:n] if c.g.dtype == dtype else c.g[:n].to(dtype)
        if c.shared and g[0].numel() != c.x.numel() * g.shape[-1]:
            self.problem = (f"the sum a shared lookup ({type(c.module).__name__}) is added to has shape "
                            f"{tuple(c.g.shape[1:])}, not the lookup's positions {tuple(c.x.shape)} by its width")
            return self.problem
        accumulate_call(c.module, c.attrs, x, g, c.shared, out, written, n, scale=int(self.batch or 0))
        return None

    def gradients(self, selected: dict[str, Tensor], samples: int | None = None) -> dict[str, Tensor] | str:
        """``{name: Tensor[n, *shape]}``: each captured sample's gradient, ``B`` times its share of the
        batch loss's gradient (``B`` the captured batch's size), or a sentence saying why there is none.
        ``samples``: only the first so many of the captured samples.

        Cost: one batched product per captured layer call (the FLOPs of the n samples' weight gradients).
        """
        n = self._samples()
        if isinstance(n, str):
            return n
        if samples is not None:
            n = min(n, int(samples))
        # One [n, P] buffer with a view per parameter: the moments then take two passes in all.
        first = next(iter(selected.values()))
        same = all(p.dtype == first.dtype and p.device == first.device for p in selected.values())
        if same:
            self.flat, out, self.layout = (self._buffer or FlatGradientBuffer()).take(selected, n)
        else:
            self.flat, self.layout = None, []
            out = {k: torch.empty((n, *p.shape), dtype=p.dtype, device=p.device) for k, p in selected.items()}
        written: set[str] = set()
        with torch.no_grad():
            for c in self.calls:
                if self._add_call(c, out, written, n) is not None:
                    return self.problem  # type: ignore[return-value]
            for name in out.keys() - written:
                out[name].zero_()  # no captured call reached the loss
        return out

    def moments(self, selected: dict[str, Tensor]) -> GradientMoments | str:
        """The mean and unbiased variance over the captured samples of each selected parameter's gradient
        (those of :meth:`gradients`, without keeping them), or a sentence saying why there are none.

        Each parameter's per-sample gradients are formed in a temporary of their own and reduced as soon as
        the last layer call that reaches the parameter has been added (a tied weight's stays until then):
        the memory is ``n`` times the largest parameters at a time instead of an ``[n, P]`` buffer, and no
        such buffer is mapped afresh at every call. Cost: the products of :meth:`gradients` and the
        moments' two passes (:func:`~diagnostics.gradients.stats.gradient_moments`).
        """
        n = self._samples()
        if isinstance(n, str):
            return n
        first = next(iter(selected.values()))
        mean = torch.empty(sum(p.numel() for p in selected.values()), dtype=torch.float64, device=first.device)
        var = torch.empty_like(mean)
        place, at = {}, 0
        for k, p in selected.items():
            place[k] = (at, at + p.numel())
            at += p.numel()

        def reduce(name: str, per_sample: Tensor) -> None:
            a, b = place[name]
            _moments(per_sample.to(first.device), out=(mean[a:b], var[a:b]))

        def zero(name: str) -> None:  # a zero gradient for every sample: mean and variance 0
            a, b = place[name]
            mean[a:b] = 0.0
            var[a:b] = 0.0

        problem = self._each_parameter(selected, n, reduce, zero)
        if problem is not None:
            return problem
        return GradientMoments.from_moments(mean, var, [(k, p.shape) for k, p in selected.items()], n)

    def reduction(self, selected: dict[str, Tensor]) -> GSNRReduction | str:
        """GSNR's summaries and the noise scale's parts of the captured samples' gradients
        (:class:`~diagnostics.gradients.ratio_reduction.GSNRReduction`), or a sentence saying why there are
        none: each parameter's per-sample gradients are reduced as in :meth:`moments`, but to their ratios,
        without the model-wide moments. The ratios are kept in float32 unless a parameter is float64
        (:func:`~diagnostics.gradients.ratio_reduction.ratio_dtype`). Cost: that of :meth:`moments`, less
        writing two float64 vectors of the model's size and reading them back.
        """
        n = self._samples()
        if isinstance(n, str):
            return n
        first = next(iter(selected.values()))
        out = GSNRReduction([(k, p.shape) for k, p in selected.items()], n, first.device,
                            dtype=ratio_dtype(p.dtype for p in selected.values()))
        problem = self._each_parameter(selected, n, lambda name, g: out.add(name, g.to(first.device)), out.zero)
        return out if problem is None else problem

    def _each_parameter(self, selected: dict[str, Tensor], n: int, reduce: Callable[[str, Tensor], None],
                        zero: Callable[[str], None]) -> str | None:
        """Form each selected parameter's ``[n, *shape]`` per-sample gradients in a temporary of its own and
        hand it to ``reduce`` once the last layer call reaching it is added; ``zero`` each parameter no call
        reached. Returns the sentence saying why the capture cannot be used, or None."""
        remaining = Counter(name for c in self.calls for name in set(c.attrs.values()))
        temps: dict[str, Tensor] = {}
        bases: dict[str, Tensor] = {}
        # The buffers of parameters already reduced, taken again by later ones: a fresh buffer of a large
        # parameter costs the kernel's mapping of every page (on the CPU), and a transformer's blocks repeat
        # the same shapes.
        spare: list[Tensor] = []
        written: set[str] = set()
        with torch.no_grad():
            for c in self.calls:
                for name in c.attrs.values():
                    if name not in temps:
                        p = selected[name]
                        bases[name] = _take(spare, n * p.numel(), p.dtype, p.device)
                        temps[name] = bases[name][: n * p.numel()].view(n, *p.shape)
                if self._add_call(c, temps, written, n) is not None:
                    return self.problem
                for name in set(c.attrs.values()):
                    remaining[name] -= 1
                    if remaining[name] == 0:
                        reduce(name, temps.pop(name))
                        spare.append(bases.pop(name))
            for name in selected.keys() - remaining.keys():
                zero(name)
        return None


def _take(spare: list[Tensor], numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least ``numel`` elements: the smallest of ``spare`` that fits (removed from it),
    else a new one, after ``spare`` is emptied (so that the buffers kept stay within what one layer call
    needs rather than growing with every larger parameter)."""
    fits = [i for i, b in enumerate(spare) if b.numel() >= numel and b.dtype == dtype and b.device == device]
    if fits:
        return spare.pop(min(fits, key=lambda i: spare[i].numel()))
    spare.clear()
    return torch.empty(numel, dtype=dtype, device=device)
