"""Commit time of one monitored step: per-layer values as vector rows against one row per layer.

Writes the same steps to two stores in one process, alternating between them: the store as it is
(vector rows for per-layer values) and the same store with vectors disabled (every value a long row, as
schema version 1 wrote). Steps mimic what the Monitor commits on the zoo's tiny GPT (37 parameters):
``all-only`` steps (8 whole-model values, 8 diagnostics' seconds, 8 statuses) and ``per-layer`` steps
(the same plus grad_norm, weight_norm and update_ratio per parameter), and, with ``--layers``, a model
with more parameters. Also prints the stores' file sizes, and times the reader on a longer store in each
form (``--read-steps``).

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


def measure_reading(steps: int, layers: int, tmp: Path) -> dict[str, dict[str, float]]:
    """Write ``steps`` steps (4 whole-model values each, 3 norms per layer every 10th step) in each form and
    time the reader: whole store, and one per-layer metric."""
    from diagnostics.store import open_run

    names = [f"blocks.{j}.weight" for j in range(layers)]
    out: dict[str, dict[str, float]] = {}
    min_keys = vectors.MIN_KEYS
    for form in ("vectors", "rows"):
        vectors.MIN_KEYS = min_keys if form == "vectors" else 10**9
        t0 = time.perf_counter()
        try:
            with RunWriter(tmp / f"read-{form}") as w:
                for step in range(steps):
                    recs = [Record(m, 1.0 + step) for m in ("loss", "grad_norm", "weight_norm", "update_ratio")]
                    if step % 10 == 0:
                        recs += [Record(m, 1.0 / (j + 1), key=k)
                                 for m in ("grad_norm", "weight_norm", "update_ratio") for j, k in enumerate(names)]
                    w.write_step(step, recs)
        finally:
            vectors.MIN_KEYS = min_keys
        t1 = time.perf_counter()
        with open_run(tmp / f"read-{form}") as run:
            t2 = time.perf_counter()
            one = len(run.series("grad_norm"))
            t3 = time.perf_counter()
            everything = len(run.series())
            t4 = time.perf_counter()
        out[form] = {"write s": t1 - t0, "one metric s": t3 - t2, "one metric rows": one,
                     "all s": t4 - t3, "all rows": everything}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--layers", type=int, nargs="+", default=[37, 148])
    ap.add_argument("--read-steps", type=int, default=20000,
                    help="steps of the store whose reading is timed (100 layers; 0: skip)")
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
        if args.read_steps:
            res = measure_reading(args.read_steps, 100, Path(d))
            print(f"\nReading a store of {args.read_steps} steps, 100 layers (3 norms per layer every 10 steps):\n")
            print("| form | writing all steps (s) | series('grad_norm') (s) | rows | series() (s) | rows |")
            print("|---|---|---|---|---|---|")
            for form, r in res.items():
                print(f"| {form} | {r['write s']:.1f} | {r['one metric s']:.2f} | {r['one metric rows']} | "
                      f"{r['all s']:.2f} | {r['all rows']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
