"""PyTorch Lightning callback: the Monitor at ``on_before_optimizer_step``.

That hook runs after the closure's backward, after the precision plugin has unscaled the gradients
(16-mixed) and before Lightning clips them, so the Monitor reads the gradients the optimizer is about to
use, unscaled and unclipped. Validation never reaches it (and its inference mode never wraps it). A
"stop" action becomes ``trainer.should_stop = True``: the current optimizer step completes, then the fit
loop ends as after early stopping.

Usage::

    from diagnostics.tracking.integrations.lightning import DiagnosticsCallback
    trainer = L.Trainer(callbacks=[DiagnosticsCallback(run="runs/exp", diagnostics="standard")])
"""

from __future__ import annotations

from typing import Any

import torch

from diagnostics.errors import StopTraining
from diagnostics.tracking.integrations import require
from diagnostics.tracking.monitor import Monitor

pl = require("lightning.pytorch", "pytorch_lightning", install="lightning")

__all__ = ["DiagnosticsCallback"]


class DiagnosticsCallback(pl.Callback):
    """Runs a :class:`~diagnostics.Monitor` inside ``Trainer.fit`` (one per rank; rank 0 writes).

    Args:
        run, diagnostics, loss_fn, **monitor_kwargs: as for :class:`~diagnostics.Monitor`; the model is the
            LightningModule (``loss_fn(module, batch)``; the default loss calls ``module(inputs)``) and the
            optimizer is the trainer's first.
        monitor: use this Monitor instead of creating one (it is then not closed by the callback).

    Attributes:
        monitor: the Monitor (after ``on_fit_start``); stop_reason: the StopTraining that stopped the fit.
    """

    def __init__(self, run: Any = None, diagnostics: Any = "cheap", loss_fn: Any = None, *,
                 monitor: Monitor | None = None, **monitor_kwargs: Any) -> None:
        self.monitor = monitor
        self._owned = monitor is None
        self._args = dict(run=run, diagnostics=diagnostics, loss_fn=loss_fn, **monitor_kwargs)
        self._batch: Any = None
        self._loss: torch.Tensor | None = None
        self.stop_reason: StopTraining | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            args = dict(self._args)
            args.setdefault("optimizer", trainer.optimizers[0] if trainer.optimizers else None)
            self.monitor = Monitor(pl_module, **args)
        self.monitor.set_meta("gradients_seen", "unscaled, unclipped (Lightning on_before_optimizer_step)")
        self.monitor.set_meta("integration", {"framework": "lightning", "version": pl.__version__,
                                              "accumulate_grad_batches": trainer.accumulate_grad_batches})

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        # With accumulate_grad_batches > 1 each backward is one micro-batch (gsnr_microbatch reads them; the
        # AMP scale is the same for every micro-batch of a step, and the ratio does not depend on it).
        if self.monitor is not None and trainer.accumulate_grad_batches > 1 and not torch.is_inference_mode_enabled():
            self.monitor.microbatch()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor is None or torch.is_inference_mode_enabled():
            return
        try:
            self.monitor.step(trainer.global_step, self._batch, self._loss)
        except StopTraining as stop:
            self.stop_reason = stop
            trainer.should_stop = True

    def _close(self) -> None:
        if self._owned and self.monitor is not None:
            self.monitor.close()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()
