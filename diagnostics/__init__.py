"""training-diagnostics: the geometry of a PyTorch training run as time series.

This module is the table of contents of the public API. Names are imported lazily (PEP 562) so that the
torch-free layers, ``diagnostics.store`` and ``diagnostics.reports``, can be used without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # --- Linear algebra on operators (diagnostics.linalg) ---
    "LinearOperator": "diagnostics.linalg",
    "lanczos": "diagnostics.linalg",
    "EigenResult": "diagnostics.linalg",
    "spectral_density": "diagnostics.linalg",
    "SpectralDensity": "diagnostics.linalg",
    "hutchinson_trace": "diagnostics.linalg",
    "hutchpp_trace": "diagnostics.linalg",
    "TraceEstimate": "diagnostics.linalg",
    "subspace_overlap": "diagnostics.linalg",
    "principal_angles": "diagnostics.linalg",
    "effective_rank": "diagnostics.linalg",
    "stable_rank": "diagnostics.linalg",
    "DenseOperator": "diagnostics.linalg",
    "ScaledOperator": "diagnostics.linalg",
    "as_operator": "diagnostics.linalg",
    "subspace_fraction": "diagnostics.linalg",
    "nuclear_norm": "diagnostics.linalg",
    "alpha_req": "diagnostics.linalg",
    "top_singular_vector": "diagnostics.linalg",
    # --- Curvature operators of a model's loss (diagnostics.curvature) ---
    "HessianOperator": "diagnostics.curvature",
    "GGNOperator": "diagnostics.curvature",
    # --- Gradient statistics (diagnostics.gradients) ---
    "per_sample_gradients": "diagnostics.gradients",
    "gsnr": "diagnostics.gradients",
    "gsnr_summary": "diagnostics.gradients",
    "gradient_noise_scale": "diagnostics.gradients",
    "microbatch_gsnr": "diagnostics.gradients",
    # --- The loss contract (diagnostics.loss) ---
    "default_loss": "diagnostics.loss",
    # --- In-loop monitoring (diagnostics.tracking, diagnostics.metrics) ---
    "Monitor": "diagnostics.tracking",
    "StepContext": "diagnostics.metrics.context",
    "get_diagnostic": "diagnostics.metrics",
    "resolve_diagnostics": "diagnostics.metrics",
    "Diagnostic": "diagnostics.metrics",
    "available_diagnostics": "diagnostics.metrics",
    # --- Loss-explosion early warning (diagnostics.metrics) ---
    "SpectralAlignment": "diagnostics.metrics.spectral_alignment",
    "ExplosionDetector": "diagnostics.metrics.explosion",
    "detect_explosions": "diagnostics.explosion",
    # --- The run store (diagnostics.store) ---
    "RunWriter": "diagnostics.store",
    "open_run": "diagnostics.store",
    "open_runs": "diagnostics.store",
    "combine_runs": "diagnostics.store",
    # --- Errors (diagnostics.errors) ---
    "DiagnosticsError": "diagnostics.errors",
    "StopTraining": "diagnostics.errors",
    "MisuseError": "diagnostics.errors",
    "MisuseWarning": "diagnostics.errors",
}

__all__ = [
    # Linear algebra on operators
    "LinearOperator",
    "lanczos",
    "EigenResult",
    "spectral_density",
    "SpectralDensity",
    "hutchinson_trace",
    "hutchpp_trace",
    "TraceEstimate",
    "subspace_overlap",
    "principal_angles",
    "effective_rank",
    "stable_rank",
    "DenseOperator",
    "ScaledOperator",
    "as_operator",
    "subspace_fraction",
    "nuclear_norm",
    "alpha_req",
    "top_singular_vector",
    # Curvature operators of a model's loss
    "HessianOperator",
    "GGNOperator",
    # Gradient statistics
    "per_sample_gradients",
    "gsnr",
    "gsnr_summary",
    "gradient_noise_scale",
    "microbatch_gsnr",
    # The loss contract
    "default_loss",
    # In-loop monitoring
    "Monitor",
    "StepContext",
    "get_diagnostic",
    "resolve_diagnostics",
    "Diagnostic",
    "available_diagnostics",
    # Loss-explosion early warning
    "SpectralAlignment",
    "ExplosionDetector",
    "detect_explosions",
    # The run store
    "RunWriter",
    "open_run",
    "open_runs",
    "combine_runs",
    # Errors
    "DiagnosticsError",
    "StopTraining",
    "MisuseError",
    "MisuseWarning",
]


#: Public names that differ from the name inside their module.
_ALIASES: dict[str, str] = {"detect_explosions": "detect"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
