"""Thin adapters that call :meth:`diagnostics.Monitor.step` from training frameworks.

``diagnostics.tracking.integrations.lightning`` (PyTorch Lightning callback) and
``diagnostics.tracking.integrations.huggingface`` (transformers ``TrainerCallback``). Each imports its
framework when the module is imported and raises :class:`MissingDependency` naming the pip command when
the framework is absent; the core package never imports them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from diagnostics.errors import ConfigError


class MissingDependency(ConfigError, ImportError):
    """An optional framework is not installed (also an ImportError, so ``except ImportError`` works)."""


def require(*modules: str, install: str) -> ModuleType:
    """Import the first of ``modules`` that exists, else raise MissingDependency naming ``pip install install``."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependency(f"this integration needs {modules[0]!r}, which is not installed: pip install {install}")
