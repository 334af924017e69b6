"""The demo behind ``tdiag demo`` (``make demo``): a stable and an exploding tiny GPT, side by side.

It trains the zoo's tiny character-level GPT twice on the stdlib ``pydoc_data.topics`` text with AdamW,
both runs monitored in the loop by the whole standard preset, the explosion detector (when it is
registered) and ``grad_subspace`` on fixed schedules, so that every chart of the report has a curve:
spectral alignment, the loss and the norms at every step, sharpness, Adam state, GSNR and the attention
and output logits every 10 steps, the ranks every 20 and the Hessian's top eigenvalues and the subspace
every 50. That is several times the
training's own time, far above the standard preset's 5% budget, which stays set so that the report's
cost panel compares the two:

- **stable**: learning rate 1e-3 throughout, the setting the model trains well at: no ramp, no collapse;
- **exploding**: the same, with the learning rate ramped geometrically from step 100 to 1.0 over 100
  steps: the slow road to a loss explosion (step 192 here; 193 in the suite's table, from another CPU),
  on which an early warning has something to warn about.

The runs use the first explosion suite's seeding (model seed, batches drawn with 1000 + seed) and train
on one thread; the exploding run is bit-identical to that suite's ``ramp1000__s1``
(``benchmarks/explosions/FINDINGS.md``). How far the default warning can be trusted is measured by the
loss-explosion benchmark, not by this pair: ``benchmarks/RESULTS.md, "Loss-explosion benchmark"``.

The stable run saves a few checkpoints, which ``analyze`` then measures with the same diagnostics plus
the Hessian's top eigenvalues, spectral density and trace and the gradient's share of the top eigenspace,
the way one would analyse a finished training job. One HTML report
compares the three runs. The printed summary says when the warning fired (or why it could not, or how
close its score came when it did not), when the loss exploded (``diagnostics.explosion.explosion_step``,
the suite's definition: the first step of 10 consecutive steps whose loss exceeds twice its running
minimum, or a non-finite loss; also stored as a ``loss_explosion`` event so that the report measures the
lead against the same step), the stable run's final loss, and when sharpness reached the optimizer's
stability threshold in each run (:func:`~diagnostics.app.demo_summary.edge_note`).

Cost: measured 106 s wall on the 2-core machine with nothing else running (80 s without the density and
trace of the checkpoints and the subspace, 55 s with only sharpness on a fixed schedule, 33 s under the
budget alone); most of it the sharpness probes (about 0.6 to 1.2 s each), the Hessian's top eigenvalues
(about 2.3 s a probe), the checkpoints' density and trace (about 5 s each) and the training steps.
``quick=True`` (smaller batches, a 20-step ramp, cheap diagnostics) took 7 to 13 s wall, for tests; its
runs are too short for the detector's baseline, and the summary says so.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diagnostics.app.demo_summary import detector_note, edge_note, first_warning
from diagnostics.explosion import explosion_step

__all__ = ["DemoRun", "DemoResult", "STABLE", "EXPLODING", "run_demo", "explosion_step"]


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo.

    Attributes:
        name: run name (and directory name).
        steps: optimizer steps at most.
        lr: learning rate before the ramp.
        warmup_steps: linear warm-up from lr/warmup_steps (0: none).
        ramp_start, ramp_steps, ramp_factor: from ``ramp_start`` the learning rate grows geometrically
            to ``ramp_factor`` x ``lr`` over ``ramp_steps`` steps, then stays there.
        beta2, eps: AdamW settings.
        batch_size, block_size: batch shape [B, T].
        seed: model initialisation and batch order (batches drawn with ``batch_seed`` = 1000 + seed).
        checkpoints: steps at which to save a checkpoint.
        stop_after_explosion: steps to keep training once the loss has exploded.
        model: options for ``get_model("tiny-gpt", ...)``.
    """

    name: str
    steps: int = 240
    lr: float = 1e-3
    warmup_steps: int = 0
    ramp_start: int | None = 100
    ramp_steps: int = 100
    ramp_factor: float = 1.0
    beta2: float = 0.95
    eps: float = 1e-8
    batch_size: int = 16
    block_size: int = 64
    seed: int = 0
    checkpoints: tuple[int, ...] = ()
    stop_after_explosion: int = 10
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_seed(self) -> int:
        """Seed of the batch order: ``1000 + seed``, as in the explosion suite's trainer."""
        return 1000 + self.seed

    def lr_at(self, step: int) -> float:
        """The learning rate used at ``step`` (0-based)."""
        lr = self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else self.lr
        if self.ramp_start is not None and step >= self.ramp_start:
            done = min(step - self.ramp_start + 1, self.ramp_steps)
            lr *= self.ramp_factor ** (done / self.ramp_steps)
        return lr


