"""Overhead of in-loop monitoring: training-step time with and without the Monitor.

Cases (``--model-size tiny``, the default): the zoo's tiny GPT (2 layers, d_model 64, batches of 16 x 64
tokens, 116k parameters) and the digits MLP (batches of 64). ``--model-size large``: one zoo TinyGPT of
4 layers, d_model 256, 4 heads, block 128, batches of 16 x 128 tokens (3.2M parameters), where the
Monitor's per-step cost, fixed rather than proportional to the model, is a smaller share of a longer
step. Configurations, each on its own copy of the same model and optimizer, timed in interleaved
blocks so that machine load drifts hit all of them alike:

* ``baseline``: plain loop;
* ``cheap``: ``Monitor(diagnostics="cheap")``, every diagnostic every step (per-parameter norms every
  10 steps, "all" every step: the preset's defaults); overhead = ratio of medians;
* ``standard``: ``Monitor(diagnostics="standard", budget=None)`` at its fixed schedules (expensive
  ones every 50 steps); amortised overhead = ratio of means over whole 50-step blocks, so the due steps
  count;
* ``standard-budget``: ``Monitor(diagnostics="standard")`` with its default overhead budget (5%): the
  scheduler decides when each probe runs. Its early phase (every probe's first two runs, outside the
  budget by design) is spent in a longer warm-up (``--budget-warmup`` steps, reported separately); its
  steps then keep counting, and the amortised overhead is the ratio of means over all timed steps;
* ``trainscope``: PyPI ``trainscope`` with its default config (tiny GPT only, not the large one),
  when installed;
* ``baseline-b`` (``--control``): a second plain copy. Its "overhead" against ``baseline`` is the spread
  between two copies of the same model doing the same work in one process (where each copy's memory
  lies moves its step time), the floor under every other configuration's figure;
* ``cheap, paired`` (``--paired``): the ``cheap`` copy also runs unmonitored blocks, alternating with its
  monitored ones (monitored first in odd rounds, second in even ones), and its overhead is taken against
  its own unmonitored blocks, so the copies' spread cancels. ``cheap`` keeps no hooks between its calls,
  so an unmonitored block runs exactly the plain loop.

Wall time and process CPU time are both reported: on a shared, oversubscribed machine every system call
(a SQLite commit) can cost a scheduler time slice, which CPU time does not count.

It also times one GSNR evaluation (per-sample gradients, layer by layer or by vmap, plus the statistics)
against one training step. Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py
[--model-size tiny|large] [--rounds 3] [--out F]`` (large: a 0.4 s CPU step; ``--rounds 2`` takes about
5 minutes on one core).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diagnostics.tracking import Monitor, StepContext
from diagnostics.zoo.models import TinyGPT
from diagnostics.zoo.registry import get_data, get_loss, get_model

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import LARGE_GPT  # noqa: E402

BLOCK = 50  # steps per timed block; the standard preset's expensive diagnostics are due once per block

LARGE_BATCH = 16


class Runner:
    """One configuration: its own model/optimizer copy, stepping through the shared batches."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Any, batches: list[Any], tmp: Path) -> None:
        # name "standard-budget": the standard preset at its default budget (the scheduler's choice).
        self.name = name
        self.model = copy.deepcopy(model)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.loss_fn = loss_fn
        self.batches = batches
        self.step_idx = 0
        self.times: list[float] = []
        self.cpu: list[float] = []
        # the timed steps of unmonitored blocks (``--paired``), kept apart
        self.plain_times: list[float] = []
        self.plain_cpu: list[float] = []
        self.monitor = None
        self.scope = None
        self.error: str | None = None
        if name in ("cheap", "standard"):
            # Fixed schedules: the 50-step blocks below assume them (the standard preset's budget would not).
            self.monitor = Monitor(self.model, loss_fn, run=tmp / name, diagnostics=name, optimizer=self.opt,
                                   budget=None)
        elif name == "standard-budget":
            self.monitor = Monitor(self.model, loss_fn, run=tmp / name, diagnostics="standard", optimizer=self.opt)
            # The budget measures training time between the Monitor's calls; the other configurations' blocks
            # run in between here, which a real run does not have. Its clock stops while they run.
            self.monitor._budget._clock = self.clock
        elif name == "trainscope":
            self.scope = make_trainscope(self.model, self.opt, tmp / "trainscope")
        self.paused = 0.0
        self.block_end: float | None = None

    def clock(self) -> float:
        """Seconds of this configuration's own blocks (perf_counter less the time between its blocks)."""
        return time.perf_counter() - self.paused

    def block(self, n: int, monitored: bool = True) -> None:
        if self.block_end is not None:
            self.paused += time.perf_counter() - self.block_end
        self._steps(n, monitored)
        self.block_end = time.perf_counter()

    def _steps(self, n: int, monitored: bool) -> None:
        for _ in range(n):
            batch = self.batches[self.step_idx % len(self.batches)]
            c0 = time.process_time()
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model, batch)
            loss.backward()
            if not monitored:
                pass
            elif self.monitor is not None:
                self.monitor.step(self.step_idx, batch, loss)
            elif self.scope is not None:
                self.scope.step(loss.item())
            self.opt.step()
            times, cpu = (self.times, self.cpu) if monitored else (self.plain_times, self.plain_cpu)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            self.step_idx += 1

    def warm_up(self, budget_warmup: int, warm: int = 5) -> None:
        """The steps before the timed blocks: ``budget_warmup`` monitored ones for the budgeted run (every
        probe's first runs), else unmonitored steps to the same point of training and ``warm`` monitored."""
        if self.name == "standard-budget":
            self.block(budget_warmup)
            return
        if budget_warmup > warm:
            # Every model reaches the same point of training before the timed blocks (the budgeted run's
            # warm-up is longer): step times move as training goes on.
            self.block(budget_warmup - warm, monitored=False)
            self.step_idx = 0  # the monitored steps count from 0, as in the budgeted run
        self.block(warm)

    def start_timing(self) -> None:
        """Forget the warm-up's times; start each timed block at a multiple of BLOCK so every block holds
        exactly one standard due step (the budgeted run's steps keep counting)."""
        for timed in (self.times, self.cpu, self.plain_times, self.plain_cpu):
            timed.clear()
        if self.name != "standard-budget":
            self.step_idx = BLOCK

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        if self.scope is not None:
            try:
                self.scope.detach()
            except Exception:  # noqa: BLE001 - teardown of a third-party tool must not hide our figures
                pass


