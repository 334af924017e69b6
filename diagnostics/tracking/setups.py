"""Training setups the Monitor adapts to: mixed precision, ``torch.compile`` and activation checkpointing.

* **Autocast.** A ``monitor.step`` called inside ``torch.autocast`` (bf16 or fp16) still computes every
  diagnostic in the parameters' dtype: :func:`full_precision` disables autocast for the step, so extra
  forward passes, per-sample gradients and curvature products are not silently run in half precision
  (and mixed-dtype products do not fail).
* **torch.compile.** ``torch.compile(model)`` returns a wrapper whose ``_orig_mod`` holds the parameters;
  the Monitor unwraps it (:func:`diagnostics._distributed.unwrap_model`) so the diagnostics' own passes
  run eagerly. Forward hooks added to submodules after compilation are not seen by the compiled graph
  (and one traced in during a recompilation would keep running after its removal), so the Monitor does
  not observe a compiled model's training forward: diagnostics that would read it run their own forward.
  ``model.compile()`` (in place) cannot be unwrapped; :func:`compile_mode` tells the two apart.
* **Activation checkpointing.** ``torch.utils.checkpoint`` inside the forward cannot be traversed by
  torch.func transforms (per-sample gradients; forward-over-reverse curvature products); the
  diagnostics' passes run in eval mode, so checkpointing only while ``self.training`` (as Hugging Face's
  ``gradient_checkpointing_enable()`` does) avoids the problem; the hook that transformers adds with it
  (``enable_input_require_grads``) is removed by ``model.disable_input_require_grads()``.
  :func:`explain_failure` turns torch's errors for these cases into a reason that says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from diagnostics import _distributed as _dist

__all__ = ["compile_mode", "explain_failure", "full_precision"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable any active ``torch.autocast`` (CPU and CUDA) inside the block; restore it after.

    Cost: none when autocast is off.
    """
    active = [d for d in _AUTOCAST_DEVICES if _autocast_enabled(d)]
    if not active:  # the usual case, at every monitored step: no ExitStack
        yield
        return
    with contextlib.ExitStack() as stack:
        for device in active:
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def _autocast_enabled(device: str) -> bool:
    # Asked directly rather than after torch.cuda.is_available(), which reads the environment at every call.
    try:
        return torch.is_autocast_enabled(device)
    except RuntimeError:  # a build that does not know the device type
        return False


def compile_mode(model: nn.Module) -> str | None:
    """``"wrapper"`` for ``torch.compile(model)``, ``"in_place"`` for ``model.compile()``, else None.

    Examples:
        >>> compile_mode(nn.Linear(2, 2)) is None
        True
    """
    compiled = _dist._compiled_module_type()
    if compiled is not None and isinstance(model, compiled):
        return "wrapper"
    inner = _dist.unwrap_model(model)
    if getattr(inner, "_compiled_call_impl", None) is not None:
        return "in_place"
    return None


_CHECKPOINT_HINT = (
    "activation checkpointing (torch.utils.checkpoint) ran inside a diagnostic's pass, and torch.func "
    "transforms cannot go through it: checkpoint only while model.training (the diagnostics' passes run "
    "in eval mode; Hugging Face's gradient_checkpointing_enable() already does this)"
)


_REQUIRES_GRAD_HINT = (
    "the model's forward (or a hook on it) calls requires_grad_(), which torch.func transforms refuse; "
    "transformers' gradient_checkpointing_enable() installs such a hook on the input embeddings: call "
    "model.disable_input_require_grads() after it when the embeddings are trained (it is needed only for "
    "frozen embeddings, e.g. adapters)"
)


def _raised_in_checkpoint(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("torch/utils/checkpoint.py"):
            return True
        tb = tb.tb_next
    return False


def explain_failure(exc: BaseException) -> str | None:
    """A reason that names the fix when a diagnostic failed because of the training setup, else None.

    Recognised: torch's errors for ``torch.utils.checkpoint`` met by torch.func transforms or by
    ``torch.autograd.grad`` (reentrant checkpoints), and ``requires_grad_()`` called inside a transform
    (transformers' input-embedding hook that comes with activation checkpointing).

    Examples:
        >>> explain_failure(ValueError("bad batch")) is None
        True
    """
    text = f"{type(exc).__name__}: {exc}"
    if "requires_grad_()" in text and "functorch transform" in text:
        return f"{_REQUIRES_GRAD_HINT} ({text})"
    if not _raised_in_checkpoint(exc):
        return None
    if "use_reentrant=True" in text or "setup_context" in text:
        return f"{_CHECKPOINT_HINT}; use_reentrant=False also lets curvature products through ({text})"
    return f"{_CHECKPOINT_HINT} ({text})"
