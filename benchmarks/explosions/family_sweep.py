"""The sweep behind family.py's learning rates: train variants of the family's base run without recording.

Usage (repository root; two runs at a time, one core each):

    python -m benchmarks.explosions.family_sweep SPEC.json

SPEC.json maps a name to changes of ``family.BASE`` (TrainConfig fields; ``model`` entries are merged
into the base model options), e.g. ``{"nonorm-lr1e-2": {"lr": 0.01, "model": {"norm": "none"}}}``.
Prints per run: name, explosion step (None: none), last step, peak loss / running minimum after step 20,
minimum loss, last loss, seconds.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from multiprocessing import get_context
from typing import Any

__all__ = ["run_variant", "main"]


def run_variant(item: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
    """Train one variant of the base run; returns the printed row."""
    import torch

    from benchmarks.explosions.family import _GPT, BASE
    from benchmarks.explosions.record import train

    name, changes = item
    changes = dict(changes)
    torch.set_num_threads(1)
    model = {**_GPT, **changes.pop("model", {})}
    res = train(replace(BASE, name=name, model=model, **changes))
    losses = res["losses"]
    finite = [x for x in losses if math.isfinite(x)]
    ratios, low = [], math.inf
    for x in losses:
        if math.isfinite(x):
            low = min(low, x)
        ratios.append(x / low if math.isfinite(x) else math.inf)
    peak = max(ratios[20:]) if len(ratios) > 20 else math.nan
    return (name, res["explosion_step"], res["final_step"], round(peak, 2), round(min(finite), 3),
            round(finite[-1], 3), round(res["seconds"]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    with open(args[0]) as fh:
        spec = json.load(fh)
    with get_context("spawn").Pool(2) as pool:
        for row in pool.imap_unordered(run_variant, list(spec.items())):
            print(*row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
