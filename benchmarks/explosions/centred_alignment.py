"""Is sign diversity measuring where the input mean lies along v_1? Centred and continuous variants.

For uncentred inputs x the sign of cos(x, v_1) is mostly set by the mean input m: when |m . v_1| is large
against the spread of the inputs along v_1, every token falls on one side and sign diversity is 0 whatever
the weights do. This script trains benchmark configurations (family.py) and, at every step and for every
nn.Linear, computes from the same 256 training tokens and the exact top right singular vector v_1 (full
SVD of the weight):

- ``sd``: sign diversity of cos(x, v_1), the library's statistic (1 - |2 p+ - 1|);
- ``sd_centred``: the same for x - mean(x) (the mean over the 256 tokens);
- ``mean_offset``: |mean(x) . v_1| / std(x . v_1): where the mean lies along v_1, in units of the spread;
- ``t_stat``: |mean(cos)| / (std(cos) / sqrt(n)): a continuous one-sidedness statistic;
- ``log_sigma1``: log of the top singular value.

It then reports, pooled over layers and steps before the explosion: Spearman correlations of (1 - sd)
with ``mean_offset`` (is the sign fraction the mean's position?), and of each statistic at t with the
growth of log sigma_1 over the next 20 steps and over the previous 20 (does it lead or follow?).

Usage: ``python -m benchmarks.explosions.centred_alignment [CONFIG ...] [--seed 0]`` (default: the
attention-logits exploding member, whose seed-0 run explodes at step 392, and the edge-lr pair).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

__all__ = ["record", "main"]

LAG = 20
TOKENS = 256


def _stats(x: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float, float]:
    def diversity(z: torch.Tensor) -> float:
        c = (z @ v1) / z.norm(dim=1).clamp_min(1e-12)
        p = float((c > 0).double().mean())
        return 1.0 - abs(2.0 * p - 1.0)

    proj = x @ v1
    cos = proj / x.norm(dim=1).clamp_min(1e-12)
    sd = diversity(x)
    sd_c = diversity(x - x.mean(0, keepdim=True))
    offset = float(abs(proj.mean()) / proj.std().clamp_min(1e-12))
    t_stat = float(abs(cos.mean()) / (cos.std().clamp_min(1e-12) / math.sqrt(len(cos))))
    return sd, sd_c, offset, t_stat


def record(name: str, seed: int) -> dict[str, np.ndarray]:
    """Train one configuration; per statistic an array [steps, layers] (steps up to the explosion)."""
    from benchmarks.explosions.explosion import explosion_step
    from benchmarks.explosions.family import configs
    from benchmarks.explosions.record import lm_loss
    from benchmarks.explosions.trainer import StopRule, set_learning_rate, setup, update

    cfg = configs()[name].with_seed(seed)
    model, batches, opt = setup(cfg)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    inputs: dict[str, torch.Tensor] = {}

    def hook(n: str):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            inputs[n] = x[:: max(1, x.shape[0] // TOKENS)][:TOKENS].double()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
    rule = StopRule(cfg.stop_after_explosion)
    rows: list[list[tuple[float, ...]]] = []
    prev: dict[str, torch.Tensor] = {}
    try:
        for step, batch in enumerate(batches):
            set_learning_rate(cfg, opt, step)
            loss = lm_loss(model, batch, cfg.z_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            row = []
            for n, m in linears:
                w = m.weight.detach().double()
                x = inputs.get(n)
                if x is None or not torch.isfinite(w).all() or not torch.isfinite(x).all():
                    row.append((math.nan,) * 5)
                    continue
                _, s, vh = torch.linalg.svd(w, full_matrices=False)
                v1 = vh[0]
                if n in prev and torch.dot(prev[n], v1) < 0:
                    v1 = -v1
                prev[n] = v1
                row.append((*_stats(x, v1), math.log(float(s[0]))))
            rows.append(row)
            if rule.stop(step, float(loss.detach())):
                break
            update(cfg, model, opt)
    finally:
        for h in handles:
            h.remove()
    arr = np.array(rows, dtype=float)  # [steps, layers, 5]
    end = explosion_step(rule.losses)
    arr = arr[: end if end is not None else len(arr)]
    keys = ("sd", "sd_centred", "mean_offset", "t_stat", "log_sigma1")
    out = {k: arr[:, :, i] for i, k in enumerate(keys)}
    out["explosion"] = np.array([-1 if end is None else end])
    return out


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    return float(spearmanr(x[ok], y[ok]).statistic) if ok.sum() > 10 else math.nan


def analyse(runs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The pooled Spearman correlations of the module docstring."""
    def stack(fn):
        return np.concatenate([fn(r).ravel() for r in runs])

    res = {"one-sidedness (1 - sd) vs mean offset": _corr(stack(lambda r: 1 - r["sd"]), stack(lambda r: r["mean_offset"])),
           "one-sidedness centred (1 - sd_centred) vs mean offset":
               _corr(stack(lambda r: 1 - r["sd_centred"]), stack(lambda r: r["mean_offset"]))}
    stats = {"1 - sd": lambda r: 1 - r["sd"], "1 - sd_centred": lambda r: 1 - r["sd_centred"],
             "t_stat": lambda r: r["t_stat"], "mean_offset": lambda r: r["mean_offset"]}
    for label, fn in stats.items():
        fwd = stack(lambda r, fn=fn: fn(r)[:-LAG]), stack(lambda r: r["log_sigma1"][LAG:] - r["log_sigma1"][:-LAG])
        rev = stack(lambda r, fn=fn: fn(r)[LAG:]), stack(lambda r: r["log_sigma1"][LAG:] - r["log_sigma1"][:-LAG])
        res[f"{label} vs next {LAG} steps' log sigma_1 growth"] = _corr(*fwd)
        res[f"{label} vs previous {LAG} steps' log sigma_1 growth"] = _corr(*rev)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*",
                        default=["attn-noqk-lr0.4", "edge-nonorm-lr5e-3", "edge-nonorm-lr3.5e-3"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for name in args.configs:
        r = record(name, args.seed)
        e = int(r["explosion"][0])
        print(f"{name} seed {args.seed}: {r['sd'].shape[0]} steps scored, explosion {e if e >= 0 else 'none'}, "
              f"{r['sd'].shape[1]} linear maps", flush=True)
        runs.append(r)
    print("\n| statistic pair | Spearman (pooled over maps and steps) |\n|---|---|")
    for k, v in analyse(runs).items():
        print(f"| {k} | {v:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