def make_trainscope(model: torch.nn.Module, opt: Any, run_dir: Path) -> Any:
    from trainscope import TrainScope, TrainScopeConfig

    cfg = TrainScopeConfig(run_dir=str(run_dir))
    return TrainScope(model, opt, cfg).attach()


def trainscope_available() -> str | None:
    try:
        import trainscope  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"trainscope not importable: {type(exc).__name__}: {exc} (install: .venv/bin/pip install trainscope torch==2.13.0)"
    return None


#: The configurations a case times by default (``--configs`` chooses among them).
CONFIGS = ("baseline", "cheap", "standard", "standard-budget")


def _overheads(times: list[float], cpu: list[float], times0: list[float], cpu0: list[float]) -> dict[str, float]:
    """Medians and means of one configuration's steps and their overheads against the reference steps."""
    med, mean, cmed, cmean = (statistics.median(times), statistics.fmean(times), statistics.median(cpu),
                              statistics.fmean(cpu))
    return {
        "median_ms": med * 1e3,
        "mean_ms": mean * 1e3,
        "median_overhead_pct": 100 * (med / statistics.median(times0) - 1),
        "mean_overhead_pct": 100 * (mean / statistics.fmean(times0) - 1),
        "cpu_median_ms": cmed * 1e3,
        "cpu_median_overhead_pct": 100 * (cmed / statistics.median(cpu0) - 1),
        "cpu_mean_overhead_pct": 100 * (cmean / statistics.fmean(cpu0) - 1),
    }


