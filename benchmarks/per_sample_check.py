"""The reference of the layer-wise per-sample gradients' one-time check: each sample alone, against vmap.

``per_sample_gradients(method="auto")`` checks its first layer-wise result once per model, parameter
selection and batch layout against the first two samples' gradients taken another way: each sample's own
forward and ``torch.autograd.grad`` (the current reference), or ``torch.func.vmap(grad)`` over them. This
times both on the same two samples, alternating, on GPT-2 small (``--model gpt2``, random weights, nothing
downloaded) or the zoo's tiny GPT (``--model tiny``), and says whether they agree:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/per_sample_check.py [--model gpt2] [--rounds 2]

``--agreement`` times the comparison itself instead (``gradients_agree`` on two samples' gradients of GPT-2
small's shapes, synthetic); with ``benchmarks/run_from_tree.py TREE`` it times another tree's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from diagnostics._batch import slice_batch
from diagnostics.gradients import per_sample as per_sample_module
from diagnostics.loss import select_params

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt2_small_case, gpt_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("gpt2", "tiny"), default="gpt2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--agreement", action="store_true", help="time gradients_agree alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.agreement:
        return agreement(args.rounds)
    if args.model == "gpt2":
        model, loss_fn, data = gpt2_small_case(4, 128, 1)
    else:
        model, loss_fn, data = gpt_case("tiny", num_batches=1)
    batch = slice_batch(data[0], 2)
    selected = select_params(model, None)
    print(f"{args.model}: P = {sum(p.numel() for p in selected.values()):,}, 2 samples, 1 thread")
    def alone() -> dict[str, torch.Tensor] | None:
        return per_sample_module._looped(model, loss_fn, batch, selected, 0, 2)

    def vmap() -> dict[str, torch.Tensor]:
        return per_sample_module._vmapped(model, loss_fn, batch, selected, None, "eval", 0, 2)

    alone(), vmap()  # warm-up: first-call costs of both
    for r in range(args.rounds):
        seconds, got = {}, {}
        for name, fn in (("alone", alone), ("vmap", vmap))[:: 1 if r % 2 == 0 else -1]:  # alternating order
            t0 = time.perf_counter()
            got[name] = fn()
            seconds[name] = time.perf_counter() - t0
        agree = got["alone"] is not None and per_sample_module.gradients_agree(got["alone"], got["vmap"])
        print(f"round {r}: each sample alone {seconds['alone']:.3f} s, vmap {seconds['vmap']:.3f} s, "
              f"agree {agree}", flush=True)
    return 0


def agreement(rounds: int) -> int:
    """Seconds of ``gradients_agree`` on two samples' gradients shaped like GPT-2 small's weights."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(50257, 768)] + [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
    ref = {f"p{i}": torch.randn(2, *shape, generator=gen) for i, shape in enumerate(shapes)}
    near = {k: v + 1e-6 for k, v in ref.items()}
    print(f"gradients_agree, 2 samples of {sum(v[0].numel() for v in ref.values()):,} values")
    for r in range(rounds):
        t0 = time.perf_counter()
        same = per_sample_module.gradients_agree(near, ref)
        print(f"round {r}: {time.perf_counter() - t0:.2f} s, agree {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
