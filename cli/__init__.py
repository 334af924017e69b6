"""The ``tdiag`` command line: thin click commands over library functions."""

from __future__ import annotations

import click
from diagnostics.cli import commands


@click.group()
@click.version_option(package_name="training-diagnostics")
def main() -> None:
    """tdiag: training diagnostics from checkpoints and run stores."""


commands.register(main)
