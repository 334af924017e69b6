"""How close spectral alignment's in-loop v1 is to the exact top right singular vector of each weight.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explosions/sa_v1_accuracy.py

Trains the demo's two runs (``diagnostics.app.demo``: the tiny GPT, a learning-rate ramp to 0.1 and to
1.0) with ``spectral_alignment`` at every step, and after each step compares the diagnostic's warm-started
v1 (its saved state, a few power steps per probe) with v1 of a full SVD of the same weight:
|cos| per map and probe, beside the gap sigma1 / sigma2 that makes v1 well defined. Prints the share of
probes with |cos| >= 0.99 per run, overall, where the gap exceeds 1.05, and from step 100 on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from diagnostics.app.demo import EXPLODING, STABLE, DemoRun
from diagnostics.metrics.linear_maps import resolve_modules
from diagnostics.tracking import Monitor
from diagnostics.zoo import get_loss, get_model
from diagnostics.zoo.data import char_batches, pydoc_tokens


def measure(cfg: DemoRun, steps: int | None, power_iters: int = 1) -> list[tuple[int, str, float, float]]:
    """``(step, map key, |cos(v1, exact v1)|, sigma1 / sigma2)`` for every map at every step."""
    torch.manual_seed(cfg.seed)
    model = get_model("tiny-gpt", seed=cfg.seed, block_size=cfg.block_size, **cfg.model)
    loss_fn = get_loss("tiny-gpt")
    n = cfg.steps if steps is None else min(steps, cfg.steps)
    batches = char_batches(pydoc_tokens("train"), cfg.batch_size, cfg.block_size, n, seed=cfg.batch_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_at(0), betas=(0.9, cfg.beta2), eps=cfg.eps,
                            weight_decay=0.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Monitor(
        model, loss_fn, run=Path(tmp) / "run", diagnostics=[{"spectral_alignment": {"power_iters": power_iters}}], optimizer=opt, budget=None,
        every={"spectral_alignment": 1},
    ) as monitor:
        sa = monitor.diagnostics[0]
        maps = sa.maps(model)
        modules = resolve_modules(model, maps)
        for step, batch in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)
            saved = sa.state.get("v1", {})
            with torch.no_grad():
                for mp in maps:
                    v = saved.get(mp.key)
                    if v is None:
                        continue
                    W = mp.weight(modules[mp.module_name]).detach().double()
                    _, s, vh = torch.linalg.svd(W, full_matrices=False)
                    cos = abs(float(vh[0] @ v.double() / v.double().norm()))
                    gap = float(s[0] / s[1]) if len(s) > 1 and s[1] > 0 else float("inf")
                    rows.append((step, mp.key, cos, gap))
            opt.step()
            if not torch.isfinite(loss):
                break
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="stop each run after this many steps")
    parser.add_argument("--power-iters", type=int, default=1, help="spectral_alignment's power steps per probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for cfg in (STABLE, EXPLODING):
        rows = measure(cfg, args.steps, args.power_iters)
        cos = np.array([r[2] for r in rows])
        gap = np.array([r[3] for r in rows])
        wide = gap > 1.05
        print(f"{cfg.name}, power_iters={args.power_iters}: {len(rows)} probes ({len({r[1] for r in rows})} maps x {len({r[0] for r in rows})} steps)")
        print(f"  |cos| >= 0.99: {np.mean(cos >= 0.99):.1%} of all probes; {np.mean(cos[wide] >= 0.99):.1%} of the "
              f"{wide.sum()} probes with sigma1/sigma2 > 1.05; |cos| >= 0.9: {np.mean(cos >= 0.9):.1%}")
        print(f"  |cos| quantiles 1% / 5% / 50%: {np.quantile(cos, 0.01):.3f} / {np.quantile(cos, 0.05):.3f} / "
              f"{np.quantile(cos, 0.5):.4f}; gap sigma1/sigma2 median {np.median(gap):.3f}")
        late = np.array([r[0] >= 100 for r in rows])
        if late.any():
            print(f"  from step 100 (where the detector watches): |cos| >= 0.99 on {np.mean(cos[late] >= 0.99):.1%} "
                  f"of {late.sum()} probes, >= 0.9 on {np.mean(cos[late] >= 0.9):.1%}; median gap "
                  f"{np.median(gap[late]):.3f}")
        worst = sorted(rows, key=lambda r: r[2])[:3]
        for step, key, c, g in worst:
            print(f"  worst: step {step} {key}: |cos| {c:.3f}, gap {g:.3f}")


if __name__ == "__main__":
    main()
