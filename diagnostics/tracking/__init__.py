"""The edge to the training loop: the Monitor and the StepContext its diagnostics receive.

``monitor`` (the orchestrator) delegates to ``runner`` (phases, isolation, failures), ``commit`` (store
transactions and mirrors), ``actions`` (what warning events do), ``state_codec`` (diagnostics' state saved
for resuming), ``probes`` (probe data and input checks) and ``identity`` (model fingerprint and summary);
``mirrors`` sends scalars to loggers and ``integrations`` adapts frameworks.
"""

from diagnostics.metrics.context import StepContext
from diagnostics.tracking.monitor import Monitor

__all__ = ["Monitor", "StepContext"]
