"""Time the HTML report on a large run: 100,000 steps of a 100-layer model.

The store is written directly in a few large transactions through the RunWriter's connection (the
per-step API would take minutes for a million rows); the schedule mirrors a real Monitor run:

* every step: loss, learning_rate, grad_norm and weight_norm of the whole model;
* every 100 steps, per layer (100 layers): grad_norm, weight_norm, sa_sign_diversity,
  activation_effective_rank;
* every 1,000 steps: per-layer sa_histogram (20 bins), top-10 Hessian eigenvalues with convergence flags,
  an SLQ density (4 probes x 16 nodes), sharpness against 2/lr;
* a loss explosion near the end with warning, explosion and non-finite events, and status rows.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report_speed.py [--steps 100000 --layers 100]``.
Prints rows written, the build time (wall and CPU) and the file size. Targets: < 15 s, < 10 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from diagnostics.store import Event, RunWriter, Status


def write_large_run(run_dir: Path, steps: int, layers: int, seed: int = 0) -> int:
    """Write the large synthetic run; returns the number of series rows."""
    rng = np.random.default_rng(seed)
    names = [f"blocks.{i}.mlp.fc" for i in range(layers)]
    params = {f"{n}.weight": [256, 256] for n in names}
    meta = {"config": {"steps": steps, "layers": layers, "optimizer": "SGD", "lr": 0.05},
            "model_summary": {"num_params": 65536 * layers, "parameters": params},
            "diagnostics": {"basics": {"every": 1}, "layers": {"every": 100}, "hessian_eigen": {"every": 1000, "k": 10}}}
    explode = int(steps * 0.97)
    rows: list[tuple] = []
    s = np.arange(steps)
    loss = 2.0 * np.exp(-s / (steps / 5)) + 0.3 + 0.02 * rng.standard_normal(steps)
    loss[explode:] *= np.exp(np.minimum(s[explode:] - explode, 50) / 5.0)
    loss[explode + 60:] = np.nan
    lr = 0.05 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / steps)))
    gn = np.exp(rng.normal(0, 0.3, steps))
    wn = 30 + s / steps
    for metric, v in (("loss", loss), ("learning_rate", lr), ("grad_norm", gn), ("weight_norm", wn)):
        rows += [(int(i), metric, "all", 0, None if np.isnan(x) else float(x), "") for i, x in zip(s, v)]
    probe = s[::100]
    for j, n in enumerate(names):
        sev = np.clip((probe - (explode - 3000)) / 3000, 0, 1) if j % 3 == 0 else np.zeros(len(probe))
        sd = np.clip(0.9 - 0.9 * sev + 0.05 * rng.standard_normal(len(probe)), 0, 1)
        per = {
            "grad_norm": np.exp(rng.normal(-2, 0.3, len(probe))),
            "weight_norm": np.full(len(probe), 3.0) + probe / steps,
            "sa_sign_diversity": sd,
            "activation_effective_rank": 100 * (1 - 0.7 * sev) + rng.standard_normal(len(probe)),
        }
        for metric, v in per.items():
            rows += [(int(i), metric, n, 0, float(x), "") for i, x in zip(probe, v)]
    big = s[::1000]
    edges = np.linspace(-1, 1, 21)
    for i in big:
        for n in names:
            h, _ = np.histogram(np.clip(rng.normal(0, 0.3, 128), -1, 1), bins=edges)
            rows += [(int(i), "sa_histogram", n, b, float(x / 128), "") for b, x in enumerate(h)]
        eig = np.sort(np.exp(rng.normal(0, 1, 10)) * (5 + 40 * i / steps))[::-1]
        rows += [(int(i), "hessian_eigenvalue", "all", k, float(x), "") for k, x in enumerate(eig)]
        rows += [(int(i), "hessian_converged", "all", k, 1.0, "") for k in range(10)]
        nodes = np.concatenate([rng.uniform(-0.5, 2, (4, 14)), np.tile(eig[:2], (4, 1))], axis=1)
        weights = np.concatenate([rng.dirichlet(np.ones(14), 4) * 0.98, np.full((4, 2), 0.01)], axis=1)
        rows += [(int(i), "hessian_density_node", "all", k, float(x), "") for k, x in enumerate(nodes.ravel())]
        rows += [(int(i), "hessian_density_weight", "all", k, float(x), "") for k, x in enumerate(weights.ravel())]
        rows += [(int(i), "sharpness", "all", 0, float(eig[0]), ""),
                 (int(i), "stability_threshold", "all", 0, float(2 / lr[i]), ""),
                 (int(i), "sharpness_ratio", "all", 0, float(eig[0] * lr[i] / 2), "")]
    with RunWriter(run_dir, name="large", meta=meta, resume=False) as w:
        # Bulk insert through the writer's own connection: one transaction instead of 100,000.
        conn = w._connection()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO series (step, metric, key, idx, value, source) VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        w.write_step(explode - 2000, events=[Event("explosion_warning", "sign diversity collapsed in 34 layers",
                                                   "warning", metric="explosion_score", key="all")])
        w.write_step(explode + 10, events=[Event("loss_explosion", "loss rose over 10x its median", "error",
                                                 metric="loss", key="all")])
        w.write_step(explode + 60, events=[Event("nonfinite", "loss is nan", "error", metric="loss")],
                     statuses=[Status("hessian_eigen", "failed", "loss is not finite", 0.1, 0)])
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    from diagnostics.reports import build_report

    tmp = Path(tempfile.mkdtemp(prefix="tdiag-report-bench-"))
    try:
        t0 = time.perf_counter()
        n = write_large_run(tmp / "run", args.steps, args.layers)
        print(f"wrote {n:,} series rows ({args.steps:,} steps x {args.layers} layers) in {time.perf_counter() - t0:.1f} s")
        t0, c0 = time.perf_counter(), time.process_time()
        out = build_report(tmp / "run", tmp / "report.html")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = out.stat().st_size
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"report: {wall:.2f} s wall, {cpu:.2f} s CPU, {size / 1e6:.2f} MB (load average {load:.1f})")
        print(f"targets: < 15 s -> {'ok' if wall < 15 else 'MISSED'}; < 10 MB -> {'ok' if size < 10e6 else 'MISSED'}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