# The exploding run is the first explosion suite's ramp1000 (the learning rate ramped from step 100 to
# 1.0; it explodes at steps 189-195 for every seed tried), bit-identical to its ramp1000__s1 on one
# thread. The stable run keeps the base learning rate: nothing in it should alarm.
DEMO_SEED = 1
STABLE = DemoRun(name="stable", steps=220, ramp_start=None, seed=DEMO_SEED, checkpoints=(55, 110, 165, 220))
EXPLODING = DemoRun(name="exploding", ramp_factor=1000.0, seed=DEMO_SEED)

# The quick variants: smaller batches and a 20-step ramp from step 5; same story, for tests.
_QUICK = {"batch_size": 8, "block_size": 32, "ramp_start": 5, "ramp_steps": 20, "steps": 30}
_QUICK_STABLE = replace(STABLE, checkpoints=(15, 30), **{**_QUICK, "ramp_start": None})
_QUICK_EXPLODING = replace(EXPLODING, stop_after_explosion=3, **{**_QUICK, "steps": 50})


@dataclass
class DemoResult:
    """Where the demo wrote things and what happened.

    Attributes:
        out: the output directory.
        report: the HTML report (None when the report layer is unavailable).
        runs: run name -> run directory (``stable``, ``exploding``, ``stable-checkpoints``).
        warning_step: first explosion warning in the exploding run (None if none fired).
        warning_detail: the warning's message.
        detector_note, stable_note: why no warning could fire in the exploding / stable run (detector
            absent or never armed), else None.
        explosion_step: first step of the exploding run's loss explosion (None if it did not explode).
        stable_final_loss: the stable run's last loss; ``stable_warnings``: warnings in the stable run.
        edge_note, stable_edge_note: when sharpness reached the optimizer's stability threshold in the
            exploding / stable run, or that it stayed below (None when not measured).
        seconds: wall time.
    """

    out: Path
    report: Path | None
    runs: dict[str, Path]
    warning_step: int | None = None
    warning_detail: str | None = None
    detector_note: str | None = None
    explosion_step: int | None = None
    stable_final_loss: float | None = None
    stable_steps: int = 0
    stable_warnings: int = 0
    stable_note: str | None = None
    edge_note: str | None = None
    stable_edge_note: str | None = None
    seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        """The report's location and the three-line summary the command prints."""
        lines = [
            f"report: {self.report}"
            if self.report
            else f"runs written to {self.out} (no report layer installed)"
        ]
        if self.warning_step is not None:
            lines.append(
                f"exploding run: first explosion warning at step {self.warning_step} ({self.warning_detail})"
            )
        else:
            why = f" ({self.detector_note})" if self.detector_note else ""
            lines.append(f"exploding run: no explosion warning fired{why}")
        if self.explosion_step is not None:
            lead = ""
            if self.warning_step is not None and self.warning_step <= self.explosion_step:
                lead = f", {self.explosion_step - self.warning_step} steps after the warning"
            elif self.warning_step is not None:
                lead = f", {self.warning_step - self.explosion_step} steps before the warning"
            lines.append(f"exploding run: the loss exploded at step {self.explosion_step}{lead}")
        else:
            lines.append("exploding run: the loss did not explode within its steps")
        final = f"{self.stable_final_loss:.3f}" if self.stable_final_loss is not None else "n/a"
        warned = f"{self.stable_warnings} warning(s)" if self.stable_warnings else "no warnings"
        if not self.stable_warnings and self.stable_note:
            warned += f" ({self.stable_note})"
        lines.append(f"stable run: final loss {final} after {self.stable_steps} steps, {warned}")
        if self.edge_note or self.stable_edge_note:
            parts = [f"{name} run {note}" for name, note in (("exploding", self.edge_note),
                                                             ("stable", self.stable_edge_note)) if note]
            lines.append("sharpness vs stability threshold: " + "; ".join(parts))
        return lines


#: The in-loop runs' overhead budget, the standard preset's default. Every diagnostic of the full demo has a
#: fixed schedule (which the budget does not thin): the report's cost panel shows the two side by side.
DEMO_BUDGET = 0.05

