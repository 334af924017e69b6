"""Commit time of one monitored step: per-layer values as vector rows against one row per layer.

Writes the same steps to two stores in one process, alternating between them: the store as it is
(vector rows for per-layer values) and the same store with vectors disabled (every value a long row, as
schema version 1 wrote). Steps mimic what the Monitor commits on the zoo's tiny GPT (37 parameters):
``all-only`` steps (8 whole-model values, 8 diagnostics' seconds, 8 statuses) and ``per-layer`` steps
(the same plus grad_norm, weight_norm and update_ratio per parameter), and, with ``--layers``, a model
with more parameters. Also prints the stores' file sizes.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/store_commit.py [--steps 400] [--layers 37 148]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from diagnostics.store import Record, RunWriter, Status, vectors

DIAGNOSTICS = [f"diagnostic{i}" for i in range(8)]
WHOLE_MODEL = ("loss", "grad_norm", "weight_norm", "update_ratio", "learning_rate", "monitor_overhead",
               "nonfinite_grads", "explosion_score")


def step_records(step: int, layers: int, per_layer: bool) -> list[Record]:
    recs = [Record(m, 1.0 + step) for m in WHOLE_MODEL]
    recs += [Record("monitor_seconds", 0.001, key=d) for d in DIAGNOSTICS]
    if per_layer:
        recs += [Record(m, 1.0 / (j + 1), key=f"blocks.{j}.weight")
                 for m in ("grad_norm", "weight_norm", "update_ratio") for j in range(layers)]
    return recs


def measure(steps: int, layers: int, tmp: Path) -> dict[str, dict[str, float]]:
    writers = {"vectors": RunWriter(tmp / f"vec{layers}"), "rows": RunWriter(tmp / f"rows{layers}")}
    statuses = [Status(d, "ok", None, 0.001) for d in DIAGNOSTICS]
    times: dict[tuple[str, str], list[float]] = {}
    min_keys = vectors.MIN_KEYS
    try:
        for step in range(steps):
            per_layer = step % 10 == 0
            recs = step_records(step, layers, per_layer)
            for form, writer in writers.items():
                vectors.MIN_KEYS = min_keys if form == "vectors" else 10**9
                t0 = time.perf_counter()
                writer.write_step(step, recs, statuses=statuses)
                times.setdefault((form, "per-layer" if per_layer else "all-only"), []).append(time.perf_counter() - t0)
    finally:
        vectors.MIN_KEYS = min_keys
        for w in writers.values():
            w.close()
    out: dict[str, dict[str, float]] = {}
    for form in writers:
        kinds = {kind: statistics.median(times[(form, kind)][5:]) * 1e3 for kind in ("all-only", "per-layer")}
        kinds["amortised"] = 0.9 * kinds["all-only"] + 0.1 * kinds["per-layer"]
        db = tmp / f"{'vec' if form == 'vectors' else 'rows'}{layers}" / "run.sqlite"
        kinds["store MB"] = sum(p.stat().st_size for p in db.parent.glob("run.sqlite*")) / 1e6
        out[form] = kinds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--layers", type=int, nargs="+", default=[37, 148])
    args = ap.parse_args(argv)
    print(f"Command: `{' '.join(['OMP_NUM_THREADS=1 .venv/bin/python', *sys.argv])}`\n")
    print("| parameters | form | all-only step (ms) | per-layer step (ms) | amortised, per-layer every 10 (ms) | store (MB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for layers in args.layers:
            res = measure(args.steps, layers, Path(d))
            for form, r in res.items():
                print(f"| {layers} | {form} | {r['all-only']:.3f} | {r['per-layer']:.3f} | {r['amortised']:.3f} "
                      f"| {r['store MB']:.2f} |")
            ratio = res["rows"]["per-layer"] / res["vectors"]["per-layer"]
            print(f"| {layers} | rows / vectors | {res['rows']['all-only'] / res['vectors']['all-only']:.2f}x "
                  f"| {ratio:.2f}x | {res['rows']['amortised'] / res['vectors']['amortised']:.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
