"""Cost of curvature in the loop: a ``hessian_top`` probe against a training step, cold and warm-started,
and the amortised overhead of the ``standard`` and ``full`` presets.

Cases: the zoo's digits MLP (batches of 64) and tiny GPT (2 layers, d_model 64, batches of 16 x 64 tokens),
trained with AdamW (lr 1e-3). The probe data is the first training batch, as the Monitor takes it by
default.

1. ``hessian_top`` probe cost. After a probe at step 0, training continues for ``--gaps`` steps (5, 50,
   1000: the default schedule is 1000) and the probe is run twice on the same parameters: warm (the
   instance that probed last, starting from its eigenvectors) and cold (a fresh instance). Each probe builds its own operator, so the per-batch linearisation is counted.
   Reported: Hessian-vector products, seconds, and seconds as a multiple of the median training step;
   plus the largest relative difference between the warm and the cold eigenvalues (same accuracy).
2. Presets. ``Monitor(diagnostics=preset)`` for ``--steps`` steps at default schedules. Amortised
   overhead = sum over diagnostics of (mean seconds per probe / schedule) / step time, from the store's
   status table; and the measured wall time of the monitored loop against a plain one over the same steps
   (step 0, where every diagnostic is due, included).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead_curvature.py [--steps 100] [--out F]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diagnostics.metrics.curvature import HessianTop
from diagnostics.metrics.registry import get_diagnostic
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.metrics.context import StepContext
from diagnostics.zoo.registry import get_data, get_loss, get_model


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, batch: Any) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    opt.step()
    return time.perf_counter() - t0


def probe(diag: HessianTop, model: torch.nn.Module, loss_fn: Any, probe_data: list, num_classes: int | None,
          step: int) -> tuple[float, int, torch.Tensor, str]:
    ctx = StepContext(step=step, model=model, loss_fn=loss_fn, batch=probe_data[0], loss=None,
                      probe_data=probe_data, num_classes=num_classes)
    t0 = time.perf_counter()
    out = diag.compute(ctx)
    seconds = time.perf_counter() - t0
    ev = torch.tensor([r.value for r in sorted(out.records, key=lambda r: r.index) if r.metric == "hessian_eigenvalue"])
    return seconds, int(out.num_matvecs or 0), ev, out.status


def hessian_top_costs(label: str, model: torch.nn.Module, loss_fn: Any, batches: list, num_classes: int | None,
                      gaps: list[int]) -> list[dict[str, Any]]:
    """Probe at step 0, then after each gap of training: warm (previous probe's vectors) and cold."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe_data = [batches[0]]
    warm = HessianTop()
    s0, mv0, _, st0 = probe(warm, model, loss_fn, probe_data, num_classes, 0)
    rows = [{"case": label, "step": 0, "gap": "-", "cold_s": s0, "cold_mv": mv0, "warm_s": float("nan"),
             "warm_mv": "-", "status": st0, "k": int(warm.k or num_classes or 10), "max_rel_diff": float("nan")}]
    step = 0
    step_times: list[float] = []
    for gap in gaps:
        for _ in range(gap):
            step_times.append(train_step(model, opt, loss_fn, batches[step % len(batches)]))
            step += 1
        cold_s, cold_mv, cold_ev, cold_st = probe(HessianTop(), model, loss_fn, probe_data, num_classes, step)
        warm_s, warm_mv, warm_ev, warm_st = probe(warm, model, loss_fn, probe_data, num_classes, step)
        rows.append({"case": label, "step": step, "gap": gap, "cold_s": cold_s, "cold_mv": cold_mv, "warm_s": warm_s,
                     "warm_mv": warm_mv, "status": f"{cold_st}/{warm_st}", "k": len(cold_ev),
                     "max_rel_diff": float(((warm_ev - cold_ev).abs() / cold_ev.abs().clamp_min(1e-12)).max())})
    med = statistics.median(step_times)
    for r in rows:
        r["step_s"] = med
    return rows


def preset_overhead(label: str, model: torch.nn.Module, loss_fn: Any, batches: list, preset: str, steps: int,
                    num_classes: int | None, tmp: Path) -> dict[str, Any]:
    base = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    times = [train_step(base, opt, loss_fn, batches[s % len(batches)]) for s in range(steps)]
    plain = time.perf_counter() - t0
    step_s = statistics.median(times)

    mon_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(mon_model.parameters(), lr=1e-3)
    run_dir = tmp / f"{label}-{preset}"
    t0 = time.perf_counter()
    with Monitor(mon_model, loss_fn, run=run_dir, diagnostics=preset, optimizer=opt, num_classes=num_classes) as mon:
        for s in range(steps):
            batch = batches[s % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(mon_model, batch)
            loss.backward()
            mon.step(s, batch, loss)
            opt.step()
    monitored = time.perf_counter() - t0
    run = open_run(run_dir)
    st = run.status()
    per = {}
    for name, g in st.groupby("diagnostic"):
        every = get_diagnostic(name).every
        per[name] = {"probes": len(g), "mean_s": float(g.seconds.mean()), "every": every,
                     "amortised": float(g.seconds.mean()) / every / step_s,
                     "status": ",".join(sorted(set(g.status)))}
    return {"case": label, "preset": preset, "steps": steps, "step_s": step_s, "plain_s": plain,
            "monitored_s": monitored, "per": per, "amortised": sum(p["amortised"] for p in per.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="monitored steps per preset run")
    parser.add_argument("--gaps", type=int, nargs="+", default=[5, 50, 1000],
                        help="training steps between consecutive hessian_top probes")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="overhead-curvature-"))
    cases = [
        ("digits-mlp", get_model("mlp-digits"), get_loss("mlp-digits"), get_data("digits", batch_size=64, num_batches=8), 10),
        ("tiny-gpt", get_model("tiny-gpt"), get_loss("tiny-gpt"), get_data("pydoc-text", batch_size=16, num_batches=8), None),
    ]
    lines = [f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread", ""]
    lines += ["### hessian_top probe: cold vs warm-started (probe data: one training batch)", "",
              "| case | step | steps since last probe | k | cold HVPs | warm HVPs | cold s | warm s | cold / step | "
              "warm / step | max rel. diff warm-cold | status cold/warm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, model, loss_fn, batches, nc in cases:
        rows_for_case = hessian_top_costs(label, model, loss_fn, batches, nc, args.gaps)
        for r in rows_for_case:
            warm = "-" if r["gap"] == "-" else f"{r['warm_s']:.2f}"
            warm_x = "-" if r["gap"] == "-" else f"{r['warm_s'] / r['step_s']:.0f}x"
            diff = "-" if r["gap"] == "-" else f"{r['max_rel_diff']:.1e}"
            lines.append(f"| {label} | {r['step']} | {r['gap']} | {r['k']} | {r['cold_mv']} | {r['warm_mv']} | "
                         f"{r['cold_s']:.2f} | {warm} | {r['cold_s'] / r['step_s']:.0f}x | {warm_x} | {diff} | {r['status']} |")
            print(lines[-1], flush=True)
        last = rows_for_case[-1]
        every = HessianTop.default_every
        lines.append(f"| {label} | steady state at the default schedule (every {every}) | | | | | | | | "
                     f"+{100 * last['warm_s'] / last['step_s'] / every:.0f}% amortised | | |")
    lines += ["", "(step 0: the first probe, cold; it provides the next probe's start vectors. Multiples are of the "
              "median training step of that case.)", ""]
    lines += [f"### presets over {args.steps} steps at default schedules (AdamW)", "",
              "| case | preset | train step ms | plain loop s | monitored loop s | measured overhead | "
              "amortised overhead at default schedules |", "|---|---|---|---|---|---|---|"]
    details = []
    for label, model, loss_fn, batches, nc in cases:
        for preset in ("standard", "full"):
            r = preset_overhead(label, model, loss_fn, batches, preset, args.steps, nc, tmp)
            lines.append(f"| {label} | {preset} | {r['step_s'] * 1e3:.1f} | {r['plain_s']:.1f} | {r['monitored_s']:.1f} | "
                         f"{r['monitored_s'] / r['plain_s']:.1f}x | +{100 * r['amortised']:.0f}% |")
            print(lines[-1], flush=True)
            for name, p in sorted(r["per"].items(), key=lambda kv: -kv[1]["amortised"]):
                details.append(f"| {label} | {preset} | {name} | {p['every']} | {p['probes']} | {p['mean_s'] * 1e3:.1f} | "
                               f"{p['mean_s'] / r['step_s']:.1f}x | +{100 * p['amortised']:.1f}% | {p['status']} |")
    lines += ["", "per diagnostic (mean seconds per probe from the store's status table):", "",
              "| case | preset | diagnostic | every | probes | ms per probe | x step | amortised | status |",
              "|---|---|---|---|---|---|---|---|---|", *details]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