#: Settings of the Hessian's top eigenvalues on the demo's checkpoints (a budget that fits 2 CPU cores).
HESSIAN_OPTIONS: dict[str, Any] = {"k": 3, "max_matvecs": 40, "tol": 1e-2}

#: The full preset's other curvature diagnostics, measured on the demo's checkpoints with settings that fit
#: 2 CPU cores: the spectral density (2 probes of 24 Lanczos steps), the trace (Hutch++, 30 products) and
#: the gradient's share of the top eigenspace (without the update, which a checkpoint does not hold).
CHECKPOINT_CURVATURE: dict[str, dict[str, Any]] = {
    "hessian_density": {"num_probes": 2, "steps": 24},
    "hessian_trace": {"num_matvecs": 30},
    "grad_subspace": {},
}


def _standard_without(requirements: set[str]) -> list[str]:
    """The standard preset's diagnostics that need none of ``requirements``."""
    from diagnostics.metrics import preset_names, registry

    classes = registry()
    return [n for n in preset_names("standard") if not (requirements & classes[n].requires)]


def _registered(names: list[str]) -> list[str]:
    from diagnostics.metrics import available_diagnostics

    have = set(available_diagnostics())
    return [n for n in names if n in have]


def _train(
    cfg: DemoRun,
    run_dir: Path,
    diagnostics: list[str],
    every: dict[str, int] | None,
    checkpoint_dir: Path | None,
    *,
    progress: Callable[[int, float], None] | None,
) -> list[float]:
    """Train one run with the Monitor; returns the per-step losses. Cost: ``cfg.steps`` training steps
    plus the diagnostics due."""
    import torch

    # One thread, as the suite trains: with more, reductions round differently, and 40 steps into the
    # ramp the trajectory (and with it the steps of warning and explosion) drifts from the suite's.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_loop(cfg, run_dir, diagnostics, every, checkpoint_dir, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train_loop(
    cfg: DemoRun,
    run_dir: Path,
    diagnostics: list[str],
    every: dict[str, int] | None,
    checkpoint_dir: Path | None,
    *,
    progress: Callable[[int, float], None] | None,
) -> list[float]:
    import torch

    from diagnostics.tracking import Monitor
    from diagnostics.zoo import get_loss, get_model
    from diagnostics.zoo.data import char_batches, pydoc_tokens

    model = get_model("tiny-gpt", seed=cfg.seed, block_size=cfg.block_size, **cfg.model)
    loss_fn = get_loss("tiny-gpt")
    tokens = pydoc_tokens("train")
    # The suite seeds its batches with 1000 + seed (benchmarks/explosions/trainer.py, setup): with the
    # same stream the demo's runs are the suite's ramp100 / ramp1000 runs of that seed, the runs its
    # detector figures were measured on, not a data order nobody evaluated.
    batches = char_batches(tokens, cfg.batch_size, cfg.block_size, cfg.steps, seed=cfg.batch_seed)
    probe = char_batches(tokens, cfg.batch_size, cfg.block_size, 1, seed=cfg.batch_seed + 1000)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr_at(0), betas=(0.9, cfg.beta2), eps=cfg.eps, weight_decay=0.0
    )
    meta = {
        "demo": {k: v for k, v in cfg.__dict__.items() if k != "model"} | {"model": dict(cfg.model)},
        "optimizer": "AdamW",
    }
    losses: list[float] = []
    exploded_at: int | None = None
    with Monitor(
        model,
        loss_fn,
        run=run_dir,
        diagnostics=diagnostics,
        optimizer=opt,
        probe_data=probe,
        meta=meta,
        name=cfg.name,
        every=every,
        budget=DEMO_BUDGET,
    ) as monitor:
        for step, batch in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
            losses.append(float(loss.detach()))
            if checkpoint_dir is not None and (step + 1) in cfg.checkpoints:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {"model": model.state_dict(), "step": step + 1},
                    checkpoint_dir / f"step_{step + 1:05d}.pt",
                )
            if progress is not None:
                progress(step, losses[-1])
            if exploded_at is None:
                exploded_at = explosion_step(losses)
            if exploded_at is not None and step >= exploded_at + cfg.stop_after_explosion:
                break
            if (
                not math.isfinite(losses[-1])
                and len([x for x in losses if not math.isfinite(x)]) > cfg.stop_after_explosion
            ):
                break
    return losses


