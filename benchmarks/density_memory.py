"""Memory and time of the Hessian's spectral density (SLQ) at model size, within a memory budget.

Each configuration runs in its own process on the same model, batch and probes, so that its peak
resident memory can be read (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux):
the previous code (a copy of ``slq.py`` given with ``--baseline-slq``, e.g. from ``git show``), the current
default, and the current code under two explicit ``max_memory`` limits. Printed per configuration: the
peak memory added by the call, wall time, product time, the bookkeeping share, and the Wasserstein-1
distance of its measure from the current default's (over the spectrum's width) with the trace estimate.

    git show b958cf1:diagnostics/linalg/slq.py > /tmp/slq_before.py
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/density_memory.py --baseline-slq /tmp/slq_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from benchmarks.curvature import TimedOperator
from benchmarks.gpt_cases import gpt_case
from diagnostics.curvature import HessianOperator
from diagnostics.linalg import spectral_density

MB = 1 << 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load(path: str):
    spec = importlib.util.spec_from_file_location("slq_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.spectral_density


def child(config: str, baseline: str | None, size: str, batch: int, probes: int, steps: int) -> None:
    torch.manual_seed(0)
    model, loss_fn, batches = gpt_case(size, num_batches=1, batch_size=batch)
    P = sum(p.numel() for p in model.parameters())
    H = TimedOperator(HessianOperator(model, loss_fn, batches[0]))
    H @ torch.randn(P)  # the first linearisation, outside the measured call
    H.seconds, H.products = 0.0, 0
    if config == "before":
        fn = _load(baseline)
    else:
        limit = None if config == "default" else int(float(config.removeprefix("max_memory=")) * MB)
        fn = lambda *a, **kw: spectral_density(*a, max_memory=limit, **kw)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    sd = fn(H, num_probes=probes, steps=steps, seed=0)
    total = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({"config": config, "P": P, "total": total, "products_s": H.seconds, "products": H.products,
                      "peak_mb": (peak - rss0) / 1024, "settings": {k: v for k, v in sd.settings.items()},
                      "nodes": sd.nodes.tolist(), "weights": sd.weights.tolist(), "trace": sd.trace()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-slq", default=None, help="a copy of the previous slq.py to measure beside")
    parser.add_argument("--model-size", default="large", choices=["tiny", "large"])
    parser.add_argument("--batch", type=int, default=4, help="sequences in the Hessian's batch")
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--limits-mb", default="512,128", help="explicit max_memory values to measure (MiB)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.baseline_slq, args.model_size, args.batch, args.probes, args.steps)
        return
    configs = (["before"] if args.baseline_slq else []) + ["default"]
    configs += [f"max_memory={x.strip()}" for x in args.limits_mb.split(",") if x.strip()]
    results = {}
    for config in configs:
        cmd = [sys.executable, __file__, "--child", config, "--model-size", args.model_size, "--batch",
               str(args.batch), "--probes", str(args.probes), "--steps", str(args.steps)]
        if args.baseline_slq:
            cmd += ["--baseline-slq", args.baseline_slq]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=os.environ).stdout
        results[config] = json.loads(out.strip().splitlines()[-1])
    ref = results["default"]
    ref_nodes, ref_weights = np.array(ref["nodes"]).ravel(), np.array(ref["weights"]).ravel()
    width = ref_nodes.max() - ref_nodes.min()
    print(f"== {args.model_size} GPT, P={ref['P']}, batch {args.batch}, {args.probes} probes x {args.steps} steps, "
          f"float32 Hessian products")
    print("| code | basis | probe group | kept vectors | peak added memory | total s | products (count, s) | "
          "bookkeeping / products | W1 from default / width | trace |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config, r in results.items():
        s = r["settings"]
        w1 = scipy.stats.wasserstein_distance(np.array(r["nodes"]).ravel(), ref_nodes,
                                              np.array(r["weights"]).ravel(), ref_weights) / width
        book = (r["total"] - r["products_s"]) / r["products_s"]
        print(f"| {config} | {s.get('basis_dtype', 'float64')} | {s.get('probe_group', r['settings']['num_probes'])} "
              f"| {s.get('basis_vectors', s['steps'])} | {r['peak_mb']:.0f} MiB | {r['total']:.1f} | "
              f"{r['products']}, {r['products_s']:.1f} | {book:.1%} | {w1:.1e} | {r['trace']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
