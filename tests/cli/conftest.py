"""Fixtures for the command-line tests: the ``tdiag`` group with every command, and a small zoo run."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner


@pytest.fixture(scope="session")
def tdiag() -> click.Group:
    """The ``tdiag`` group with every command of ``cli.commands`` registered.

    A copy of the group, so tests do not depend on (nor change) how ``cli/__init__.py`` wires commands.
    """
    from diagnostics.cli import main
    from diagnostics.cli.commands import register

    group = click.Group(name="tdiag", commands=dict(main.commands), help=main.help)
    register(group)
    return group


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()
