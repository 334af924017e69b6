"""The longest step of a run's first steps under the ``standard`` (or ``full``) preset's budget, with the
first runs of ``hessian_top``, ``sharpness`` (and ``hessian_density``, ``hessian_trace``) cut into slices
(the default) and run whole (``resume=False``), in one process.

The 3.2M-parameter GPT of ``benchmarks/gpt_cases.py`` (``--size large``, 32 x 128 tokens per step, AdamW)
or the zoo's tiny GPT (``--size tiny``); ``Monitor(diagnostics="standard")`` at its default 5% budget.
Per configuration: every step's wall time (training and ``monitor.step``), the slowest steps and what ran
in them, and per probe its calls and the step at which it stored its first numbers (and the step they
describe).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/first_probe_stall.py [--size large] [--steps 40]``
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402
from diagnostics.metrics import get_diagnostic, resolve_diagnostics  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.tracking import Monitor  # noqa: E402

#: The probes whose runs the budget cuts into calls, and the series naming the step a spread run measured.
PROBES = {"hessian_top": "hessian_probe_step", "sharpness": "sharpness_probe_step",
          "hessian_density": "hessian_density_probe_step", "hessian_trace": "hessian_trace_probe_step"}


def run(model: torch.nn.Module, loss_fn, batches: list, steps: int, resume: bool, out: Path,
        preset: str = "standard") -> dict:
    """Train ``steps`` steps under ``preset``; per-step seconds and each probe's first result."""
    diags = [get_diagnostic(d.name, resume=False) if d.name in PROBES and not resume else d
             for d in resolve_diagnostics(preset)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds = []
    with Monitor(model, loss_fn, run=out, diagnostics=diags, optimizer=opt, budget=0.05) as monitor:
        for step in range(steps):
            t0 = time.perf_counter()
            batch = batches[step % len(batches)]
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
            seconds.append(time.perf_counter() - t0)
    store = open_run(out)
    status = store.status()
    ran = {s: sorted(status[status.step == s].diagnostic) for s in range(steps)}
    probes = {}
    for name, probe_step in PROBES.items():
        calls = status[status.diagnostic == name].sort_values("step")
        ended = calls[calls.status.isin(("ok", "not_converged"))]
        first = int(ended.step.iloc[0]) if len(ended) else None
        described = first
        spread = store.series(probe_step)
        if first is not None and len(spread[spread.step == first]):
            described = int(spread[spread.step == first].value.iloc[0])
        first_calls = list(calls.step[calls.step <= first]) if first is not None else list(calls.step)
        probes[name] = {"first": first, "described": described, "calls": first_calls}
    return {"seconds": seconds, "ran": ran, "probes": probes}


def _first(p: dict) -> str:
    calls = p["calls"]
    span = f"{len(calls)} (steps {calls[0]}-{calls[-1]})" if calls else "0"
    return f"{span}, ok at {p['first']} ({p['described']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "large"), default="large")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", choices=("standard", "full"), default="standard",
                    help="full adds hessian_density and hessian_trace (both cut too)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base, loss_fn, batches = gpt_case(args.size, num_batches=4, batch_size=32 if args.size == "large" else 16)
    print(f"Machine: torch {torch.__version__}, threads 1; model {args.size}, "
          f"{sum(p.numel() for p in base.parameters())} parameters, {args.steps} steps")
    print("Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/first_probe_stall.py "
          f"--size {args.size} --steps {args.steps} --preset {args.preset}`\n")
    print("| probes | median step (s) | slowest steps (s, step: what ran) | hessian_top's first run: calls, "
          "ended at (describes) | sharpness's first run: calls, ended at (describes) | hessian_density's first run | "
          "hessian_trace's first run |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for resume in (True, False):
            res = run(copy.deepcopy(base), loss_fn, batches, args.steps, resume, Path(tmp) / f"r{resume}",
                      args.preset)
            secs = res["seconds"]
            order = sorted(range(len(secs)), key=lambda s: -secs[s])[:3]
            slow = "; ".join(f"{secs[s]:.1f} (step {s}: {', '.join(n for n in res['ran'][s] if n not in _CHEAP)})"
                             for s in order)
            median = sorted(secs)[len(secs) // 2]
            print(f"| {'sliced (resume=True)' if resume else 'whole (resume=False)'} | {median:.2f} | {slow} | "
                  f"{_first(res['probes']['hessian_top'])} | {_first(res['probes']['sharpness'])} | "
                  f"{_first(res['probes']['hessian_density'])} | {_first(res['probes']['hessian_trace'])} |",
                  flush=True)
    return 0


#: Every-step diagnostics left out of the "what ran" column.
_CHEAP = {"loss", "learning_rate", "grad_norm", "weight_norm", "update_norm", "nonfinite", "explosion_detector",
          "spectral_alignment", "output_logits", "attention_stats", "adam_state"}


if __name__ == "__main__":
    raise SystemExit(main())
