"""The loss contract: how a user's ``loss_fn(model, batch)`` becomes a pure function of parameters.

Users give ``loss_fn(model, batch) -> scalar Tensor`` with *mean* reduction over the batch. Estimators
turn it into ``f(params: dict[str, Tensor]) -> scalar`` through :func:`torch.func.functional_call`, keyed by
``model.named_parameters()`` names. Parameters that are not selected and all buffers enter as constants:
non-selected parameters detached, buffers cloned, so that a forward pass that updates buffers in place
(BatchNorm in train mode) never touches the model's own running statistics.

Loss objects (:class:`ClassificationLoss`, :class:`RegressionLoss`, :class:`LanguageModelLoss` and
:data:`default_loss`) also expose ``forward(model, batch) -> outputs`` and
``criterion(outputs, batch) -> scalar``, the split the generalised Gauss-Newton operator needs.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diagnostics.errors import ConfigError, DataError, LossError

__all__ = [
    "ClassificationLoss",
    "RegressionLoss",
    "LanguageModelLoss",
    "DefaultLoss",
    "default_loss",
    "split_batch",
    "select_params",
    "functional_loss",
    "functional_call_fn",
    "check_loss",
]

#: Keys recognised for the inputs and the targets when a batch is a dict (first match wins).
INPUT_KEYS = ("input", "inputs", "x", "input_ids", "features", "data")
TARGET_KEYS = ("target", "targets", "y", "labels", "label")


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a batch.

    A batch is a pair ``(inputs, targets)`` (tuple or list) or a dict with an input key (``input``,
    ``inputs``, ``x``, ``input_ids``, ...) and a target key (``target``, ``targets``, ``y``, ``labels``).

    Raises:
        DataError: the batch has neither form.
    """
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        targets = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        if inputs is None or targets is None:
            raise DataError(
                f"batch dict has keys {sorted(batch)}; the default loss needs one input key of {INPUT_KEYS} "
                f"and one target key of {TARGET_KEYS} (or pass your own loss_fn)"
            )
        return inputs, targets
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(
        f"batch of type {type(batch).__name__} is not (inputs, targets) nor a dict with 'input'/'target' "
        "keys; pass your own loss_fn(model, batch)"
    )


# --------------------------------------------------------------------------------------------------
# Loss objects
# --------------------------------------------------------------------------------------------------


