"""Train the suite's configurations with the Monitor and the in-loop ``spectral_alignment`` diagnostic.

The suite's own trainer (trainer.py) records spectral alignment from an SVD of every weight on the
training forward pass. This runner trains the same configurations (same model, data, optimizer, learning
rate schedule and explosion rule, imported from the suite) but records through the library's path: a
:class:`~diagnostics.tracking.Monitor` with the ``loss``, ``learning_rate`` and ``grad_norm`` diagnostics,
the ``spectral_alignment`` diagnostic (warm-started power iteration, measured on the training forward
the Monitor observes, or with ``--extra-forward`` on its own no-grad forward over a token budget;
the explosion detector runs offline, in evaluate.py) and the suite's baselines (max attention logit and activation
kurtosis, read on the training forward by the suite's probes). The stores it writes are evaluated by
evaluate.py like the suite's, so the numbers of the in-loop diagnostic can be compared with the offline ones.

Usage (repository root, one core):

    python -m benchmarks.explosions.run_with_monitor --out DIR [--configs ...] [--seeds 0 1 2] [--extra-forward]
    python -m benchmarks.explosions.run_with_monitor --out DIR --overhead [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from benchmarks.explosions.configs import ALL, SEEDS
from benchmarks.explosions.explosion import explosion_step
from benchmarks.explosions.trainer import StopRule, TrainConfig, _Probes, set_learning_rate, setup, update
from diagnostics.metrics.base import Diagnostic
from diagnostics.metrics.spectral_alignment import SpectralAlignment
from diagnostics.store.records import Record
from diagnostics.tracking import Monitor
from diagnostics.zoo import get_model
from diagnostics.zoo.data import char_batches, pydoc_tokens

__all__ = ["train_with_monitor", "main"]


def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class _SuiteBaselines(Diagnostic):
    """Hands the suite probes' per-step baselines (read on the training forward) to the Monitor's store."""

    name = "suite_baselines"
    reads_only = True
    allow_nonfinite = True
    metrics: ClassVar[tuple[str, ...]] = ("max_attention_logit", "activation_kurtosis")

    def __init__(self) -> None:
        super().__init__(every=1)
        self.probes: _Probes | None = None

    def compute(self, ctx: Any) -> list[Record]:
        if self.probes is None:
            return []
        recs = [Record("max_attention_logit", v, k) for k, v in self.probes.max_logit.items()]
        return recs + [Record("activation_kurtosis", v, k) for k, v in self.probes.kurtosis.items()]


def train_with_monitor(
    cfg: TrainConfig, run_dir: Path, sa_options: dict[str, Any] | None = None, observe: bool = True
) -> dict[str, Any]:
    """Train one suite run with the Monitor recording every step into ``run_dir``; returns a summary.

    ``observe``: the Monitor's ``observe_training_forward`` (False: spectral alignment runs its own
    no-grad forward every step, as when the results table of RESULTS.md was measured).
    """
    model, batches, opt = setup(cfg)
    baselines = _SuiteBaselines()
    sa = SpectralAlignment(max_tokens=cfg.sa_tokens, **(sa_options or {}))
    rule = StopRule(cfg.stop_after_explosion)
    step = -1
    t0 = time.perf_counter()
    sa_seconds = 0.0
    with Monitor(
        model,
        lm_loss,
        run=run_dir,
        diagnostics=["loss", "learning_rate", "grad_norm", sa, baselines],
        optimizer=opt,
        meta=asdict(cfg),
        name=cfg.run_name,
        observe_training_forward=observe,
    ) as mon:
        for step, (x, y) in enumerate(batches):
            set_learning_rate(cfg, opt, step)
            probes = _Probes(model, 1)
            probes.linears = {}  # the spectral_alignment diagnostic measures the linear maps itself
            with probes:
                loss = lm_loss(model, (x, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            baselines.probes = probes
            t1 = time.perf_counter()
            mon.step(step, (x, y), loss)
            sa_seconds += time.perf_counter() - t1
            if rule.stop(step, float(loss.detach())):
                break
            update(cfg, model, opt)
        seconds = time.perf_counter() - t0
        result = {
            "explosion_step": explosion_step(rule.losses),
            "final_step": step,
            "seconds": seconds,
            "monitor_seconds": sa_seconds,
        }
        for k, v in result.items():
            mon.set_meta(k, v)
        mon.set_meta("complete", True)
    return result


def measure_overhead(
    steps: int = 60,
    rounds: int = 3,
    watch: bool = False,
    model_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    block_size: int | None = None,
    observe: bool = True,
    paired: bool = False,
    **sa_options: Any,
) -> dict[str, float]:
    """Median training-step time of the suite's base config with and without spectral alignment every step.

    Two copies of the same model and optimizer step through the same batches in interleaved blocks of
    ``steps`` (so load drifts on a shared machine hit both alike); one runs
    ``Monitor(diagnostics=[SpectralAlignment(**sa_options)])`` with ``monitor.step`` every step. Returns
    the medians (seconds), their ratio - 1 (the overhead) and ``in_step_share``: the median time inside
    ``monitor.step`` over the median time of the rest of the same steps (the share that does not depend on
    load drifting between the two copies; on a watched step it misses the hooks' work in the forward).
    ``watch``: measure on the training forward
    (:meth:`SpectralAlignment.watch`) instead of an extra forward. ``model_options``, ``batch_size``,
    ``block_size`` override the suite's tiny GPT (to see how the overhead scales with the model).
    ``in_step_cpu_share`` is the same split in CPU time of this thread (``monitor_cpu_ms`` over
    ``rest_cpu_ms``, medians), which leaves out time spent waiting for a core on a loaded machine.
    ``cpu_overhead`` is the whole-step CPU-time ratio of the two copies minus 1 (medians): it includes
    the hooks' work inside the training forward. ``observe``: the Monitor's
    ``observe_training_forward`` (False: the diagnostic always runs its own forward).
    A third copy runs a Monitor that stores only the loss: ``loss_only_cpu_overhead`` is its whole-step
    CPU-time overhead (the Monitor's fixed cost per step: its store commit, statuses, timing) and
    ``own_cpu_share`` the difference of the two monitored copies over the plain step (spectral
    alignment's own cost). ``sa_options`` go to :class:`SpectralAlignment`.

    ``paired``: the two monitored copies also run unmonitored blocks of ``steps`` steps, alternating with
    their monitored ones (monitored first in even rounds), with the Monitor's observing hooks taken out
    for them; ``paired_cpu_overhead`` and ``paired_loss_only_cpu_overhead`` are each copy's monitored
    steps against its own unmonitored ones (CPU medians), so the spread between copies, which moves a
    plain step by a few percent either way, cancels; ``paired_own_cpu_share`` is their difference. The
    first step of each monitored block is left out of the timing (it has no observed forward behind it
    and runs its own, as a monitored run's first step does).
    """
    import copy
    import statistics
    import tempfile

    cfg = ALL["ramp100"]
    bs, T = batch_size or cfg.batch_size, block_size or cfg.block_size
    batches = list(char_batches(pydoc_tokens("train"), bs, T, steps, seed=1000))
    base_model = get_model("tiny-gpt", seed=0, block_size=T, **{**cfg.model, **(model_options or {})})
    # "loss_only": the same Monitor storing only the loss, for the Monitor's own fixed cost per step.
    times: dict[str, list[float]] = {"plain": [], "loss_only": [], "spectral_alignment": []}
    cpu_times: dict[str, list[float]] = {"plain": [], "loss_only": [], "spectral_alignment": []}
    # seconds inside monitor.step, measured in the same steps as the rest (robust to load drifts)
    inside: list[float] = []
    rest: list[float] = []
    # the same split in CPU time of this thread (robust to waiting for a core on a loaded machine)
    cpu_inside: list[float] = []
    cpu_rest: list[float] = []
    # ``paired``: CPU time of the monitored copies' unmonitored steps, and of their monitored ones
    unmonitored_cpu: dict[str, list[float]] = {"loss_only": [], "spectral_alignment": []}
    paired_cpu: dict[str, list[float]] = {"loss_only": [], "spectral_alignment": []}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for name in times:
            model = copy.deepcopy(base_model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            mon = sa = None
            if name == "loss_only":
                mon = Monitor(model, lm_loss, run=Path(tmp) / name, diagnostics=["loss"], optimizer=opt)
            elif name != "plain":
                sa = SpectralAlignment(**sa_options)
                mon = Monitor(
                    model, lm_loss, run=Path(tmp) / name, diagnostics=[sa], optimizer=opt,
                    observe_training_forward=observe,
                )
            setups[name] = (model, opt, mon, sa)
        for r in range(rounds):
            blocks = [(name, True) for name in setups]
            if paired:
                blocks += [(name, False) for name in unmonitored_cpu]
                if r % 2:
                    blocks = [(name, False) for name in unmonitored_cpu] + [(name, True) for name in setups]
            for name, monitored in blocks:
                model, opt, mon, sa = setups[name]
                if paired and mon is not None:
                    # Monitored and unmonitored blocks of a copy alternate: steps count on across both.
                    start = (2 * r + (monitored == bool(r % 2))) * len(batches)
                else:
                    start = r * len(batches)
                if not monitored:
                    # The plain loop on this copy: the hooks the Monitor holds between steps come out
                    # (a benchmark-only reach into the Monitor: no user pauses a Monitor).
                    mon._stop_observing()
                    if sa is not None:
                        sa.release_hooks()
                    for batch in batches:
                        c0 = time.thread_time()
                        loss = lm_loss(model, batch)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        unmonitored_cpu[name].append(time.thread_time() - c0)
                    continue
                # Steps keep counting across rounds: a repeated step index would be a rewrite, which the
                # store handles by deleting the step's earlier rows first (a cost no training run pays).
                for step, batch in enumerate(batches, start=start):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    with sa.watch(model) if (watch and sa is not None) else contextlib.nullcontext():
                        loss = lm_loss(model, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    t1, c1 = time.perf_counter(), time.thread_time()
                    if mon is not None:
                        mon.step(step, batch, loss)
                    t2, c2 = time.perf_counter(), time.thread_time()
                    opt.step()
                    times[name].append(time.perf_counter() - t0)
                    cpu_times[name].append(time.thread_time() - c0)
                    if paired and name in paired_cpu and step > start:
                        paired_cpu[name].append(cpu_times[name][-1])
                    if sa is not None:
                        inside.append(t2 - t1)
                        rest.append(times[name][-1] - (t2 - t1))
                        cpu_inside.append(c2 - c1)
                        cpu_rest.append(time.thread_time() - c0 - (c2 - c1))
        for _, _, mon, _ in setups.values():
            if mon is not None:
                mon.close()
    paired_figures: dict[str, float] = {}
    if paired:
        ratio = {k: statistics.median(paired_cpu[k]) / statistics.median(unmonitored_cpu[k]) - 1.0
                 for k in unmonitored_cpu}
        paired_figures = {
            "paired_cpu_overhead": ratio["spectral_alignment"],
            "paired_loss_only_cpu_overhead": ratio["loss_only"],
            "paired_own_cpu_share": ratio["spectral_alignment"] - ratio["loss_only"],
            "unmonitored_cpu_ms": statistics.median(unmonitored_cpu["spectral_alignment"]) * 1e3,
        }
    med = {k: statistics.median(v) for k, v in times.items()}
    share = statistics.median(inside) / statistics.median(rest)
    cpu_share = statistics.median(cpu_inside) / statistics.median(cpu_rest)
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    return {
        **med,
        "overhead": med["spectral_alignment"] / med["plain"] - 1.0,
        "in_step_share": share,
        "in_step_cpu_share": cpu_share,
        "cpu_overhead": cpu_med["spectral_alignment"] / cpu_med["plain"] - 1.0,
        "loss_only_cpu_overhead": cpu_med["loss_only"] / cpu_med["plain"] - 1.0,
        "own_cpu_share": (cpu_med["spectral_alignment"] - cpu_med["loss_only"]) / cpu_med["plain"],
        "plain_cpu_ms": cpu_med["plain"] * 1e3,
        "monitor_cpu_ms": statistics.median(cpu_inside) * 1e3,
        "rest_cpu_ms": statistics.median(cpu_rest) * 1e3,
        **paired_figures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="*", default=list(ALL))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument(
        "--overhead", action="store_true", help="only time spectral alignment every step vs plain"
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--detail-every", type=int, default=None, help="with --overhead: SpectralAlignment(detail_every=...)"
    )
    parser.add_argument(
        "--extra-forward",
        action="store_true",
        help="Monitor(observe_training_forward=False): spectral alignment runs its own forward every step",
    )
    parser.add_argument("--steps", type=int, default=None, help="with --overhead: steps per block")
    parser.add_argument("--rounds", type=int, default=None, help="with --overhead: interleaved rounds")
    parser.add_argument(
        "--watch", action="store_true", help="with --overhead: measure on the training forward"
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="with --overhead: each monitored copy also runs unmonitored blocks; report its overhead against them",
    )
    parser.add_argument(
        "--large", action="store_true", help="with --overhead: d_model 256, 4 layers, 32 x 128 tokens"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.overhead:
        large = (
            {
                "model_options": {"d_model": 256, "n_layers": 4},
                "batch_size": 32,
                "block_size": 128,
                "steps": 20,
                "rounds": 2,
            }
            if args.large
            else {}
        )
        opts: dict[str, Any] = dict(large)
        if args.detail_every is not None:
            opts["detail_every"] = args.detail_every
        if args.steps is not None:
            opts["steps"] = args.steps
        if args.rounds is not None:
            opts["rounds"] = args.rounds
        res = measure_overhead(
            watch=args.watch, max_tokens=args.max_tokens, observe=not args.extra_forward, paired=args.paired, **opts
        )
        mode = (
            "training forward (watch)"
            if args.watch
            else "extra forward" if args.extra_forward else "training forward observed by the Monitor"
        )
        print(
            f"plain step {res['plain'] * 1e3:.1f} ms, with spectral_alignment every step "
            f"{res['spectral_alignment'] * 1e3:.1f} ms: overhead {res['overhead']:.1%}; monitor.step / rest of the step "
            f"{res['in_step_share']:.1%}; CPU time in monitor.step {res['monitor_cpu_ms']:.1f} ms / rest "
            f"{res['rest_cpu_ms']:.1f} ms = {res['in_step_cpu_share']:.1%}; whole-step CPU time "
            f"{res['plain_cpu_ms']:.1f} ms plain: overhead {res['cpu_overhead']:.1%} (max_tokens={args.max_tokens}, "
            f"{mode}{', large model' if args.large else ''}); a Monitor storing only the loss: "
            f"{res['loss_only_cpu_overhead']:+.1%}, so spectral alignment's own share {res['own_cpu_share']:.1%} "
            "of a plain step (CPU)"
        )
        if args.paired:
            print(
                f"paired (each monitored copy against its own unmonitored blocks, CPU medians; plain step on the "
                f"spectral alignment copy {res['unmonitored_cpu_ms']:.1f} ms): spectral alignment every step "
                f"{res['paired_cpu_overhead']:+.1%}, a Monitor storing only the loss "
                f"{res['paired_loss_only_cpu_overhead']:+.1%}, spectral alignment's own share "
                f"{res['paired_own_cpu_share']:.1%}"
            )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.configs:
            cfg = ALL[name].with_seed(seed)
            run_dir = args.out / cfg.run_name
            if (run_dir / "done").exists():
                continue
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run is retrained from scratch
            res = train_with_monitor(cfg, run_dir, observe=not args.extra_forward)
            (run_dir / "done").write_text("1")
            print(
                f"{cfg.run_name:28s} explosion_step={res['explosion_step']} final={res['final_step']} "
                f"{res['seconds']:.1f}s (monitor {res['monitor_seconds']:.1f}s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
