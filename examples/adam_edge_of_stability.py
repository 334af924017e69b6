"""Adaptive edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar et al. 2022) of full-batch Adam.

Full-batch Adam (betas 0.9, 0.999; eps 1e-8) on a tanh MLP 64-64-64-10 trained on 500 digits with
Cohen et al.'s squared loss, three learning rates x three initialisation seeds, through the ``Monitor``
and the ``sharpness`` diagnostic. For Adam it records the preconditioned sharpness
``lambda_max(P^{-1/2} H P^{-1/2})``, ``P = diag(sqrt(v_hat) + eps)`` the denominator of the step about to
be taken, and its ratio to the threshold ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38/lr here).

Claim (Cohen et al. 2022): the preconditioned sharpness rises to the threshold and hovers there; the
median ratio after the first upward crossing of 1 (see :func:`upward_crossing`) lies in [0.85, 1.15]
for every run.
Second claim, the same with beta1 = 0 (RMSprop-like Adam, threshold 2/lr): median ratio after the first
crossing in [0.85, 1.15].
Control: the unpreconditioned sharpness lambda_max(H) read against the same threshold is nowhere near 1
(the threshold is about the preconditioned curvature the step sees).

Run (one thread, about 7 minutes on the shared 2-core machine of examples/RESULTS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/adam_edge_of_stability.py
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

TOLERANCE = (0.85, 1.15)


def upward_crossing(steps: list[int], ratios: list[float]) -> int | None:
    """The first probe at or above 1 that follows a probe below 1.

    The ratio starts far above 1: on the first steps ``v_hat`` is built from one or a few gradients, so
    ``P`` is about ``|g|`` and the preconditioned sharpness is huge. It then falls below 1 and, by
    progressive sharpening, rises back; that return is the crossing of Cohen et al. 2022.
    """
    below = False
    for step, r in zip(steps, ratios):
        if r < 1.0:
            below = True
        elif below:
            return step
    return None


def train(lr: float, beta1: float, seed: int, steps: int, every: int, width: int, samples: int,
          run_dir: Path) -> dict:
    """Full-batch Adam at ``lr`` and ``beta1`` (beta2 0.999); the sharpness diagnostic every ``every`` steps."""
    batch = digits("standardized", samples=samples)
    model = mlp(width, depth=2, activation="tanh", seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, 0.999), eps=1e-8)
    sharp = Sharpness(every=every, trace=False, tol=1e-3, max_matvecs=200)
    t0 = time.perf_counter()
    with Monitor(model, squared_loss, run=run_dir, diagnostics=["loss", sharp], optimizer=opt,
                 probe_data=[batch], strict=True) as monitor:
        for step in range(steps + 1):
            opt.zero_grad()
            loss = squared_loss(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
    seconds = time.perf_counter() - t0
    run = open_run(run_dir)
    s = run.series()
    ratio = s[s.metric == "adam_sharpness_ratio"].sort_values("step")
    raw = s[s.metric == "sharpness"].sort_values("step")
    thr = s[s.metric == "adam_threshold"].value
    losses = s[s.metric == "loss"].sort_values("step")
    status = run.status()
    run.close()
    first = upward_crossing(ratio.step.tolist(), ratio.value.tolist())
    after = ratio[ratio.step >= first].value.tolist() if first is not None else []
    st = status[status.diagnostic == "sharpness"]
    return {
        "lr": lr, "beta1": beta1, "seed": seed, "seconds": seconds, "threshold": float(thr.iloc[0]),
        "first_crossing": first, "median_after": median(after),
        # control: the unpreconditioned lambda_max(H) against the same threshold
        "raw_median_after": median((raw[raw.step >= first].value / float(thr.iloc[0])).tolist())
        if first is not None else float("nan"),
        "q10": float(ratio[ratio.step >= first].value.quantile(0.1)) if after else float("nan"),
        "q90": float(ratio[ratio.step >= first].value.quantile(0.9)) if after else float("nan"),
        "loss_start": float(losses.value.iloc[0]), "loss_end": float(losses.value.iloc[-1]),
        "not_converged": int((st.status != "ok").sum()), "probes": len(st),
        "matvecs_median": float(st.num_matvecs.median()),
        "trajectory": list(zip(ratio.step.tolist(), ratio.value.tolist())),
    }


def run(lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3), seeds: tuple[int, ...] = (0, 1, 2),
        beta1_zero_lrs: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3), steps: int = 1000, every: int = 10,
        width: int = 64, samples: int = 500, out: Path | None = None, verbose: bool = True) -> dict:
    out = out or Path(tempfile.mkdtemp(prefix="adam-eos-"))
    say = print if verbose else (lambda *a, **k: None)
    say(f"full-batch Adam, tanh MLP 64-{width}-{width}-10, {samples} digits, squared loss, {steps} steps, "
        f"preconditioned sharpness every {every} steps; runs in {out}")
    results = []
    configs = [(lr, 0.9, seed) for lr in lrs for seed in seeds] + [(lr, 0.0, seed) for lr in beta1_zero_lrs
                                                                  for seed in seeds]
    for lr, beta1, seed in configs:
        r = train(lr, beta1, seed, steps, every, width, samples, out / f"lr{lr:g}-b{beta1:g}-seed{seed}")
        results.append(r)
        traj = "  ".join(f"{st}:{v:.2f}" for st, v in r["trajectory"][:: max(1, len(r["trajectory"]) // 8)])
        say(f"\nlr {lr:g} beta1 {beta1:g} seed {seed}: threshold {r['threshold']:.4g}, loss {r['loss_start']:.4f} -> "
            f"{r['loss_end']:.5f} ({r['seconds']:.0f} s; Lanczos median {r['matvecs_median']:.0f} products per probe, "
            f"{r['not_converged']}/{r['probes']} probes not converged)")
        say(f"  ratio: {traj}")
        say(f"  first upward crossing at step {r['first_crossing']}; median ratio after it {r['median_after']:.3f} "
            f"(10%-90%: {r['q10']:.3f}-{r['q90']:.3f}); control, lambda_max(H) / threshold: {r['raw_median_after']:.2g}")
    lo, hi = TOLERANCE
    checks = [(f"lr {r['lr']:g} beta1 {r['beta1']:g} seed {r['seed']}", r["median_after"],
               r["first_crossing"] is not None and lo <= r["median_after"] <= hi) for r in results]
    say(f"\nsummary: median preconditioned-sharpness ratio after the first crossing (tolerance [{lo}, {hi}])")
    for name, value, ok in checks:
        say(f"  {name:28s} {value:.3f}  {verdict(ok)}")
    say("all checks:", verdict(all(ok for _, _, ok in checks)))
    return {"results": results, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--beta1-zero-lrs", type=float, nargs="*", default=[2.5e-4, 5e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run(tuple(args.lrs), tuple(args.seeds), tuple(args.beta1_zero_lrs), args.steps, args.every, args.width,
        args.samples, args.out)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
