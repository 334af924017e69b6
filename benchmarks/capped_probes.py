"""Whether capping a curvature probe's products spreads its cost: successive capped ``hessian_top``
probes of one fixed model, resumed (the default: the next probe continues the stopped Lanczos run) or
restarted (``resume=False``: each probe starts again from the previous probe's Ritz vectors), against
uncapped probes.

The zoo's tiny GPT at its initialisation, 16 sequences of the stdlib text as probe data, top-10 Hessian
eigenvalues at the diagnostic's default tolerance (1e-3). The model does not change between probes, so
a capped sequence that continued the computation reaches the uncapped values. For a resumed run, which
stores nothing until it ends, the table shows the eigenvalues found so far (``LanczosRun.interim``).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/capped_probes.py [--caps 30 20] [--probes 8]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diagnostics.metrics import get_diagnostic  # noqa: E402
from diagnostics.metrics.context import StepContext  # noqa: E402
from diagnostics.zoo.registry import get_data, get_loss, get_model  # noqa: E402


def probes(model, loss_fn, batch, cap: int | None, count: int, resume: bool
           ) -> list[tuple[str, int, float, float]]:
    """``(status, products, lambda_1, lambda_10)`` of successive probes with ``max_matvecs=cap``: ``count``
    of them, or fewer when one ends with status ok."""
    d = get_diagnostic("hessian_top", max_matvecs=cap, resume=resume)
    out = []
    for step in range(count):
        ctx = StepContext(step=step, model=model, loss_fn=loss_fn, batch=batch, loss=None,
                          probe_data=[batch])
        res = d.compute(ctx)
        ev = [r.value for r in res.records if r.metric.endswith("eigenvalue")]
        if not ev and d.unfinished:  # a resumed run stores nothing until it ends: read its progress
            ev = d.unfinished["all"].lanczos.interim().eigenvalues.tolist()
        ev = ev or [float("nan")]
        out.append((res.status, res.num_matvecs, ev[0], ev[-1]))
        if res.status == "ok":
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", type=int, nargs="+", default=[30, 20])
    ap.add_argument("--probes", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, loss_fn = get_model("tiny-gpt"), get_loss("tiny-gpt")
    batch = get_data("pydoc-text", batch_size=16, num_batches=1)[0]
    print("| max_matvecs | resume | probe | status | products | lambda_1 | lambda_10 |")
    print("|---|---|---|---|---|---|---|")
    for cap, resume in [(None, True), *((c, r) for c in args.caps for r in (True, False))]:
        label = "default (300)" if cap is None else cap
        for i, (status, n, top, tenth) in enumerate(probes(model, loss_fn, batch, cap, args.probes, resume)):
            print(f"| {label} | {resume} | {i + 1} | {status} | {n} | {top:.4f} | {tenth:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
