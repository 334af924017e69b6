"""The HTML page: overview, findings, the panels, then the runs' configuration (folded).

Nothing here references the network: the scripts (uPlot and the page's own) and styles are inline, and
the only links are in-page anchors. Every user-supplied string goes through :func:`~.panels.base.esc`;
chart data goes through :func:`~.charts.json_for_html`.
"""

from __future__ import annotations

import json
from typing import Any

from .charts import UPLOT_VERSION, inline_script, report_js, uplot_css, uplot_js
from .figures import run_color
from .findings import FindingGroup
from .panels.base import esc
from .views import ReportView, RunView

CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --err: #b3261e; --warn: #b26a00; --ok: #1e6b2f; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1320px; padding: 0 1.5rem 1.5rem 1.5rem; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.55rem; margin: 1.2rem 0 .2rem 0; }
h2 { font-size: 1.2rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; margin: 1.8rem 0 .6rem 0; }
h3 { font-size: 1rem; margin: 1rem 0 .3rem 0; }
p.generated, p.cite, .muted, p.chart-note { color: var(--muted); font-size: .85rem; }
p.about { margin: .3rem 0; max-width: 70rem; }
p.cite { font-style: italic; margin: .2rem 0 .6rem 0; }
p.chart-note { margin: .2rem 0; }
p.not-recorded { color: var(--muted); font-style: italic; }
a { color: #1a4f9c; }
nav.top { position: sticky; top: 0; z-index: 10; background: rgba(255,255,255,.96); border-bottom: 1px solid var(--line);
          padding: .35rem 0; font-size: .82rem; display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: center; }
nav.top a { text-decoration: none; }
nav.top .runs { display: none; margin-left: auto; gap: .6rem; align-items: center; }
.js nav.top .runs { display: flex; }
nav.top .runs label { cursor: pointer; white-space: nowrap; }
nav.top .runs .swatch { margin-right: .25rem; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .4rem;
          vertical-align: -0.05em; }
.hint { color: var(--muted); display: none; }
.js .hint { display: inline; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .8rem; margin: .6rem 0 1rem 0; }
.card { border: 1px solid var(--line); border-top: 4px solid var(--line); border-radius: 4px; padding: .5rem .75rem; }
.card h3 { margin: 0 0 .2rem 0; font-size: 1.02rem; word-break: break-all; }
.card p.outcome { font-weight: 700; margin: 0 0 .35rem 0; }
p.outcome.explosion { color: var(--err); }
p.outcome.spike { color: var(--warn); }
p.outcome.stable { color: var(--ok); }
.card dl { display: grid; grid-template-columns: max-content 1fr; gap: .1rem .6rem; margin: 0; font-size: .84rem; }
.card dt { color: var(--muted); }
.card dd { margin: 0; word-break: break-word; }
.grid { display: grid; gap: .6rem 1.2rem; margin: .4rem 0 .8rem 0; }
.grid.g1 { grid-template-columns: 1fr; }
.grid.g2 { grid-template-columns: repeat(2, minmax(0, 1fr)); }
.grid.g3 { grid-template-columns: repeat(3, minmax(0, 1fr)); }
.grid.g4 { grid-template-columns: repeat(4, minmax(0, 1fr)); }
@media (max-width: 900px) { .grid.g2, .grid.g3, .grid.g4 { grid-template-columns: 1fr; } }
.cell a.more { font-size: .78rem; text-decoration: none; }
div.chart { min-width: 0; }
div.chart .live { display: none; }
.js div.chart .live { display: block; }
.js div.chart .static { display: none; }
div.chart .static figure { margin: 0; }
.uplot { font-family: inherit; }
.uplot th, .uplot td { border: none; background: none; padding: 0; }
.uplot .u-title { font-size: .85rem; font-weight: 600; text-align: left; padding-left: 4px; }
.uplot .u-legend { font-size: .74rem; text-align: left; margin: 0; line-height: 1.25; }
.uplot .u-legend .u-series > * { padding: 1px 3px; }
.uplot .u-legend .u-marker { width: .85em; height: .85em; }
.chart-tools { font-size: .72rem; color: var(--muted); display: flex; flex-wrap: wrap; gap: .2rem .8rem;
               align-items: center; padding-left: 4px; }
.chart-tools .key i { display: inline-block; width: 1.4em; margin-right: .3em; vertical-align: middle; }
.chart-tools button { font-size: .7rem; margin-left: auto; padding: 0 .4rem; cursor: pointer; }
ul.findings { padding-left: 0; list-style: none; margin: .3rem 0; }
ul.findings li { padding: .25rem .5rem; margin: .2rem 0; border-left: 4px solid var(--line); }
ul.findings li.error { border-color: var(--err); background: #fdecea; }
ul.findings li.warning { border-color: var(--warn); background: #fff4e0; }
ul.findings li.info { border-color: #8ab4f8; background: #f1f6fe; }
ul.findings details summary { color: inherit; }
ul.findings ul { margin: .3rem 0 .1rem 0; padding-left: 1.2rem; font-size: .85rem; }
ul.findings ul li { border: none; background: none !important; padding: .05rem 0; margin: 0; list-style: disc; }
.count { color: #1a4f9c; font-size: .78rem; margin-left: .5rem; }
details[open] > summary .count { display: none; }
.sev { font-weight: 600; text-transform: uppercase; font-size: .72rem; margin-right: .4rem; }
table { border-collapse: collapse; margin: .4rem 0 1rem 0; font-size: .82rem; }
th, td { border: 1px solid var(--line); padding: .2rem .45rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.failed { color: var(--err); font-weight: 600; }
table.cost caption { text-align: left; color: var(--muted); font-size: .8rem; padding-bottom: .2rem; }
table.cost td.bar { position: relative; min-width: 11rem; }
table.cost td.bar i { position: absolute; left: 0; top: 3px; bottom: 3px; opacity: .35; }
table.cost td.bar span { position: relative; }
td.notconv { color: var(--warn); }
table.kv td:first-child { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: nowrap; }
td.value { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; word-break: break-all; }
.stitle { font-size: .85rem; font-weight: 600; padding-left: 4px; }
svg.schart, svg.sheat { width: 100%; height: auto; display: block; }
.slegend { font-size: .74rem; display: flex; flex-wrap: wrap; gap: .1rem .9rem; padding-left: 4px; color: #333; }
.slegend i.sw { display: inline-block; width: 1.4em; margin-right: .3em; vertical-align: middle; }
.slegend i.sw.pt { width: .7em; height: .7em; border: 1.5px solid; border-radius: 50%; }
.heat-foot { display: flex; flex-wrap: wrap; align-items: center; gap: .3rem 1.5rem; }
svg.scbar { width: 420px; max-width: 100%; height: auto; display: block; }
figure.fig { margin: .5rem 0; }
figure.fig svg, figure.fig img { max-width: 100%; height: auto; display: block; }
section.panel { margin-bottom: 1.2rem; }
section.panel.absent h2 { font-size: .95rem; color: var(--muted); margin: 1rem 0 .2rem 0; }
section.panel.absent p { margin: 0; font-size: .85rem; }
details.fold { margin: .4rem 0; }
details summary { cursor: pointer; color: #1a4f9c; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  nav.top { display: none; }
  .js div.chart .live { display: none; }
  .js div.chart .static { display: block; }
  .grid.g2, .grid.g3, .grid.g4 { grid-template-columns: 1fr; }
  section.panel, figure.fig, table, .card { break-inside: avoid; page-break-inside: avoid; }
  h2 { break-after: avoid; page-break-after: avoid; }
  ul.findings li { background: none !important; }
  details > summary { list-style: none; }
  details > * { display: block; }
  a { color: inherit; text-decoration: none; }
}
"""

# Meta keys shown in the run table, in this order; everything else follows alphabetically.
META_ORDER = ("run_name", "created", "schema_version", "model_fingerprint", "loss_reduction", "curvature_mode",
              "gradients_seen", "num_classes")
MAX_VALUE_CHARS = 300
# Individual findings listed under one summary line.
MAX_DETAILS = 60


def _value(v: Any) -> str:
    if isinstance(v, str):
        s = v
    else:
        try:
            s = json.dumps(v, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError):
            s = str(v)
    if len(s) > MAX_VALUE_CHARS:
        s = s[: MAX_VALUE_CHARS - 1] + "\u2026"
    return s


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k in sorted(d, key=str):
        v = d[k]
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(v) <= 40:
            out += _flatten(v, name + ".")
        else:
            out.append((name, v))
    return out


def kv_table(pairs: list[tuple[str, Any]], cls: str = "kv") -> str:
    """Two-column key/value table; ``created`` and ``versions.*`` cells carry classes for scrubbing."""
    rows = []
    for k, v in pairs:
        extra = ""
        if k == "created":
            extra = " created"
        elif k.startswith("versions."):
            extra = " version"
        elif k == "path":
            extra = " path"
        rows.append(f'<tr><td>{esc(k)}</td><td class="value{extra}">{esc(_value(v))}</td></tr>')
    return f'<table class="{cls}"><tbody>' + "".join(rows) + "</tbody></table>\n"


def run_config_html(run: RunView, several: bool) -> str:
    """The run's metadata: summary, configuration and versions, then the estimators' settings."""
    meta = dict(run.meta)
    out = []
    general = [(k, meta[k]) for k in META_ORDER if k in meta]
    summary = meta.get("model_summary")
    if isinstance(summary, dict):
        if "num_params" in summary:
            general.append(("model_summary.num_params", summary["num_params"]))
        params = summary.get("parameters")
        if isinstance(params, dict):
            general.append(("model_summary.parameter_tensors", len(params)))
    general.append(("path", run.path))
    general.append(("steps recorded", len(run.steps)))
    if len(run.steps):
        general.append(("step range", f"{int(run.steps[0])} to {int(run.steps[-1])}"))
    general.append(("metrics recorded", len(run.metrics)))
    out.append(kv_table(general))
    config = meta.get("config")
    if isinstance(config, dict) and config:
        out.append("<h3>Configuration</h3>\n" + kv_table(_flatten(config)))
    diags = meta.get("diagnostics")
    if isinstance(diags, dict) and diags:
        rows = []
        for name in sorted(diags, key=str):
            s = diags[name]
            text = ", ".join(f"{k}={_value(v)}" for k, v in sorted(s.items(), key=lambda t: str(t[0]))) \
                if isinstance(s, dict) else _value(s)
            rows.append(f"<tr><td>{esc(name)}</td><td class=\"value\">{esc(text)}</td></tr>")
        out.append('<h3>Estimator settings</h3>\n<table class="kv"><thead><tr><th>diagnostic</th><th>settings'
                   "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>\n")
    versions = meta.get("versions")
    if isinstance(versions, dict) and versions:
        out.append("<h3>Versions</h3>\n" + kv_table([(f"versions.{k}", v) for k, v in sorted(versions.items())]))
    # diagnostic_state is the Monitor's resume state (baselines, counters, vectors): not for reading.
    rest = {k: v for k, v in meta.items()
            if k not in META_ORDER
            and k not in ("config", "diagnostics", "versions", "model_summary", "diagnostic_state")}
    if rest:
        out.append("<h3>Other metadata</h3>\n" + kv_table(_flatten(rest)))
    if isinstance(summary, dict) and isinstance(summary.get("parameters"), dict):
        params = summary["parameters"]
        rows = "".join(f"<tr><td>{esc(k)}</td><td class=\"value\">{esc(_value(v))}</td></tr>"
                       for k, v in list(params.items())[:500])
        more = f"<p class=\"muted\">{len(params) - 500} more not shown.</p>" if len(params) > 500 else ""
        out.append(f"<h3>Model parameters ({len(params)} tensors)</h3>"
                   f'<table class="kv"><tbody>{rows}</tbody></table>{more}\n')
    what = "Run " + run.name if several else "Run"
    return (f'<details class="fold config"><summary>{esc(what)}: summary, configuration, estimator settings and '
            f"versions</summary>\n{''.join(out)}</details>\n")


def findings_html(view: ReportView, groups: dict[str, list[FindingGroup]]) -> str:
    """The findings: per run, one line per kind with a count, the individual findings folded under it."""
    out = ['<section id="findings">\n<h2>Findings</h2>\n']
    several = len(view.runs) > 1
    for i, run in enumerate(view.runs):
        if several:
            out.append(f'<h3><span class="swatch" style="background:{run_color(i)}"></span>{esc(run.name)}</h3>\n')
        out.append('<ul class="findings">\n')
        for g in groups[run.name]:
            head = f'<span class="sev">{esc(g.severity)}</span>{esc(g.summary)}'
            if g.items:
                items = "".join(f"<li>{esc(f.text)}</li>" for f in g.items[:MAX_DETAILS])
                if len(g.items) > MAX_DETAILS:
                    items += f"<li>... and {len(g.items) - MAX_DETAILS} more.</li>"
                body = (f'<details><summary>{head}<span class="count">show all {len(g.items)}</span></summary>'
                        f"<ul>{items}</ul></details>")
            else:
                body = head
            out.append(f'<li class="{esc(g.severity)}" data-kind="{esc(g.kind)}">{body}</li>\n')
        out.append("</ul>\n")
    out.append("</section>\n")
    return "".join(out)


def _run_toggles(view: ReportView) -> str:
    if len(view.runs) < 2:
        return ""
    boxes = "".join(f'<label><input type="checkbox" class="run-toggle" data-run="{i}" checked>'
                    f'<span class="swatch" style="background:{run_color(i)}"></span>{esc(run.name)}</label>'
                    for i, run in enumerate(view.runs))
    return f'<span class="runs">Runs: {boxes}</span>'


def page_html(view: ReportView, groups: dict[str, list[FindingGroup]], overview: str,
              sections: list[tuple[str, str, str]], generated_at: str, version: str) -> str:
    """Assemble the document. ``sections`` are ``(anchor id, title, html)`` in order."""
    several = len(view.runs) > 1
    links = ([("overview", "Overview")] if overview else []) + [("findings", "Findings")]
    links += [(sid, title) for sid, title, body in sections if 'class="panel absent"' not in body]
    links.append(("config", "Configuration"))
    nav = "".join(f'<a href="#{esc(sid)}">{esc(title)}</a>' for sid, title in links)
    runs_line = ", ".join(run.name for run in view.runs)
    empty_note = ""
    if all(r.empty for r in view.runs):
        empty_note = ('<p class="not-recorded" id="empty-note">' +
                      ("This run is empty" if not several else "These runs are empty") +
                      ": nothing was recorded, so there is nothing to plot.</p>\n")
    # panels with data first, then one line each for those not recorded
    present = "".join(body for _, _, body in sections if 'class="panel absent"' not in body)
    absent = "".join(body for _, _, body in sections if 'class="panel absent"' in body)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        # an empty data: icon stops the browser from asking the file system or network for a favicon
        '<link rel="icon" href="data:,">\n',
        f"<title>{esc(view.title)}</title>\n<style>{uplot_css()}\n{CSS}</style>\n</head>\n<body>\n",
        f"<header>\n<h1>{esc(view.title)}</h1>\n",
        f'<p class="generated">Runs: {esc(runs_line)}. Generated <span class="generated-at">{esc(generated_at)}'
        f'</span> by training-diagnostics <span class="version">{esc(version)}</span>.</p>\n</header>\n',
        f'<nav class="top">{nav}{_run_toggles(view)}<span class="hint">Charts: drag to zoom, double-click to '
        "reset, click a legend entry to hide it.</span></nav>\n",
        empty_note,
        overview,
        findings_html(view, groups),
        present,
        absent,
        '<section id="config">\n<h2>Runs and configuration</h2>\n',
        "".join(run_config_html(r, several) for r in view.runs),
        "</section>\n",
        "<footer><p class=\"muted\">Self-contained report: no network resources. Charts are drawn by the "
        f"inline uPlot {UPLOT_VERSION} (MIT License, Copyright (c) 2022 Leon Sorokin) and fall back to static "
        "figures without scripts and in print. Series are downsampled for display (each bucket's minimum and "
        "maximum and every alert step are kept); tables show the stored numbers.</p></footer>\n",
        inline_script(uplot_js()),
        inline_script(report_js()),
        "</body>\n</html>\n",
    ]
    return "".join(parts)
