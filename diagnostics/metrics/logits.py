"""Output-logit statistics: the largest logit and the log-partition function log Z over tokens.

For a model output z (the last dimension holds the classes or the vocabulary; every other position is a
token or a sample), log Z_t = logsumexp_c z_tc. The ``output_logits`` diagnostic records the largest
entry max_tc z_tc and the mean and maximum of log Z_t over tokens. Growing log Z is the drift that the
z-loss of PaLM (Chowdhery et al. 2022) penalises and that Wortsman et al. (2023) tie to output-logit
divergence. Definitions: docs/metrics.md, "Attention and output logits".

The output is read with a forward hook on the model itself: on the user's training forward when the
Monitor holds :meth:`OutputLogits.observe_training_forward` open for the step (no extra forward), else
in one no-grad, eval-mode forward over the first samples of the step's batch.

    >>> import torch
    >>> st = LogitStats.of(torch.zeros(2, 3, 4))
    >>> round(st.logit_max, 6), round(st.log_z_mean(), 6), round(st.log_z_max, 6)
    (0.0, 1.386294, 1.386294)
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from diagnostics._hooks import HookClock, first_tensor, training_forward
from diagnostics._state import eval_mode
from diagnostics.errors import ConfigError
from diagnostics.metrics.attention import first_samples
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = ["LogitStats", "OutputLogits", "output_tensor"]

#: Rows (tokens) of the logits reduced at once: bounds the temporaries to a few rows x classes.
CHUNK_ROWS = 4096


def output_tensor(out: Any) -> torch.Tensor | None:
    """The logits in a model's output: its ``logits`` attribute or key (Hugging Face), else the first
    floating tensor."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if torch.is_tensor(logits) and logits.is_floating_point():
        return logits
    return first_tensor(out)


@dataclass
class LogitStats:
    """Running statistics of output logits: ``logit_max``, ``log_z_sum``, ``log_z_max``, ``tokens``."""

    logit_max: float = -math.inf
    log_z_sum: float = 0.0
    log_z_max: float = -math.inf
    tokens: int = 0

    @classmethod
    def of(cls, logits: torch.Tensor, max_rows: int | None = None) -> LogitStats:
        """Statistics of ``logits`` [..., C] over its first ``max_rows`` rows (all when None).

        Cost: one read of the logits, in blocks of :data:`CHUNK_ROWS` rows (float32 or float64).
        """
        st = cls()
        st.add(logits, max_rows)
        return st

    def add(self, logits: torch.Tensor, max_rows: int | None = None) -> None:
        """Add the rows of ``logits`` [..., C] (at most ``max_rows`` of them)."""
        with torch.no_grad():
            z = logits.detach()
            z = z.reshape(-1, z.shape[-1]) if z.dim() else z.reshape(1, 1)
            if max_rows is not None:
                z = z[:max(0, max_rows)]
            dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
            tops, sums, maxes = [], [], []
            for r0 in range(0, z.shape[0], CHUNK_ROWS):
                block = z[r0:r0 + CHUNK_ROWS].to(dtype)
                lz = torch.logsumexp(block, -1)
                tops.append(block.amax())
                sums.append(lz.double().sum())
                maxes.append(lz.amax())
            if not tops:
                return
            self.logit_max = max(self.logit_max, float(torch.stack(tops).amax()))
            self.log_z_sum += float(torch.stack(sums).sum())
            self.log_z_max = max(self.log_z_max, float(torch.stack(maxes).amax()))
            self.tokens += int(z.shape[0])

    def log_z_mean(self) -> float:
        return self.log_z_sum / self.tokens if self.tokens else math.nan


@register
class OutputLogits(Diagnostic):
    """Largest output logit and log Z over tokens (``output_logit_max``, ``output_log_z_mean``,
    ``output_log_z_max``; key "all").

    Args:
        every, start: schedule (default every step).
        max_tokens: tokens measured per step (rows of the output: tokens, or samples for a classifier).

    Cost: none but the reduction when the Monitor observes the training forward (one read of at most
    ``max_tokens`` rows of the logits); otherwise one no-grad forward over about ``max_tokens`` tokens.
    Memory: :data:`CHUNK_ROWS` rows of the logits at a time.
    """

    name = "output_logits"
    requires = frozenset({"activations"})
    preset = "standard"
    default_every = 1
    allow_nonfinite = True  # an overflowing logit is the signal
    metrics: ClassVar[tuple[str, ...]] = ("output_logit_max", "output_log_z_mean", "output_log_z_max")

    def __init__(self, every: int | None = None, start: int = 0, *, max_tokens: int = 4096) -> None:
        super().__init__(every, start)
        if int(max_tokens) < 1:
            raise ConfigError(f"output_logits: max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self._observed: tuple[weakref.ref[nn.Module], LogitStats] | None = None
        self.last_source: str | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_tokens": self.max_tokens}

    @contextlib.contextmanager
    def _hook(self, model: nn.Module, st: LogitStats, clock: HookClock | None = None,
              training_only: bool = False) -> Iterator[None]:
        """A forward hook on ``model`` adding its logits to ``st`` (with ``training_only``, only those of
        training forwards: :func:`~diagnostics._hooks.training_forward`), removed when the block ends."""
        def hook(m: nn.Module, _args: Any, out: Any) -> None:
            if training_only and not training_forward(m):
                return
            z = output_tensor(out)
            room = self.max_tokens - st.tokens
            if z is not None and room > 0:
                st.add(z, room)

        handle = model.register_forward_hook(hook if clock is None else clock.wrap(hook))
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def observe_training_forward(self, model: nn.Module) -> Iterator[None]:
        """Read the logits of the user's next training forward (the Monitor holds this open between steps).

        The hook reads detached outputs under no_grad, so the training graph is untouched. When no forward
        ran before the next ``compute``, that step falls back to its own forward. A validation forward in
        between (under ``torch.no_grad``, ``torch.inference_mode`` or ``model.eval()``) is not read: only a
        training forward is.
        """
        st = LogitStats()
        with self._hook(model, st, self.hook_clock, training_only=True):
            yield
        self._observed = (weakref.ref(model), st)

    def compute(self, ctx: StepContext) -> Output:
        observed, self._observed = self._observed, None
        if observed is not None and observed[0]() is ctx.model and observed[1].tokens:
            st, self.last_source = observed[1], "training_forward"
        else:
            st, self.last_source = LogitStats(), "extra_forward"
            with torch.no_grad(), eval_mode(ctx.model), self._hook(ctx.model, st):
                ctx.loss_fn(ctx.model, first_samples(ctx.batch, self.max_tokens))
        if not st.tokens:
            return Output(status="failed", reason="the model's forward returned no floating-point output to read")
        records = [
            Record("output_logit_max", st.logit_max),
            Record("output_log_z_mean", st.log_z_mean()),
            Record("output_log_z_max", st.log_z_max),
        ]
        return Output(records=records, settings={"source": self.last_source, "tokens": st.tokens})