def time_case(label: str, model: torch.nn.Module, loss_fn: Any, batches: list[Any], rounds: int, with_trainscope: bool,
              budget_warmup: int = 0, configs: tuple[str, ...] = CONFIGS, control: bool = False,
              paired: bool = False) -> dict[str, Any]:
    """Time the configurations in ``configs`` (``standard-budget`` only with ``budget_warmup`` > 0), plus
    ``baseline-b`` with ``control`` and the cheap copy's unmonitored blocks with ``paired`` (see the module
    docstring), in ``rounds`` interleaved blocks of :data:`BLOCK` steps. Returns the case's label, one row of
    figures per configuration, notes and the timed steps per configuration."""
    tmp = Path(tempfile.mkdtemp(prefix="tdiag-overhead-"))
    names = [n for n in CONFIGS if n in configs and (n != "standard-budget" or budget_warmup > 0)]
    if "baseline" not in names:
        names.insert(0, "baseline")
    if control:
        names.insert(1, "baseline-b")
    notes: list[str] = []
    if with_trainscope:
        why = trainscope_available()
        if why is None:
            names.append("trainscope")
        else:
            notes.append(why)
    runners = []
    for n in names:
        try:
            runners.append(Runner(n, model, loss_fn, batches, tmp))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{n} could not start: {type(exc).__name__}: {exc}")
    for r in runners:
        try:
            r.warm_up(budget_warmup)
        except Exception as exc:  # noqa: BLE001
            r.error = f"{type(exc).__name__}: {exc}"
            notes.append(f"{r.name} failed during warm-up: {r.error}")
    runners = [r for r in runners if r.error is None]
    for r in runners:
        if r.name == "standard-budget":
            med = statistics.median(r.cpu)
            notes.append(f"standard-budget warm-up (steps 0-{budget_warmup - 1}, every probe's first runs): "
                         f"CPU mean {1e3 * statistics.fmean(r.cpu):.1f} ms, median {1e3 * med:.1f} ms, "
                         f"slowest step {1e3 * max(r.cpu):.1f} ms")
        r.start_timing()
    for i in range(rounds):
        for r in runners:
            if paired and r.name == "cheap":
                # monitored and unmonitored blocks of the same copy, in alternating order (drifts cancel)
                for monitored in ((True, False) if i % 2 == 0 else (False, True)):
                    r.block(BLOCK, monitored=monitored)
            else:
                r.block(BLOCK)
        print(f"[{label}] round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
    for r in runners:
        r.close()
    base = next(r for r in runners if r.name == "baseline")
    rows = {r.name: _overheads(r.times, r.cpu, base.times, base.cpu) for r in runners}
    cheap = next((r for r in runners if r.name == "cheap"), None)
    if paired and cheap is not None:
        rows["cheap, paired"] = _overheads(cheap.times, cheap.cpu, cheap.plain_times, cheap.plain_cpu)
        # Round by round (a monitored block against the unmonitored block next to it): the pairs' spread.
        per_round = [100 * (statistics.fmean(cheap.cpu[i * BLOCK:(i + 1) * BLOCK])
                            / statistics.fmean(cheap.plain_cpu[i * BLOCK:(i + 1) * BLOCK]) - 1) for i in range(rounds)]
        notes.append("cheap, paired, CPU means round by round: " + ", ".join(f"{x:+.1f}%" for x in per_round))
        rows["cheap, unmonitored blocks"] = _overheads(cheap.plain_times, cheap.plain_cpu, base.times, base.cpu)
        notes.append("cheap, paired: its monitored blocks against its own unmonitored blocks (same copy); "
                     "cheap, unmonitored blocks: the cheap copy's plain steps against baseline's, the copies' spread")
    if control:
        notes.append("baseline-b: a second plain copy against baseline, the spread between copies of one process")
    budgeted = next((r for r in runners if r.name == "standard-budget"), None)
    if budgeted is not None:
        notes.append(own_accounting(tmp / "standard-budget", budgeted.step_idx))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"label": label, "rows": rows, "notes": notes, "steps": rounds * BLOCK}


def own_accounting(run_dir: Path, last_step: int) -> str:
    """The budgeted Monitor's own measure of its overhead (``monitor_overhead``: its time over the training
    time of the last 200 or more steps, the window the budget holds), at the end of the timed blocks.

    It times the Monitor's own calls and the hooks its diagnostics keep on the training forward
    (spectral alignment's and the output logits'), not the rest of the user's step, so it does not see
    differences between the model copies of the configurations, which on this machine move the step
    time by several percent either way (a configuration doing more work can measure faster than the
    baseline).
    """
    from diagnostics.store import open_run

    with open_run(run_dir) as run:
        s = run.series("monitor_overhead")
        stride = run.series("monitor_stride")
    if len(s) == 0:
        return "standard-budget: no monitor_overhead recorded"
    last = s.iloc[-1]
    spacing = ""
    if len(stride):
        late = stride[stride.step >= stride.step.max() - 200].value
        spacing = (f"; every-step diagnostics every {int(late.min())}-{int(late.max())} steps over the last "
                   "200 (monitor_stride)")
    return (f"standard-budget's own accounting at step {int(last['step'])} of {last_step}: monitor time / training "
            f"time over the last 200 or more steps (monitor_overhead) = {100 * float(last['value']):.1f}%{spacing}")


