"""What the demo's summary says about a finished run, read from its store: the first explosion warning,
how close a quiet detector came, and when sharpness reached the optimizer's stability threshold.

Split from :mod:`diagnostics.app.demo`, which prints these notes; each reads one run directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["LEAD_WINDOW", "edge_note", "first_warning", "detector_note", "peak_note"]

#: Steps before an explosion over which the demo reports the detector's highest score: the horizon the
#: loss-explosion benchmark scores warnings on.
LEAD_WINDOW = 50


def first_warning(run_dir: Path) -> tuple[int | None, str | None, int]:
    """(step, short description) of the first explosion warning, and the number of warnings."""
    from diagnostics.store import open_run

    with open_run(run_dir) as run:
        events = run.events()
    if events.empty:
        return None, None, 0
    warnings_ = events[events["kind"] == "explosion_warning"].sort_values("step")
    if warnings_.empty:
        return None, None, 0
    first = warnings_.iloc[0]
    where = (
        f"layer {first['key']}" if isinstance(first["key"], str) and first["key"] not in ("", "all") else None
    )
    detail = where or " ".join(str(first["message"]).split())[:80]
    return int(first["step"]), detail, int(len(warnings_))


def detector_note(run_dir: Path, before: int | None = None) -> str | None:
    """Why no explosion warning fired in ``run_dir``: the detector did not run, never armed, or (armed)
    the highest score it reached against its threshold; None when there is nothing to say.

    The detector compares each layer with a baseline of its own first probes (``skip`` + ``warmup`` of
    them): a run with fewer spectral-alignment probes, or without the detector, cannot warn, and the
    summary says so instead of a bare "no warning"; an armed one that stayed quiet says how close it came,
    over the :data:`LEAD_WINDOW` steps up to step ``before`` when given (the explosion), else over the run.
    """
    from diagnostics.store import open_run

    with open_run(run_dir) as run:
        settings = (run.meta.get("diagnostics") or {}).get("explosion_detector")
        scores = run.series("explosion_score")
        if settings and settings.get("method") == "signals":
            features = settings.get("features") or [{}]
            metric = str(features[0].get("metric", "sa_sign_diversity"))
            needed = max(int(f.get("min_obs", 20)) for f in features) + 1
        else:
            metric = "sa_sign_diversity"
            needed = int((settings or {}).get("skip", 0)) + int((settings or {}).get("warmup", 0))
        probes = run.series(metric)
    if not settings:
        return "the explosion detector did not run"
    if not scores.empty:
        if before is not None:
            scores = scores[(scores["step"] <= before) & (scores["step"] > before - LEAD_WINDOW)]
            where = f"in the {LEAD_WINDOW} steps up to the explosion"
        else:
            where = None
        return peak_note(scores, settings.get("threshold"), where)
    seen = int(probes["step"].nunique()) if not probes.empty else 0
    return f"the detector never armed: its baseline needs {needed} probes of {metric}, the run had {seen}"


def peak_note(scores: Any, threshold: Any, where: str | None = None) -> str | None:
    """"its score peaked at X at step S (``where``), below the threshold T" from stored ``explosion_score``
    rows (the largest finite value, at its earliest step), or None when no score is finite."""
    finite = scores[scores["value"].map(math.isfinite)]
    if finite.empty:
        return None
    top = finite.loc[finite["value"].idxmax()]
    note = f"its score peaked at {float(top['value']):.2f} at step {int(top['step'])}"
    note += f" {where}" if where else ""
    if isinstance(threshold, (int, float)) and math.isfinite(threshold):
        # Above it without a warning only when the detector asks for several probes in a row (persistence).
        side = "below" if float(top["value"]) <= threshold else "above, but not for long enough,"
        note += f", {side} the threshold {float(threshold):g}"
    return note


def edge_note(run_dir: Path, before: int | None = None) -> str | None:
    """When sharpness first reached the optimizer's stability threshold in ``run_dir`` (its first upward
    ``edge_of_stability`` event, with the ratio and, given the explosion step ``before``, the lead), or
    that it stayed below it (the latest stored ratio); None when no ratio was stored.

    Adam's ratio (``adam_sharpness_ratio``) is read when the run has one, else ``sharpness_ratio``."""
    from diagnostics.store import open_run

    with open_run(run_dir) as run:
        events = run.events()
        ratios = run.series("adam_sharpness_ratio")
        if ratios.empty:
            ratios = run.series("sharpness_ratio")
    if ratios.empty:
        return None
    if not events.empty:
        events = events[(events["kind"] == "edge_of_stability") & (events["severity"] == "warning")]
    if not events.empty:
        first = events.sort_values("step").iloc[0]
        data = first["data"] if isinstance(first["data"], dict) else {}
        step = int(data.get("probe_step", first["step"]))
        note = f"reached it at step {step}"
        if before is not None and step <= before:
            note += f", {before - step} steps before the explosion"
        ratio = data.get("ratio")
        return note + (f" (ratio {float(ratio):.2f})" if isinstance(ratio, (int, float)) else "")
    last = ratios.sort_values("step").iloc[-1]
    return f"stayed below it (latest ratio {float(last['value']):.2f} at step {int(last['step'])})"
