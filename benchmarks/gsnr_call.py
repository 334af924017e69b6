"""GSNR from the training step, against a plain training step: where its cost goes.

On the digits MLP (64-32-32-10, batch 64, the default) one training step costs about 0.5 ms, so what GSNR
costs there is per-call work: its hooks on the training forward and backward, forming the 8 samples'
gradients, their moments, the two summaries (means and medians per tensor and over all) and the records.
``--model tiny`` and ``--model large`` run the zoo's tiny GPT and the 3.2M GPT of ``gpt_cases.py``
(batch 16), where the moments and summaries of millions of values count too. This runs the Monitor's
sequence (hooks put in before the forward, taken out after the backward, then ``compute``) and,
interleaved, plain training steps of a copy of the model, and prints medians; GSNR's cost is the time
inside its hooks, putting them in and taking them out, and its call:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_call.py [--steps 400] [--model mlp|tiny|large]

With ``benchmarks/run_from_tree.py TREE $PWD/benchmarks/gsnr_call.py`` the same script times another
tree's library (before/after a change).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from diagnostics.gradients import stats
from diagnostics.gradients.training_capture import TrainingStepCapture
from diagnostics.metrics.gradient_stats import GSNRDiagnostic
from diagnostics.tracking import StepContext
from diagnostics.zoo.registry import get_data, get_loss, get_model

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402


def _timed(owner: object, name: str, into: list[float]) -> None:
    """Wrap ``owner.name`` so that each call's seconds are appended to ``into`` (nothing if there is none:
    another tree's library)."""
    f = getattr(owner, name, None)
    if f is None:
        return

    def wrapper(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="timed steps of each kind (after the warm-up steps)")
    ap.add_argument("--model", choices=("mlp", "tiny", "large"), default="mlp")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    if args.model == "mlp":
        model, loss_fn = get_model("mlp-digits"), get_loss("mlp-digits")
        data = get_data("digits", batch_size=64, num_batches=8)
    else:
        model, loss_fn, data = gpt_case(args.model, num_batches=8)
    warmup = 20 if args.model == "mlp" else 3
    plain_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    gsnr = GSNRDiagnostic()
    # Below the size threshold the capture forms the samples' gradients and the moments reduce them; above
    # it (and after the first, checked, run) the capture reduces them itself: to GSNR's ratios (or, in
    # trees from before GSNRReduction, to moments).
    parts: dict[str, list[float]] = {"gradients": [], "moments": [], "gradients to moments": [],
                                     "gradients to ratios": [], "summaries": []}
    _timed(TrainingStepCapture, "gradients", parts["gradients"])
    _timed(stats, "_moments", parts["moments"])
    _timed(TrainingStepCapture, "moments", parts["gradients to moments"])
    _timed(TrainingStepCapture, "reduction", parts["gradients to ratios"])
    _timed(stats.GradientMoments, "summaries", parts["summaries"])
    try:
        from diagnostics.gradients.ratio_reduction import GSNRReduction
    except ImportError:  # another tree's library, from before the reduction
        pass
    else:
        _timed(GSNRReduction, "summaries", parts["summaries"])
    times: dict[str, list[float]] = {"plain step": [], "hooks": [], "hooks in and out": [], "call": []}
    for i in range(args.steps + warmup):
        batch = data[i % len(data)]
        observing = gsnr.observe_training_forward(model, i)
        t0 = time.perf_counter()
        observing.__enter__()
        in_out = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        t0 = time.perf_counter()
        observing.__exit__(None, None, None)
        in_out += time.perf_counter() - t0
        hooks = gsnr.hook_clock.take()
        t0 = time.perf_counter()
        out = gsnr.compute(StepContext(step=i, model=model, loss_fn=loss_fn, batch=batch, loss=None))
        call = time.perf_counter() - t0
        opt.step()
        if out.status != "ok" or gsnr.last_source != "training_step":
            raise SystemExit(f"gsnr did not run from the training step: {out.status} {out.reason} {gsnr.capture_note}")
        t0 = time.perf_counter()
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain_model, batch).backward()
        plain_opt.step()
        plain = time.perf_counter() - t0
        if i >= warmup:
            times["plain step"].append(plain)
            times["hooks"].append(hooks)
            times["hooks in and out"].append(in_out)
            times["call"].append(call)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med.update({f"  of which {k} ({min(len(v), args.steps)} calls)": statistics.median(v[-args.steps:]) * 1e3
                for k, v in parts.items() if v})
    for k, v in med.items():
        print(f"{k:40s} {v:.3f} ms")
    ratio = (med["hooks"] + med["hooks in and out"] + med["call"]) / med["plain step"]
    print(f"GSNR from the training step (hooks, putting them in and taking them out, call) / plain step: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