def time_gsnr(model: torch.nn.Module, loss_fn: Any, batches: list[Any], repeats: int) -> dict[str, Any]:
    """Median seconds of one GSNR evaluation by its own pass and from the training step, and of one
    training step, interleaved.

    From the training step, the cost is what the Monitor spends on it: the seconds inside its hooks on the
    training forward and backward (its hook clock), putting them in and taking them out, and its call; the hooked step's own median is
    reported beside the plain step's as a check. Where the training step cannot be used, that column is
    the own pass again and ``source`` says so.
    """
    from diagnostics.metrics.gradient_stats import GSNRDiagnostic

    own_model, step_model = copy.deepcopy(model), copy.deepcopy(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (own_model, step_model)]
    own, from_step = GSNRDiagnostic(from_training_step=False), GSNRDiagnostic()
    times: dict[str, list[float]] = {"step": [], "own": [], "hooked_step": [], "from_step": []}

    for i in range(repeats + 2):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        opts[0].zero_grad(set_to_none=True)
        loss_fn(own_model, batch).backward()
        opts[0].step()
        t_step = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = own.compute(StepContext(step=i, model=own_model, loss_fn=loss_fn, batch=batch, loss=None))
        t_own = time.perf_counter() - t0
        # Held over the forward and backward as the Monitor holds it; the Monitor's call comes before the
        # optimizer step.
        observing = from_step.observe_training_forward(step_model, i)
        t0 = time.perf_counter()
        observing.__enter__()
        t_in_out = time.perf_counter() - t0
        t0 = time.perf_counter()
        opts[1].zero_grad(set_to_none=True)
        loss_fn(step_model, batch).backward()
        t_hooked = time.perf_counter() - t0
        t0 = time.perf_counter()
        observing.__exit__(None, None, None)
        t_in_out += time.perf_counter() - t0
        hooks = from_step.hook_clock.take() + t_in_out
        t0 = time.perf_counter()
        out2 = from_step.compute(StepContext(step=i, model=step_model, loss_fn=loss_fn, batch=batch, loss=None))
        t_call = time.perf_counter() - t0
        t0 = time.perf_counter()
        opts[1].step()
        t_hooked += time.perf_counter() - t0
        for o in (out, out2):
            if o.status == "failed":
                raise RuntimeError(f"gsnr failed: {o.reason}")
        if i >= 2:
            times["step"].append(t_step)
            times["own"].append(t_own)
            times["hooked_step"].append(t_hooked)
            times["from_step"].append(hooks + t_call)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_ms": med["step"] * 1e3, "gsnr_ms": med["own"] * 1e3, "ratio": med["own"] / med["step"],
            "samples": out.settings["num_samples"], "hooked_step_ms": med["hooked_step"] * 1e3,
            "from_step_ms": med["from_step"] * 1e3, "from_step_ratio": med["from_step"] / med["step"],
            "source": from_step.last_source, "note": from_step.capture_note}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help=f"interleaved blocks of {BLOCK} steps per configuration")
    ap.add_argument("--gsnr-repeats", type=int, default=7, help="GSNR timings per model (0: leave them out)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    ap.add_argument("--no-trainscope", action="store_true")
    ap.add_argument("--budget-warmup", type=int, default=120,
                    help="warm-up steps of the standard preset at its default budget (0: leave it out)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated configurations to time (baseline always runs): " + ", ".join(CONFIGS))
    ap.add_argument("--control", action="store_true",
                    help="also time baseline-b, a second plain copy: the spread between copies")
    ap.add_argument("--paired", action="store_true",
                    help="cheap also runs unmonitored blocks of its own copy; its overhead against them is reported")
    ap.add_argument("--model-size", choices=("tiny", "large"), default="tiny",
                    help="tiny: the zoo's tiny GPT and digits MLP; large: a 3.2M-parameter zoo GPT "
                         "(4 layers, d_model 256, block 128, batch 16) only")
    args = ap.parse_args(argv)
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    args.configs = configs
    torch.manual_seed(0)

    if args.model_size == "large":
        cases, gsnr_rows = run_large(args)
    else:
        cases, gsnr_rows = run_tiny(args)
    text = render(cases, gsnr_rows, argv)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


def run_large(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, float]]]]:
    """The same presets and method on a larger GPT: baseline, cheap, standard (no trainscope)."""
    gpt = TinyGPT(LARGE_GPT, seed=0)
    num_params = sum(p.numel() for p in gpt.parameters())
    loss = get_loss("tiny-gpt")
    data = get_data("pydoc-text", batch_size=LARGE_BATCH, num_batches=8, block_size=LARGE_GPT.block_size)
    c = LARGE_GPT
    label = (f"large gpt ({c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, "
             f"{LARGE_BATCH}x{c.block_size} tokens, {num_params / 1e6:.2f}M parameters)")
    cases = [time_case(label, gpt, loss, data, args.rounds, False, args.budget_warmup, args.configs, args.control,
                       args.paired)]
    return cases, [("large gpt", time_gsnr(gpt, loss, data, args.gsnr_repeats))] if args.gsnr_repeats > 0 else []


