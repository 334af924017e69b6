"""The explosion suite's baselines as a report panel: max attention logit and activation kurtosis.

The suite's trainer (and ``run_with_monitor``) record ``max_attention_logit`` and
``activation_kurtosis``, which no diagnostic of the library records, so the report's own catalogue has
no panel for them. This module adds one to reports of the suite's stores:

    python -m benchmarks.explosions.baselines_panel RUN_DIR... -o report.html [--title TITLE]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from diagnostics.reports import build_report
from diagnostics.reports.figures import FigureSink
from diagnostics.reports.panels.base import Panel, layer_rows
from diagnostics.reports.views import ReportView


def _draw_baselines(view: ReportView, sink: FigureSink) -> str:
    return layer_rows(view, sink, [("max_attention_logit", "max attention logit"),
                                   ("activation_kurtosis", "activation kurtosis")], how="max", height=2.0)


BASELINES = Panel(
    id="baselines",
    title="Instability baselines: attention logits and activation kurtosis",
    metrics=("max_attention_logit", "activation_kurtosis"),
    about=("Signals practitioners already watch for loss explosions: the largest attention logit per attention "
           "module (logit growth precedes attention-entropy collapse) and the kurtosis of activations (heavy "
           "tails from outlier features). Compare their timing with the spectral-alignment warning above."),
    citation=("Wortsman et al., 2023, Small-scale Proxies for Large-scale Transformer Training Instabilities; "
              "Dehghani et al., 2023, Scaling Vision Transformers to 22 Billion Parameters; Zhai et al., 2023, "
              "Stabilizing Transformer Training by Preventing Attention Entropy Collapse."),
    draw=_draw_baselines,
)


def build_suite_report(runs: Any, out_path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the HTML report of suite runs: the report's catalogue, then :data:`BASELINES`."""
    return build_report(runs, out_path, title=title, extra_panels=(BASELINES,))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories written by the suite")
    parser.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    parser.add_argument("--title", default=None, help="report title (default: the run names)")
    args = parser.parse_args(argv)
    print(build_suite_report(args.runs, args.output, title=args.title))


if __name__ == "__main__":
    main()
