"""Edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar 2021) reproduced through the Monitor.

Full-batch gradient descent on a tanh MLP (64-64-64-10) trained on 1000 digits with the squared loss on
one-hot targets, ``L = (1/N) sum_i 0.5 ||f(x_i) - e_{y_i}||^2``, at three step sizes. The ``sharpness``
diagnostic (warm-started Lanczos on the Hessian of the training loss, which here is also the probe data)
records ``lambda_max * lr / 2`` every ``--every`` steps. Sharpness rises during training (progressive
sharpening) until it reaches ``2 / lr`` and then hovers there. For each step size the script prints the
first step where the ratio reaches 1 and the median ratio from that step on (Cohen et al.: about 1).

Run (one thread, about 2 minutes on a laptop core)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/edge_of_stability.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from diagnostics.metrics.sharpness import Sharpness
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo import get_model
from diagnostics.zoo.data import digits_arrays


def squared_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cohen et al.'s MSE: half the squared error on one-hot targets, summed over classes, mean over samples."""
    x, y = batch
    target = torch.nn.functional.one_hot(y, 10).to(x.dtype)
    return 0.5 * (model(x) - target).square().sum(1).mean()


def train(lr: float, steps: int, every: int, run_dir: Path, samples: int) -> dict:
    """Full-batch GD at step size ``lr`` with the sharpness diagnostic; returns the run's summary."""
    x, y = digits_arrays("train")
    batch = (x[:samples], y[:samples])
    model = get_model("mlp-digits", hidden=(64, 64), activation="tanh", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sharp = Sharpness(every=every, trace=False, tol=1e-3)
    t0 = time.perf_counter()
    with Monitor(model, squared_loss, run=run_dir, diagnostics=["loss", sharp], optimizer=opt,
                 probe_data=[batch], num_classes=10, strict=True) as monitor:
        for step in range(steps + 1):
            opt.zero_grad()
            loss = squared_loss(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
    seconds = time.perf_counter() - t0
    run = open_run(run_dir)
    series = run.series()
    ratio = series[series.metric == "sharpness_ratio"].sort_values("step")
    lam = series[series.metric == "sharpness"].sort_values("step")
    losses = series[series.metric == "loss"].sort_values("step")
    status = run.status()
    status = status[status.diagnostic == "sharpness"]
    events = run.events()
    crossed = ratio[ratio.value >= 1.0]
    first = int(crossed.step.iloc[0]) if len(crossed) else None
    after = ratio[ratio.step >= first].value.tolist() if first is not None else []
    return {
        "lr": lr,
        "threshold": 2.0 / lr,
        "first_crossing": first,
        "median_after": statistics.median(after) if after else float("nan"),
        "q10_q90_after": (float(ratio[ratio.step >= first].value.quantile(0.1)),
                          float(ratio[ratio.step >= first].value.quantile(0.9))) if after else None,
        "sharpness_start": float(lam.value.iloc[0]),
        "sharpness_end": float(lam.value.iloc[-1]),
        "loss_start": float(losses.value.iloc[0]),
        "loss_end": float(losses.value.iloc[-1]),
        "probes": len(ratio),
        "matvecs_first": int(status.num_matvecs.iloc[0]),
        "matvecs_median": float(status.num_matvecs.median()),
        "not_converged": int((status.status != "ok").sum()),
        "events": len(events[events.kind == "edge_of_stability"]),
        "seconds": seconds,
        "trajectory": list(zip(ratio.step.tolist(), lam.value.tolist(), ratio.value.tolist())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1 / 3, 0.25])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=10, help="steps between sharpness probes")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="directory for the run stores (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="eos-"))
    print(f"full-batch GD, tanh MLP 64-64-64-10, {args.samples} digits, MSE on one-hot targets; runs in {out}")
    results = []
    for lr in args.lrs:
        r = train(lr, args.steps, args.every, out / f"lr{lr:.4g}", args.samples)
        results.append(r)
        print(f"\nlr={lr:.4g}  2/lr={r['threshold']:.3g}  loss {r['loss_start']:.4f} -> {r['loss_end']:.4f}  "
              f"({r['seconds']:.0f} s)")
        print("  step  sharpness  ratio")
        for step, lam, ratio in r["trajectory"][:: max(1, len(r["trajectory"]) // 12)]:
            print(f"  {step:5d}  {lam:9.3f}  {ratio:5.3f}")
        print(f"  sharpness {r['sharpness_start']:.3f} -> {r['sharpness_end']:.3f}; first ratio >= 1 at step "
              f"{r['first_crossing']}; edge_of_stability events: {r['events']}")
        print(f"  Lanczos products per probe: {r['matvecs_first']} cold (first probe), median "
              f"{r['matvecs_median']:.0f} warm-started; probes not converged: {r['not_converged']}/{r['probes']}")
    print("\nsummary: median of lambda_max * lr / 2 after the first crossing (acceptance: in [0.9, 1.2])")
    ok = True
    for r in results:
        inside = 0.9 <= r["median_after"] <= 1.2
        ok &= inside
        q = r["q10_q90_after"]
        spread = f"  (10%-90%: {q[0]:.3f}-{q[1]:.3f})" if q else ""
        print(f"  lr={r['lr']:.4g}: crossing at step {r['first_crossing']}, median ratio {r['median_after']:.3f}"
              f"{spread}  {'PASS' if inside else 'FAIL'}")
    print("all step sizes at the edge of stability:", "yes" if ok else "no")


if __name__ == "__main__":
    main()
