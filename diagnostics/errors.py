"""Exceptions raised by training-diagnostics.

Every error a user can cause derives from :class:`DiagnosticsError` and carries a message that names the
thing to fix. The CLI turns these into one line on stderr and exit code 2. This module imports nothing
heavy so that torch-free layers (store, reports) can use it.
"""

from __future__ import annotations


class DiagnosticsError(Exception):
    """Base class of every error caused by user input or configuration."""


class ConfigError(DiagnosticsError, ValueError):
    """Invalid argument or option (unknown diagnostic, k too large, bad pattern, ...)."""


class LossError(DiagnosticsError, ValueError):
    """The loss function returned something unusable (not a scalar, non-finite, not differentiable)."""


class DataError(DiagnosticsError, ValueError):
    """The data given to an estimator is empty, malformed or not consumable by the loss."""


class NonDeterministicOperatorError(DiagnosticsError, RuntimeError):
    """Products with the same vector differ: the operator is not a fixed matrix (dropout, resampled data)."""


class StoreError(DiagnosticsError, RuntimeError):
    """The run store cannot be opened, written or read."""


class SchemaVersionError(StoreError):
    """The run store was written by a newer schema version than this package understands."""


class CheckpointError(DiagnosticsError, RuntimeError):
    """A checkpoint cannot be loaded or does not match the model."""


class SpecError(DiagnosticsError, ValueError):
    """A 'module:attr' or 'path.py:attr' specification does not resolve."""


class MisuseError(DiagnosticsError, RuntimeError):
    """The Monitor is used in a way that measures nothing or measures the wrong thing (``strict=True``).

    Raised instead of a :class:`MisuseWarning` when the Monitor is strict; the message names the fix.
    """


class MisuseWarning(UserWarning):
    """The Monitor is used in a way that measures nothing or measures the wrong thing.

    Warned once per cause and diagnostic; the same message is stored as an event of kind ``misuse``.
    """


class StopTraining(Exception):
    """Raised by the Monitor when an alarm's action is ``"stop"``.

    Plain training loops catch it to end training; the Lightning and Hugging Face adapters turn it into
    the framework's own stop. ``event`` holds the alarm that caused it.
    """

    def __init__(self, message: str, event: object | None = None) -> None:
        super().__init__(message)
        self.event = event