def run_tiny(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, float]]]]:
    """The tiny GPT (with trainscope when installed) and the digits MLP."""
    gpt = get_model("tiny-gpt")
    gpt_loss = get_loss("tiny-gpt")
    gpt_data = get_data("pydoc-text", batch_size=16, num_batches=8)
    mlp = get_model("mlp-digits")
    mlp_loss = get_loss("mlp-digits")
    mlp_data = get_data("digits", batch_size=64, num_batches=8)

    cases = [
        time_case("tiny-gpt (2 layers, d_model 64, 16x64 tokens)", gpt, gpt_loss, gpt_data, args.rounds, not args.no_trainscope,
                  args.budget_warmup, args.configs, args.control, args.paired),
        time_case("mlp-digits (64-32-32-10, batch 64)", mlp, mlp_loss, mlp_data, args.rounds, False, args.budget_warmup,
                  args.configs, args.control, args.paired),
    ]
    gsnr_rows = [("tiny-gpt", time_gsnr(gpt, gpt_loss, gpt_data, args.gsnr_repeats)),
                 ("mlp-digits", time_gsnr(mlp, mlp_loss, mlp_data, args.gsnr_repeats))] if args.gsnr_repeats > 0 else []
    return cases, gsnr_rows


def render(cases: list[dict[str, Any]], gsnr_rows: list[tuple[str, dict[str, float]]], argv: list[str] | None) -> str:
    """Markdown tables of the cases and the GSNR timings, headed by the machine and the command."""
    cmd = sys.argv if argv is None else [sys.argv[0], *argv]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}",
        f"Command: `{' '.join(['OMP_NUM_THREADS=1', '.venv/bin/python', *cmd])}`",
        "",
    ]
    for case in cases:
        lines += [f"### {case['label']}: {case['steps']} timed steps per configuration", "",
                  "| configuration | wall median (ms) | wall mean (ms) | wall overhead, medians | wall overhead, means "
                  "(amortised) | CPU median (ms) | CPU overhead, medians | CPU overhead, means (amortised) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in case["rows"].items():
            lines.append(f"| {name} | {row['median_ms']:.2f} | {row['mean_ms']:.2f} | "
                         f"{row['median_overhead_pct']:+.1f}% | {row['mean_overhead_pct']:+.1f}% | "
                         f"{row['cpu_median_ms']:.2f} | {row['cpu_median_overhead_pct']:+.1f}% | "
                         f"{row['cpu_mean_overhead_pct']:+.1f}% |")
        lines += [f"- {n}" for n in case["notes"]] + [""]
    if not gsnr_rows:
        return "\n".join(lines)
    lines += ["### GSNR at its default (per-sample gradients + statistics) vs one training step", "",
              "Own pass: `gsnr(from_training_step=False)`. From the training step (the default when the Monitor "
              "may run it at the next step): the seconds in its hooks on the training forward and backward, putting "
              "them in and taking them out, and its call; `source` is where the default took them (own_pass where the training step cannot be "
              "used, with the reason).", "",
              "| model | training step (ms) | hooked training step (ms) | own pass (ms) | own pass / step | "
              "from the training step (ms) | from the training step / step | source | samples |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, g in gsnr_rows:
        lines.append(f"| {label} | {g['step_ms']:.2f} | {g['hooked_step_ms']:.2f} | {g['gsnr_ms']:.2f} | "
                     f"{g['ratio']:.2f}x | {g['from_step_ms']:.2f} | {g['from_step_ratio']:.2f}x | {g['source']} | "
                     f"{g['samples']} |")
    notes = [f"{label}: {g['note']}" for label, g in gsnr_rows if g.get("note")]
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
