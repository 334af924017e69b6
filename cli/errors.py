"""How every ``tdiag`` command reports a user error: one ``error:`` line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from diagnostics.errors import DiagnosticsError

__all__ = ["EXIT_USER_ERROR", "handle_errors", "one_line"]

#: Exit code for user errors (bad spec, bad checkpoint, bad store, ...).
EXIT_USER_ERROR = 2


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one stderr line and exit code 2; warnings into one stderr line each."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(
            message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
        ) -> None:
            click.echo(f"warning: {one_line(str(message))}", err=True)

        with warnings.catch_warnings():
            warnings.showwarning = show  # type: ignore[assignment]
            warnings.simplefilter("default")
            try:
                return fn(*args, **kwargs)
            except DiagnosticsError as exc:
                click.echo(f"error: {one_line(str(exc))}", err=True)
                sys.exit(EXIT_USER_ERROR)
            except KeyboardInterrupt:
                click.echo("interrupted; run the same command again to resume", err=True)
                sys.exit(130)

    return wrapper
