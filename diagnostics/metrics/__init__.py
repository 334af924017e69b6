"""Diagnostics: the Diagnostic contract, the registry and its presets.

Each family lives in its own module (``basics``, ``gradient_stats``, ``rank``, ...) and registers its
classes with :func:`register`; the registry imports every module of this package on first use.
"""

from diagnostics.metrics.base import PRESETS, REQUIREMENTS, Diagnostic, Output
from diagnostics.metrics.registry import (
    available_diagnostics,
    get_diagnostic,
    preset_names,
    register,
    registry,
    resolve_diagnostics,
    variants,
)

__all__ = [
    "Diagnostic",
    "Output",
    "REQUIREMENTS",
    "PRESETS",
    "register",
    "registry",
    "available_diagnostics",
    "get_diagnostic",
    "preset_names",
    "resolve_diagnostics",
    "variants",
]
