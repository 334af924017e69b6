"""Edge of stability of full-batch gradient descent (Cohen, Kaur, Li, Kolter, Talwalkar 2021), with a control.

Full-batch GD on a tanh MLP 64-200-200-10 (width 200) trained on 1000 digits with Cohen et al.'s squared
loss, three initialisation seeds, through the ``Monitor`` and the ``sharpness`` diagnostic (warm-started
top-1 Lanczos on the Hessian of the training loss). Sharpness is probed every ``--every`` steps and at
*every* step of the last ``--tail`` steps, so both parities of GD's period-two oscillation at the edge are
seen: the ratio ``lambda_max * lr / 2`` read only at even (or only at odd) steps could sit on one side of 1.

Claim (Cohen et al. 2021): sharpness rises until ``lambda_max = 2 / lr`` and then hovers there; the
median of ``lambda_max * lr / 2`` after the first crossing, over all probes and over the even and the odd
tail steps separately, lies in [0.9, 1.2] (the acceptance of the width-64 example, edge_of_stability.py).
Control: at a step size 5 times smaller the ratio stays below 0.9 over the same number of steps
(sharpness still rises, but 2/lr is out of reach).

Run (one thread, about 3.5 minutes on the shared 2-core machine of examples/RESULTS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/edge_of_stability_gd.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import digits, median, mlp, squared_loss, verdict  # noqa: E402

from diagnostics.metrics.sharpness import Sharpness  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.tracking import Monitor  # noqa: E402

TOLERANCE = (0.9, 1.2)
CONTROL_MAX = 0.9


def train(lr: float, seed: int, steps: int, every: int, tail: int, width: int, samples: int, run_dir: Path) -> dict:
    """Full-batch GD at ``lr``; sharpness every ``every`` steps and at every step of the last ``tail``."""
    batch = digits("standardized", samples=samples)
    model = mlp(width, depth=2, activation="tanh", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    with Monitor(model, squared_loss, run=run_dir, diagnostics=["loss", Sharpness(every=1, trace=False, tol=1e-4)],
                 optimizer=opt, probe_data=[batch], strict=True) as monitor:
        for step in range(steps + 1):
            opt.zero_grad()
            loss = squared_loss(model, batch)
            loss.backward()
            if step % every == 0 or step > steps - tail:
                monitor.step(step, batch, loss)
            opt.step()
    seconds = time.perf_counter() - t0
    run = open_run(run_dir)
    s = run.series()
    ratio = s[s.metric == "sharpness_ratio"].sort_values("step")
    lam = s[s.metric == "sharpness"].sort_values("step")
    losses = s[s.metric == "loss"].sort_values("step")
    status = run.status()
    run.close()
    crossed = ratio[ratio.value >= 1.0]
    first = int(crossed.step.iloc[0]) if len(crossed) else None
    after = ratio[ratio.step >= first] if first is not None else ratio.iloc[:0]
    tail_rows = ratio[ratio.step > steps - tail]
    return {
        "lr": lr, "seed": seed, "seconds": seconds, "first_crossing": first,
        "max_ratio": float(ratio.value.max()),
        "sharpness_start": float(lam.value.iloc[0]), "sharpness_end": float(lam.value.iloc[-1]),
        "median_after": median(after.value.tolist()),
        "median_even": median(tail_rows[tail_rows.step % 2 == 0].value.tolist()),
        "median_odd": median(tail_rows[tail_rows.step % 2 == 1].value.tolist()),
        "tail_min": float(tail_rows.value.min()), "tail_max": float(tail_rows.value.max()),
        "loss_start": float(losses.value.iloc[0]), "loss_end": float(losses.value.iloc[-1]),
        "not_converged": int((status[status.diagnostic == "sharpness"].status != "ok").sum()),
        "probes": len(ratio),
        "trajectory": list(zip(ratio.step.tolist(), ratio.value.tolist())),
    }


def run(lr: float = 0.25, control_lr: float = 0.05, seeds: tuple[int, ...] = (0, 1, 2), steps: int = 1200,
        every: int = 20, tail: int = 60, width: int = 200, samples: int = 1000, out: Path | None = None,
        verbose: bool = True) -> dict:
    """Train every seed at ``lr`` and one control at ``control_lr``; returns the results and the verdicts."""
    out = out or Path(tempfile.mkdtemp(prefix="eos-gd-"))
    say = print if verbose else (lambda *a, **k: None)
    say(f"full-batch GD, tanh MLP 64-{width}-{width}-10, {samples} digits, squared loss; lr {lr} "
        f"(2/lr = {2 / lr:.3g}), control lr {control_lr}; probes every {every} steps and every step of the "
        f"last {tail}; runs in {out}")
    results = []
    for seed in seeds:
        r = train(lr, seed, steps, every, tail, width, samples, out / f"lr{lr}-seed{seed}")
        results.append(r)
        say(f"\nseed {seed}: loss {r['loss_start']:.4f} -> {r['loss_end']:.4f}, sharpness {r['sharpness_start']:.2f} -> "
            f"{r['sharpness_end']:.2f} ({r['seconds']:.0f} s, "
            f"{r['probes']} probes, not converged {r['not_converged']})")
        say("  " + "  ".join(f"{st}:{v:.3f}" for st, v in r["trajectory"][:: max(1, len(r["trajectory"]) // 10)]))
        say(f"  first ratio >= 1 at step {r['first_crossing']}; median after it {r['median_after']:.3f}; last "
            f"{tail} steps: even {r['median_even']:.3f}, odd {r['median_odd']:.3f}, range "
            f"{r['tail_min']:.3f}-{r['tail_max']:.3f}")
    control = train(control_lr, seeds[0], steps, every, tail, width, samples, out / f"control-lr{control_lr}")
    say(f"\ncontrol lr {control_lr} (2/lr = {2 / control_lr:.3g}), seed {seeds[0]}: loss "
        f"{control['loss_start']:.4f} -> {control['loss_end']:.4f}, sharpness {control['sharpness_start']:.2f} -> "
        f"{control['sharpness_end']:.2f}; largest ratio {control['max_ratio']:.3f} "
        f"({control['seconds']:.0f} s)")
    lo, hi = TOLERANCE
    checks = []
    for r in results:
        for what in ("median_after", "median_even", "median_odd"):
            checks.append((f"seed {r['seed']} {what}", r[what], lo <= r[what] <= hi))
    checks.append(("control largest ratio", control["max_ratio"], control["max_ratio"] < CONTROL_MAX))
    say(f"\nsummary (tolerance: medians in [{lo}, {hi}], control below {CONTROL_MAX})")
    for name, value, ok in checks:
        say(f"  {name:28s} {value:.3f}  {verdict(ok)}")
    say("all checks:", verdict(all(ok for _, _, ok in checks)))
    return {"results": results, "control": control, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.25)
    parser.add_argument("--control-lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--tail", type=int, default=60)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run(args.lr, args.control_lr, tuple(args.seeds), args.steps, args.every, args.tail, args.width, args.samples,
        args.out)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
