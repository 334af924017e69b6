"""build_report: store -> view models -> panels -> one self-contained HTML file."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diagnostics.errors import ConfigError, StoreError

from .charts import ChartSink
from .dashboard import dashboard_html
from .findings import group_findings, run_findings
from .page import page_html
from .panels import registry
from .panels.base import Panel
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


def _panels(extra_panels: Iterable[Panel]) -> list[Panel]:
    """The catalogue followed by ``extra_panels``; anchors must stay unique within the page."""
    panels = registry() + list(extra_panels)
    seen: set[str] = set()
    for panel in panels:
        if not isinstance(panel, Panel):
            raise ConfigError(f"extra_panels: expected Panel objects, got {type(panel).__name__}")
        if panel.id in seen:
            raise ConfigError(f"extra_panels: panel id {panel.id!r} is already in the report; give it another id")
        seen.add(panel.id)
    return panels


def render_report(view: ReportView, *, extra_panels: Iterable[Panel] = ()) -> str:
    """Render a view model to the report's HTML text.

    Args:
        view: the runs to show.
        extra_panels: panels drawn after the catalogue's, for metrics the library's diagnostics do not
            record (a benchmark's own probes, for example).

    Returns:
        The whole document. Cost: one static figure per chart (SVG, or PNG when large) and per heatmap.

    Raises:
        ConfigError: an extra panel is not a :class:`Panel` or reuses a panel id.
    """
    panels = _panels(extra_panels)
    sink = ChartSink()
    groups = {run.name: group_findings(run, run_findings(run)) for run in view.runs}
    overview = dashboard_html(view, sink)
    sections = []
    for panel in panels:
        sections.append((f"panel-{panel.id}", panel.title, panel.render(view, sink)))
    return page_html(view, groups, overview, sections, _generated_at(), _version())


def build_report(runs: Any, out_path: str | os.PathLike[str], *, title: str | None = None,
                 extra_panels: Iterable[Panel] = ()) -> Path:
    """Write one self-contained HTML report of one or several runs.

    The file opens with an overview (a card per run and the key charts), then the findings grouped and
    counted, the panels, and the runs' configuration folded at the end. Time series are interactive
    (inline uPlot: zoom, values under the cursor, run and series toggles) with a static figure for
    readers without scripts and for print; heatmaps are static. Everything is inline: no network
    references. Every user string is escaped. Long runs are downsampled for display, keeping each
    bucket's extremes and every alert step.

    Args:
        runs: a run directory, a ``Run``, a ``Runs``, or a list of run directories / ``Run`` objects.
        out_path: the HTML file to write (parent directories are created).
        title: the report's title; default names the runs.
        extra_panels: panels drawn after the catalogue's, for metrics the library's diagnostics do not
            record; none by default.

    Returns:
        The path written. Cost: one store query per metric per run, then about a second of plotting
        for a typical run (100,000 steps x 100 layers: a few seconds).

    Raises:
        ConfigError: no runs, ``out_path`` is a directory, or an extra panel is not a :class:`Panel` or
        reuses a panel id. StoreError: a run cannot be read or the file cannot be written.
    """
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"build_report: output path {out} is a directory; give a file name such as "
                          f"{out / 'report.html'}")
    extra = list(extra_panels)
    _panels(extra)  # bad panels fail before the store is read
    view = load_report_view(runs, title=title)
    text = render_report(view, extra_panels=extra)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot write the report to {out}: {exc}") from exc
    return out
