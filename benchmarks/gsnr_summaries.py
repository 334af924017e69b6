"""GSNR's two summaries at GPT-2 small's size, from synthetic moments in GPT-2's tensor layout.

``GradientMoments.summaries`` (the means and medians per tensor and pooled, corrected and raw) on
124,439,808 float64 means and variances laid out as GPT-2 small's parameters, 20,000 of the token
embedding's rows with zero gradient (tokens a batch never saw: their variances are floored, which takes
the raw summary's separate path). No model is built and nothing is downloaded; the per-sample gradients,
which cost more, are not part of this. Prints the best and every time of ``--repeats`` calls (the first
includes the page faults of its temporaries) and the pooled medians, so two trees can be compared
(``benchmarks/run_from_tree.py TREE $PWD/benchmarks/gsnr_summaries.py``):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_summaries.py [--repeats 3]

About 6 GB of memory.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from diagnostics.gradients.stats import GradientMoments

D_MODEL, VOCAB, POSITIONS, LAYERS = 768, 50257, 1024, 12
UNSEEN_TOKENS = 20_000


def gpt2_small_layout() -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 small's parameter names and shapes, in order (Conv1D weights as [in, out])."""
    d = D_MODEL
    layout: list[tuple[str, tuple[int, ...]]] = [("wte", (VOCAB, d)), ("wpe", (POSITIONS, d))]
    for i in range(LAYERS):
        h = f"h.{i}"
        layout += [(f"{h}.ln_1.weight", (d,)), (f"{h}.ln_1.bias", (d,)),
                   (f"{h}.attn.c_attn.weight", (d, 3 * d)), (f"{h}.attn.c_attn.bias", (3 * d,)),
                   (f"{h}.attn.c_proj.weight", (d, d)), (f"{h}.attn.c_proj.bias", (d,)),
                   (f"{h}.ln_2.weight", (d,)), (f"{h}.ln_2.bias", (d,)),
                   (f"{h}.mlp.c_fc.weight", (d, 4 * d)), (f"{h}.mlp.c_fc.bias", (4 * d,)),
                   (f"{h}.mlp.c_proj.weight", (4 * d, d)), (f"{h}.mlp.c_proj.bias", (d,))]
    return layout + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def synthetic_moments(layout: list[tuple[str, tuple[int, ...]]], n: int = 8) -> GradientMoments:
    """Means and variances of N = ``n`` gradients in ``layout``: random, with the unseen tokens' rows zero."""
    total = sum(math.prod(shape) for _, shape in layout)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(total, generator=gen, dtype=torch.float64).mul_(3e-3)
    var = torch.rand(total, generator=gen, dtype=torch.float64).mul_(1e-5)
    mean[: UNSEEN_TOKENS * D_MODEL] = 0.0
    var[: UNSEEN_TOKENS * D_MODEL] = 0.0
    means, variances, at = {}, {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        means[name], variances[name] = mean[at : at + size].view(shape), var[at : at + size].view(shape)
        at += size
    return GradientMoments(mean=means, var=variances, n=n, flat=(mean, var))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    moments = synthetic_moments(gpt2_small_layout())
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        corrected, raw = moments.summaries()
        times.append(time.perf_counter() - t0)
    size = moments.flat[0].numel()
    print(f"P = {size:,}: summaries() best {min(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)} s); "
          f"pooled median corrected {corrected.median['all']:.9g}, raw {raw.median['all']:.9g}; "
          f"wte median raw {raw.median['wte']:.9g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
