"""build_report: store -> view models -> panels -> one self-contained HTML file."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from diagnostics.errors import ConfigError, StoreError

from .figures import FigureSink
from .findings import run_findings
from .page import page_html
from .panels import registry
from .views import ReportView, load_report_view


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("training-diagnostics")
    except metadata.PackageNotFoundError:
        return "unknown"


def _generated_at() -> str:
    # SOURCE_DATE_EPOCH (the reproducible-builds convention) pins the one timestamp in the report.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.isdigit()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def render_report(view: ReportView) -> str:
    """Render a view model to the report's HTML text.

    Returns:
        The whole document. Cost: one figure render per panel with data (SVG, or PNG when large).
    """
    sink = FigureSink()
    findings = {run.name: run_findings(run) for run in view.runs}
    sections = []
    for panel in registry():
        sections.append((f"panel-{panel.id}", panel.title, panel.render(view, sink)))
    return page_html(view, findings, sections, _generated_at(), _version())


def build_report(runs: Any, out_path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write one self-contained HTML report of one or several runs.

    The file has inline CSS and inline figures (SVG, or base64 PNG where SVG would be large), no scripts
    and no network references; it prints cleanly. Every user string is escaped. Long runs are
    downsampled for display, keeping each bucket's extremes and every alert step.

    Args:
        runs: a run directory, a ``Run``, a ``Runs``, or a list of run directories / ``Run`` objects.
        out_path: the HTML file to write (parent directories are created).
        title: the report's title; default names the runs.

    Returns:
        The path written. Cost: one store query per metric per run, then about a second of plotting
        for a typical run (100,000 steps x 100 layers: a few seconds).

    Raises:
        ConfigError: no runs, or ``out_path`` is a directory. StoreError: a run cannot be read or the file
        cannot be written.
    """
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"build_report: output path {out} is a directory; give a file name such as "
                          f"{out / 'report.html'}")
    view = load_report_view(runs, title=title)
    text = render_report(view)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot write the report to {out}: {exc}") from exc
    return out
