"""The report's panels: the ordered catalogue of sections, one per family of recorded metrics.

:mod:`.base` holds the :class:`~.base.Panel` class and the drawing helpers; :mod:`.training`, :mod:`.signals`,
:mod:`.curvature` and :mod:`.layers` define the panels, importing only :mod:`.base` and the report's
lower modules. Every panel here shows metrics that the library's own diagnostics record; panels for
metrics written by other tools (the explosion benchmark's baselines, for one) are passed to
:func:`~diagnostics.reports.build_report` as ``extra_panels`` by whoever records them.
"""

from __future__ import annotations

from . import curvature, layers, signals, training
from .base import Panel

__all__ = ["Panel", "registry"]


def registry() -> list[Panel]:
    """Return every panel of the report in report order (a new list each call)."""
    return [
        training.LOSS,
        curvature.SHARPNESS,
        curvature.EIGENVALUES,
        curvature.DENSITY,
        curvature.TRACE,
        curvature.SUBSPACE,
        layers.SPECTRAL_ALIGNMENT,
        signals.SIGNALS,
        layers.EFFECTIVE_RANK,
        layers.GSNR,
        training.NORMS,
        training.COST,
    ]