class _SupervisedLoss:
    """A loss split as ``criterion(forward(model, batch), batch)``; calling it returns the mean loss."""

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """Return the model's outputs on the batch's inputs (one forward pass)."""
        inputs, _ = split_batch(batch)
        return model(inputs)

    def criterion(self, outputs: Tensor, batch: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.criterion(self.forward(model, batch), batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ClassificationLoss(_SupervisedLoss):
    """Mean cross-entropy of logits ``[B, C]`` (or ``[B, ..., C]``) against integer targets ``[B]`` (``[B, ...]``)."""

    def criterion(self, outputs: Tensor, batch: Any) -> Tensor:
        _, targets = split_batch(batch)
        targets = targets.to(outputs.device)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="mean")


class LanguageModelLoss(ClassificationLoss):
    """Mean next-token cross-entropy: logits ``[B, T, V]`` flattened against targets ``[B, T]``.

    The targets are the already shifted next tokens; the mean runs over all ``B * T`` positions.
    """


class RegressionLoss(_SupervisedLoss):
    """Mean squared error over all output elements (``F.mse_loss`` with mean reduction)."""

    def criterion(self, outputs: Tensor, batch: Any) -> Tensor:
        _, targets = split_batch(batch)
        targets = targets.to(device=outputs.device, dtype=outputs.dtype)
        # Written out rather than F.mse_loss: its forward-over-reverse rule fails on a zero tangent of the
        # targets (torch 2.x "ZeroTensors are immutable"), which would break forward-over-reverse HVPs.
        return (outputs - targets.reshape(outputs.shape)).square().mean()


class DefaultLoss(_SupervisedLoss):
    """The loss used when none is given, chosen by the targets.

    Integer targets: cross-entropy (logits ``[B, T, V]`` are flattened against ``[B, T]`` targets).
    Floating targets with as many elements as the outputs: mean squared error. Always mean reduction.
    """

    def criterion(self, outputs: Tensor, batch: Any) -> Tensor:
        _, targets = split_batch(batch)
        if not isinstance(targets, Tensor):
            raise DataError(
                f"targets of type {type(targets).__name__} are not a Tensor; pass your own loss_fn"
            )
        if not targets.is_floating_point() and not targets.is_complex():
            return ClassificationLoss.criterion(self, outputs, batch)
        if targets.numel() == outputs.numel():
            return RegressionLoss.criterion(self, outputs, batch)
        raise DataError(
            f"floating targets of shape {tuple(targets.shape)} do not match outputs of shape "
            f"{tuple(outputs.shape)}; use integer class targets or pass your own loss_fn"
        )


#: ``default_loss(model, batch)``: cross-entropy for integer targets, MSE for float targets (mean reduction).
default_loss = DefaultLoss()


# --------------------------------------------------------------------------------------------------
# Parameter selection
# --------------------------------------------------------------------------------------------------


def matches_name(name: str, pattern: str) -> bool:
    # A module prefix ("blocks.0") selects all its parameters, like a glob ending in ".*".
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def select_params(model: nn.Module, params: None | str | Iterable[str | Tensor] = None) -> dict[str, Tensor]:
    """Return the selected trainable parameters of ``model`` in ``named_parameters()`` order.

    Args:
        model: the model.
        params: ``None`` (all parameters with ``requires_grad``), or names, module prefixes or fnmatch
            globs (``"blocks.0.*"``, ``"*.weight"``), or the parameter tensors themselves.

    Returns:
        ``{name: parameter}`` (the model's own tensors; callers detach before use).

    Raises:
        ConfigError: a pattern matches no trainable parameter, or the model has no trainable parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); "
            "unfreeze the parameters to analyse"
        )
    if params is None:
        return dict(named)
    if isinstance(params, (str, Tensor)):
        params = [params]
    chosen: set[str] = set()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for pattern in params:
        if isinstance(pattern, Tensor):
            hit = {n for n, p in named if p is pattern}
            if not hit:
                raise ConfigError(
                    f"a tensor of shape {tuple(pattern.shape)} in params is not a trainable parameter of the model"
                )
        elif isinstance(pattern, str):
            hit = {n for n, _ in named if matches_name(n, pattern)}
            if not hit:
                if any(matches_name(n, pattern) for n in frozen):
                    raise ConfigError(
                        f"params pattern {pattern!r} matches only parameters with requires_grad=False"
                    )
                some = ", ".join(n for n, _ in named[:8])
                raise ConfigError(f"params pattern {pattern!r} matches no parameter; names look like: {some}")
        else:
            raise ConfigError(
                f"params entries must be names, globs or parameters, not {type(pattern).__name__}"
            )
        chosen |= hit
    return {n: p for n, p in named if n in chosen}


# --------------------------------------------------------------------------------------------------
# Functional form
# --------------------------------------------------------------------------------------------------


class _Call(nn.Module):
    """Holds the model as its only child so that ``functional_call`` can swap the tensors ``fn`` sees."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.m = model
        self._fn = fn

    def forward(self, *args: Any) -> Any:
        return self._fn(self.m, *args)


def _constants(model: nn.Module, selected: Sequence[str], state: Mapping[str, Tensor] | None = None
               ) -> dict[str, Tensor]:
    sel = set(selected)
    if state is None:
        const = {n: p.detach() for n, p in model.named_parameters() if n not in sel}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
    else:
        const = {n: state[n] for n, _ in model.named_parameters() if n not in sel}
        buffers = {n: state[n] for n, _ in model.named_buffers()}
    # Buffers are cloned: a train-mode forward updates them in place (BatchNorm running statistics).
    const.update({n: b.clone() for n, b in buffers.items()})
    return const


def functional_call_fn(
    model: nn.Module, fn: Callable[..., Any], selected: Sequence[str],
    state: Mapping[str, Tensor] | None = None,
) -> Callable[..., Any]:
    """Return ``g(params, *args) = fn(model_with(params), *args)`` as a pure function of ``params``.

    ``params`` is a dict keyed by the names in ``selected``; every other parameter enters detached and
    every buffer as a private copy, taken from the model or, when given, from ``state`` (a snapshot
    keyed by parameter and buffer names). Works under ``torch.func`` transforms (grad, jvp, vmap,
    linearize).
    """
    wrapper = _Call(model, fn)
    const = {"m." + k: v for k, v in _constants(model, selected, state).items()}

    def call(params: Mapping[str, Tensor], *args: Any) -> Any:
        full = dict(const)
        full.update({"m." + k: v for k, v in params.items()})
        return torch.func.functional_call(wrapper, full, args, strict=False, tie_weights=True)

    return call


def functional_loss(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    batch: Any,
    params: None | str | Iterable[str | Tensor] = None,
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """Return ``f(params_dict) -> loss_fn(model_with(params), batch)``, a pure function of parameters.

    Keys are ``named_parameters()`` names of the selected parameters (see :func:`select_params`);
    other parameters and buffers are constants. Cost of one call: one forward pass.
    """
    fn = default_loss if loss_fn is None else loss_fn
    names = list(select_params(model, params))
    call = functional_call_fn(model, fn, names)
    return lambda p: call(p, batch)


def check_loss(value: Any, batch_index: int) -> None:
    """Raise :class:`LossError` unless ``value`` is a finite scalar tensor.

    Only the shape is inspected for tensors being traced by ``torch.func`` transforms; finiteness is
    checked on concrete tensors.

    Raises:
        LossError: naming the batch index and the fix.
    """
    if not isinstance(value, Tensor):
        raise LossError(
            f"loss_fn returned {type(value).__name__} for batch {batch_index}; it must return a scalar Tensor"
        )
    if value.ndim != 0:
        raise LossError(
            f"loss_fn returned shape {tuple(value.shape)} for batch {batch_index}; "
            "it must return a scalar (use .mean())"
        )
    if not value.is_floating_point():
        raise LossError(
            f"loss_fn returned dtype {value.dtype} for batch {batch_index}; it must be a floating scalar"
        )
    if _is_plain(value):
        x = float(value.detach())
        if not math.isfinite(x):
            raise LossError(
                f"loss_fn returned {x} for batch {batch_index}; the loss must be finite "
                "(check the data and the model's parameters for NaN/inf)"
            )


def _is_plain(t: Tensor) -> bool:
    # Tensors wrapped by torch.func transforms cannot be read with float(); skip the value check there.
    try:
        return not torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return True