def _record_explosion(run_dir: Path, step: int, loss: float) -> None:
    """Store the explosion as a ``loss_explosion`` event, so that the report's findings measure the
    warning's lead against the same step as the printed summary (the suite's definition) rather than
    against a loss-series rule of their own. Cost: one transaction."""
    from diagnostics.store import RunWriter
    from diagnostics.store.records import Event

    with RunWriter(run_dir, resume=True) as writer:
        writer.write_step(
            step,
            events=[
                Event(
                    kind="loss_explosion",
                    severity="error",
                    metric="loss",
                    key="all",
                    message=(
                        f"loss {loss:.4g}: the first of 10 consecutive steps above twice the running "
                        "minimum of the loss, or a non-finite loss (the explosion suite's definition)"
                    ),
                    data={"loss": loss if math.isfinite(loss) else str(loss)},
                )
            ],
        )


#: A file the demo leaves in its output directory: only directories carrying it are ever cleaned.
MARKER = ".tdiag-demo"


def _fresh(path: Path, out: Path) -> Path:
    """Remove what an earlier demo left at ``path``; refuse to touch anything the demo did not write."""
    if path.exists():
        if not (out / MARKER).is_file():
            from diagnostics.errors import ConfigError

            raise ConfigError(
                f"{str(path)!r} exists and was not written by tdiag demo; choose another --out directory"
            )
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return path


