"""The edge to the training loop: Monitor, StepContext, scoped hooks and state isolation."""

from diagnostics.metrics.context import StepContext
from diagnostics.tracking.monitor import Monitor

__all__ = ["Monitor", "StepContext"]
