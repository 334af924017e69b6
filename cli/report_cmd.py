"""``tdiag report RUN_DIR... -o report.html``: one self-contained HTML report of one or several runs."""

from __future__ import annotations

import click
from diagnostics.cli.errors import handle_errors


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write.")
@click.option("--title", default=None, help="Report title (default: the run names).")
@handle_errors
def report(runs: tuple[str, ...], output: str, title: str | None) -> None:
    """Write an offline HTML report of RUNS (run directories or run.sqlite files)."""
    from diagnostics.reports import build_report

    click.echo(str(build_report(list(runs), output, title=title)))
