"""Hugging Face ``TrainerCallback``: the Monitor at ``on_pre_optimizer_step``, scalars mirrored into ``logs``.

The Trainer calls ``on_pre_optimizer_step`` after its gradient clipping, so with ``max_grad_norm > 0`` the
Monitor sees clipped gradients (recorded as meta ``gradients_seen = "clipped"``). Callbacks are not given
the batch or the loss, so a forward pre-hook and a forward hook on the model (registered from
``on_train_begin`` to ``on_train_end``) keep the last training batch's inputs and the mean loss of the
step's micro-batches. A "stop" action sets ``control.should_training_stop``: the current optimizer step
completes, then training ends.

Usage::

    from diagnostics.tracking.integrations.huggingface import DiagnosticsCallback
    trainer = Trainer(model, args, train_dataset=ds)
    DiagnosticsCallback(run="runs/exp").attach(trainer)   # first in line, so report_to loggers see its scalars
    trainer.train()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diagnostics.errors import StopTraining
from diagnostics.tracking.integrations import require
from diagnostics.tracking.mirrors import CallbackMirror
from diagnostics.tracking.monitor import Monitor

transformers = require("transformers", install="transformers")

__all__ = ["DiagnosticsCallback", "hf_loss"]


def hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean loss of a model that returns its loss, as the Trainer uses it: ``model(**batch).loss`` (or ``[0]``)."""
    out = model(**batch) if isinstance(batch, Mapping) else model(*batch)
    if isinstance(out, Mapping) or hasattr(out, "loss"):
        return out["loss"] if isinstance(out, Mapping) else out.loss
    return out[0]


class DiagnosticsCallback(transformers.TrainerCallback):
    """Runs a :class:`~diagnostics.Monitor` inside ``Trainer.train`` (rank 0 writes).

    Args:
        run, diagnostics, **monitor_kwargs: as for :class:`~diagnostics.Monitor`; the optimizer is the
            Trainer's; ``loss_fn`` defaults to :func:`hf_loss` (batches are the model's keyword inputs).
        log_scalars: copy the latest key-"all" scalars (``diagnostics/<metric>``) into the Trainer's
            ``logs`` and ``state.log_history`` at each log.
    """

    def __init__(self, run: Any = None, diagnostics: Any = "cheap", loss_fn: Any = None, *,
                 log_scalars: bool = True, **monitor_kwargs: Any) -> None:
        self._args = dict(run=run, diagnostics=diagnostics, loss_fn=loss_fn or hf_loss, **monitor_kwargs)
        self.log_scalars = log_scalars
        self.monitor: Monitor | None = None
        self.stop_reason: StopTraining | None = None
        self._latest: dict[str, float] = {}
        self._batch: Any = None
        self._losses: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._busy = False  # the Monitor's own forward passes are not training batches

    def attach(self, trainer: Any) -> DiagnosticsCallback:
        """Insert this callback first, so loggers from ``report_to`` see the mirrored scalars; returns self."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._busy and module.training and torch.is_grad_enabled():
            kw = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
            self._batch = kw if kw else args

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if not self._busy and module.training and torch.is_grad_enabled():
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
            if torch.is_tensor(loss):
                self._losses.append(loss.detach())

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if self.monitor is None:
            mirrors = list(self._args.pop("mirrors", None) or [])
            if self.log_scalars:
                keep = lambda step, s: self._latest.update({k: v for k, v in s.items() if k.count("/") == 1})  # noqa: E731
                mirrors.append(CallbackMirror(keep))
            # accelerate wraps the optimizer; the inner one's step post-hooks fire on every update.
            inner = getattr(optimizer, "optimizer", optimizer)
            self.monitor = Monitor(model, optimizer=inner, mirrors=mirrors, **self._args)
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]
        clipped = bool(args.max_grad_norm and args.max_grad_norm > 0)
        seen = "clipped" if clipped else "scaled" if getattr(args, "fp16", False) else "unclipped"
        self.monitor.set_meta("gradients_seen", seen)
        self.monitor.set_meta("integration", {"framework": "transformers", "version": transformers.__version__,
                                              "hook": "on_pre_optimizer_step", "max_grad_norm": args.max_grad_norm,
                                              "gradient_accumulation_steps": args.gradient_accumulation_steps})

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = torch.stack(self._losses).mean() if self._losses else None
        self._losses = []
        self._busy = True
        try:
            self.monitor.step(state.global_step, self._batch, loss)
        except StopTraining as stop:
            self.stop_reason = stop
            control.should_training_stop = True
        finally:
            self._busy = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.log_scalars and logs is not None and self._latest and "loss" in logs:
            logs.update(self._latest)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._latest)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.monitor is not None:
            self.monitor.close()