def run_demo(out: str | Path = "demo_output", *, quick: bool = False, quiet: bool = False) -> DemoResult:
    """Train a stable and an exploding tiny GPT, analyse the stable run's checkpoints, write a report.

    Args:
        out: output directory; the demo's own sub-directories in it are replaced on every run.
        quick: a much shorter version (tens of seconds) with the same outputs, for tests.
        quiet: no progress bars.

    Returns:
        A :class:`DemoResult`; ``summary_lines()`` is what ``tdiag demo`` prints.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stable_cfg, exploding_cfg = (_QUICK_STABLE, _QUICK_EXPLODING) if quick else (STABLE, EXPLODING)
    if quick:
        monitored = _registered(
            [
                "loss",
                "learning_rate",
                "grad_norm",
                "weight_norm",
                "update_ratio",
                "nonfinite",
                "spectral_alignment",
                "explosion_detector",
            ]
        )
        analysed: list[Any] = _registered(["loss", "grad_norm", "weight_norm"])
        # Spectral alignment every step is most of a quick run's cost; every 5th step keeps it exercised.
        every = {"spectral_alignment": 5} if "spectral_alignment" in monitored else None
    else:
        # The whole standard preset, on the fixed schedules below.
        from diagnostics.metrics import preset_names

        monitored = list(preset_names("standard"))
        # The detector joins when it is registered and not already in the preset.
        monitored += [n for n in _registered(["explosion_detector"]) if n not in monitored]
        # From the full preset, the gradient's and the update's share of the top eigenspace that hessian_top
        # finds (at hessian_top's steps: one gradient and one product more each).
        monitored += [n for n in _registered(["grad_subspace"]) if n not in monitored]
        # A checkpoint holds no optimizer step: those diagnostics are the in-loop runs' business.
        analysed = [
            # (the detector reads a step-by-step series: a handful of checkpoints is not one)
            *[
                n
                for n in _standard_without({"curvature", "optimizer", "update"})
                if n != "explosion_detector"
            ],
            *[{n: HESSIAN_OPTIONS} for n in _registered(["hessian_top"])],
            # The full preset's curvature views too, so that the report's density, trace and subspace
            # panels are not empty: small settings that fit a few seconds a checkpoint on 2 CPU cores.
            *[{n: o} for n, o in CHECKPOINT_CURVATURE.items() if n in _registered(list(CHECKPOINT_CURVATURE))],
        ]
        # Fixed, not budgeted: the detector reads spectral alignment at every step, and the exploding run's
        # story is told step by step in Adam's update RMS, which the budget would thin on this tiny model.
        # The loss and the norms are the curves the story is read against: also kept at every step (with
        # spectral alignment at every step the calls alone take more than half of the budget on this model,
        # so the budget would space them 10 steps apart).
        # Sharpness every 10 steps, fixed too: at the budget's rate it ran at two steps of each run, too few
        # to see Adam's preconditioned sharpness climb to its threshold during the ramp (about 0.7 s a
        # probe here, half of the demo's time).
        # The other probes fixed as well, so that every chart of the report has a curve rather than the two
        # points the budget allows them in a 220-step run: the early signals (attention and output logits),
        # GSNR and the ranks every 10 or 20 steps (together about 3 s a run), the Hessian's top eigenvalues
        # every 50 (about 2.3 s a probe).
        fixed = {"spectral_alignment": 1, "explosion_detector": 1, "adam_state": 10, "sharpness": 10,
                 "attention_stats": 10, "output_logits": 10, "gsnr": 10, "activation_rank": 20,
                 "grad_rank": 20, "weight_rank": 20, "hessian_top": 50, "grad_subspace": 50,
                 **{n: 1 for n in preset_names("cheap")}}
        every = {n: k for n, k in fixed.items() if n in monitored} or None

    runs_dir = out / "runs"
    runs = {
        "stable": _fresh(runs_dir / "stable", out),
        "exploding": _fresh(runs_dir / "exploding", out),
        "stable-checkpoints": _fresh(runs_dir / "stable-checkpoints", out),
    }
    checkpoint_dir = _fresh(out / "checkpoints" / "stable", out)
    _fresh(out / "report.html", out)
    (out / MARKER).write_text(
        "written by tdiag demo; its runs, checkpoints and report are replaced on every run\n"
    )

    stable_losses = _with_progress(stable_cfg, runs["stable"], monitored, every, checkpoint_dir, quiet)
    exploding_losses = _with_progress(exploding_cfg, runs["exploding"], monitored, every, None, quiet)

    from diagnostics.app.analyze import analyze_checkpoints
    from diagnostics.zoo import get_loss, get_model
    from diagnostics.zoo.data import char_batches, pydoc_tokens

    # Held-out text, the same batches for every checkpoint.
    analysis_data = char_batches(
        pydoc_tokens("test"),
        stable_cfg.batch_size,
        stable_cfg.block_size,
        1 if quick else 2,
        seed=stable_cfg.seed,
    )
    analyze_checkpoints(
        checkpoint_dir,
        model=get_model(
            "tiny-gpt", seed=stable_cfg.seed, block_size=stable_cfg.block_size, **stable_cfg.model
        ),
        data=analysis_data,
        loss=get_loss("tiny-gpt"),
        diagnostics=analysed,
        run=runs["stable-checkpoints"],
        quiet=quiet,
        config={"model": "tiny-gpt", "data": "pydoc-text (test split)", "block_size": stable_cfg.block_size},
    )

    boom = explosion_step(exploding_losses)
    if boom is not None:
        _record_explosion(runs["exploding"], boom, exploding_losses[boom])
    report = _report(out, runs, quick)
    warning_step, detail, _ = first_warning(runs["exploding"])
    note = detector_note(runs["exploding"], before=boom) if warning_step is None else None
    _, _, stable_warnings = first_warning(runs["stable"])
    finite = [x for x in stable_losses if math.isfinite(x)]
    return DemoResult(
        out=out,
        report=report,
        runs=runs,
        warning_step=warning_step,
        warning_detail=detail,
        detector_note=note,
        explosion_step=boom,
        stable_final_loss=finite[-1] if finite else None,
        stable_steps=len(stable_losses),
        stable_warnings=stable_warnings,
        stable_note=None if stable_warnings else detector_note(runs["stable"]),
        edge_note=edge_note(runs["exploding"], before=boom),
        stable_edge_note=edge_note(runs["stable"]),
        seconds=time.perf_counter() - started,
    )


def _with_progress(
    cfg: DemoRun,
    run_dir: Path,
    diagnostics: list[str],
    every: dict[str, int] | None,
    checkpoint_dir: Path | None,
    quiet: bool,
) -> list[float]:
    if quiet:
        return _train(cfg, run_dir, diagnostics, every, checkpoint_dir, progress=None)
    from tqdm.auto import tqdm

    with tqdm(total=cfg.steps, desc=f"train {cfg.name}", unit="step", leave=False, dynamic_ncols=True) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}", refresh=False)

        return _train(cfg, run_dir, diagnostics, every, checkpoint_dir, progress=progress)


def _report(out: Path, runs: dict[str, Path], quick: bool) -> Path | None:
    try:
        from diagnostics.reports import build_report
    except ImportError:
        return None
    path = out / "report.html"
    title = "tdiag demo: a stable and an exploding tiny GPT" + (" (quick)" if quick else "")
    return Path(
        build_report([runs["stable"], runs["exploding"], runs["stable-checkpoints"]], path, title=title)
    )
