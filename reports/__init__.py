"""Self-contained HTML reports from run stores. Imports no torch.

:func:`build_report` reads runs from the store into view models (:mod:`.views`), derives the findings
(:mod:`.findings`), draws the overview (:mod:`.dashboard`) and the panels of the catalogue
(:mod:`.panels`, one module per family) as interactive charts (:mod:`.charts`, the vendored uPlot) with
static SVG fallbacks (:mod:`.svg`), and writes one HTML file with everything inline and no network
references.
"""

from .build import build_report, render_report
from .panels import registry
from .panels.base import Panel
from .views import ReportView, RunView, load_report_view

__all__ = ["build_report", "render_report", "load_report_view", "ReportView", "RunView", "Panel", "registry"]
