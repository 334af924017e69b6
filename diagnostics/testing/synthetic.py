"""A realistic synthetic run store, for report gold files, benchmarks and tests. Pure Python and numpy.

:func:`write_synthetic_run` writes every metric ID of the catalogue (:mod:`diagnostics.store.catalog`) on
a plausible schedule (cheap metrics every step, spectral alignment every 5 steps, ranks and GSNR every 10,
curvature every 20) for a small transformer-like model, with events, per-diagnostic statuses (including one
``not_converged`` and one ``failed`` estimate) and complete metadata. With ``explode_at`` the run shows
the story of a loss explosion: sign diversity of some layers' spectral alignment collapses, the
explosion score rises and warns, the loss blows up, goes to inf and then NaN, and curvature estimates
fail from then on. The output depends only on the arguments (fixed clock), so it can back gold files.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from diagnostics.store import catalog
from diagnostics.store.records import Event, Record, Status
from diagnostics.store.writer import RunWriter

#: Every metric ID a synthetic run holds: the whole catalogue of :mod:`diagnostics.store.catalog`.
SYNTHETIC_METRICS: tuple[str, ...] = catalog.metric_ids()

#: Event kinds a synthetic run can hold (the last three only with ``explode_at``).
SYNTHETIC_EVENT_KINDS = (
    "edge_of_stability", "nonfinite", "estimator_failed", "explosion_warning", "loss_explosion", "rank_collapse",
)  # fmt: skip

# Synthetic diagnostic -> (period in steps, the catalogue writers whose metrics it writes). One synthetic
# name may stand for several real diagnostics ("basics", "rank"): one status row and one rng draw per
# name, so the store, and the report gold files built on it, stay as they are.
_WRITERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "basics": (1, ("loss", "learning_rate", "grad_norm", "weight_norm", "update_ratio", "nonfinite")),
    "gsnr": (10, ("gsnr",)),
    "gsnr_microbatch": (10, ("gsnr_microbatch",)),
    "rank": (10, ("weight_rank", "grad_rank", "activation_rank")),
    "hessian_eigen": (20, ("hessian_top",)),
    "hessian_density": (20, ("hessian_density",)),
    "hessian_trace": (20, ("hessian_trace",)),
    "ggn_eigen": (20, ("ggn_top",)),
    "ggn_density": (20, ("ggn_density",)),
    "ggn_trace": (20, ("ggn_trace",)),
    "sharpness": (20, ("sharpness",)),
    "subspace": (20, ("grad_subspace",)),
    "spectral_alignment": (5, ("spectral_alignment",)),
    "explosion_detector": (5, ("explosion_detector",)),
    "attention_stats": (5, ("attention_stats",)),
    "output_logits": (1, ("output_logits",)),
    "adam_state": (10, ("adam_state",)),
}
#: Writers that draw from a generator of their own, so that adding them left every earlier draw as it was.
_OWN_STREAM = frozenset({"attention_stats", "output_logits", "adam_state"})
# The explosion benchmark writes both baselines from one probe; the synthetic run keeps them apart.
_BASELINES: dict[str, tuple[int, tuple[str, ...]]] = {
    "attention_logits": (5, ("max_attention_logit",)),
    "activation_kurtosis": (5, ("activation_kurtosis",)),
}

#: Diagnostic name -> (period in steps, metrics it writes).
SCHEDULE: dict[str, tuple[int, tuple[str, ...]]] = {
    **{name: (every, catalog.written_by(*writers)) for name, (every, writers) in _WRITERS.items()},
    **_BASELINES,
}
if any(catalog.METRICS[m].writer != "suite_baselines" for _, ms in _BASELINES.values() for m in ms):
    raise ValueError("the synthetic baselines must be the catalogue's suite_baselines metrics")

_START = 1_735_689_600.0  # 2025-01-01T00:00:00Z: a fixed clock keeps the store reproducible
_TOP_K = 3
_PROBES, _NODES = 2, 8
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_TOKENS = 256
_TRAIN_SECONDS = 0.5


def _modules(layers: int) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Return (linear module names, attention module names, parameter name -> shape)."""
    width = 64
    linears, attention, params = [], [], {"embed.weight": [512, width]}
    for i in range(layers):
        attention.append(f"blocks.{i}.attn")
        for name, shape in (
            (f"blocks.{i}.attn.qkv", [3 * width, width]),
            (f"blocks.{i}.attn.proj", [width, width]),
            (f"blocks.{i}.mlp.fc1", [4 * width, width]),
            (f"blocks.{i}.mlp.fc2", [width, 4 * width]),
        ):
            linears.append(name)
            params[f"{name}.weight"] = shape
            params[f"{name}.bias"] = [shape[0]]
    linears.append("head")
    params["head.weight"] = [512, width]
    return linears, attention, params


def _lr(step: int, steps: int, peak: float = 0.05) -> float:
    """Linear warm-up over 10% of the run, constant to 70%, then linear decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - 0.7 * steps) / (0.3 * steps)
    return peak * (1.0 - 0.9 * min(1.0, max(0.0, progress)))


def write_synthetic_run(
    run_dir: str | os.PathLike[str],
    *,
    steps: int = 200,
    layers: int = 4,
    seed: int = 0,
    explode_at: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic but realistic run store holding every metric ID (see module docstring).

    Args:
        run_dir: directory to create (must not hold a run unless ``overwrite``).
        steps: number of training steps (>= 1).
        layers: number of transformer blocks (4 linear modules and one attention module each, plus a head).
        seed: seed of all randomness; the store depends only on the arguments.
        explode_at: step at which the loss explodes (inf 8 steps later, NaN after); None for a healthy run.
        name: run name; default the directory name.
        overwrite: replace an existing run at ``run_dir``.

    Returns:
        The run directory. Cost: about 48k series rows for the defaults (200 steps, 4 layers), written
        in about 0.6 s on an idle CPU core (1.5 to 3 s on a loaded one), about half of it in SQLite.
    """
    if steps < 1 or layers < 1:
        raise ValueError(f"steps and layers must be >= 1, got steps={steps}, layers={layers}")
    rng = np.random.default_rng(seed)
    linears, attention, params = _modules(layers)
    num_params = int(sum(np.prod(s) for s in params.values()))
    fingerprint = hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:16]
    settings = {d: {"every": every} for d, (every, _) in SCHEDULE.items()}
    for d in ("hessian_eigen", "ggn_eigen"):
        settings[d].update(k=_TOP_K, tol=1e-3, max_matvecs=60, which="LA")
    for d in ("hessian_density", "ggn_density"):
        settings[d].update(num_probes=_PROBES, steps=_NODES, sigma2=1e-5)
    for d in ("hessian_trace", "ggn_trace"):
        settings[d].update(estimator="hutchpp", num_matvecs=30)
    settings["rank"]["variant"] = "sigma"
    settings["spectral_alignment"].update(tokens=_TOKENS, bins=20, quantiles=list(_QUANTILES))
    meta: dict[str, Any] = {
        "created": "2025-01-01T00:00:00+00:00",
        "versions": {"python": "3.11.7", "torch": "2.13.0", "training-diagnostics": "0.1.0", "synthetic": "1"},
        "config": {
            "synthetic": True, "optimizer": "SGD", "lr": 0.05, "momentum": 0.0, "batch_size": 64,
            "steps": steps, "layers": layers, "seed": seed, "explode_at": explode_at,
        },
        "model_summary": {"num_params": num_params, "parameters": params},
        "model_fingerprint": fingerprint,
        "diagnostics": settings,
        "gradients_seen": "unscaled .grad after backward",
        "loss_reduction": "mean",
        "curvature_mode": "eval",
        "num_classes": 10,
        "budget": 0.05,
    }  # fmt: skip
    clock = [_START]
    state = _State(rng, linears, attention, params, steps, explode_at)
    with RunWriter(
        run_dir, name=name, meta=meta, resume=False, overwrite=overwrite, clock=lambda: clock[0]
    ) as w:
        for step in range(steps):
            clock[0] = _START + 0.5 * step
            records, events, statuses = state.step(step)
            w.write_step(step, records, events, statuses)
        return w.run_dir


class _State:
    """The evolving quantities of the synthetic run."""

    def __init__(self, rng, linears, attention, params, steps, explode_at) -> None:
        self.rng = rng
        self.linears, self.attention, self.params = linears, attention, params
        self.steps, self.explode_at = steps, explode_at
        self.nan_from = None if explode_at is None else explode_at + 9  # inf at explode_at + 8
        self.nonfinite_step = max(1, steps // 3) if steps > 3 else None
        # One not-converged and one failed estimate in every run, on curvature steps (every 20).
        self.not_converged_step = 20 * ((steps - 1) // 40)
        self._spanned: set[str] = set()  # prefixes whose spanned run has been written
        self.failed_step = self.not_converged_step + 20 if self.not_converged_step + 20 < steps else 0
        self.eos_active = False
        self.warned = False
        self.collapsed = False
        # Per-layer baseline of the alignment mean: LM head and first MLP layers are one-sided early.
        self.sa_base = {m: (0.45 if m == "head" or m.endswith("fc1") and m.startswith("blocks.0") else 0.03)
                        for m in linears}  # fmt: skip
        # Layers that drift to one-sided alignment before an explosion.
        self.drifting = set(linears[1::3])
        self.sigma1 = {m: 1.0 + 0.5 * rng.random() for m in linears}
        self.prev_top: np.ndarray | None = None
        # A child of the run's seed: the signals below draw from it and leave self.rng's stream alone.
        self.srng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        self.monitor_window: deque[float] = deque(maxlen=200)  # the monitor's seconds of the last steps

    # -- shape of the run ------------------------------------------------------------------------------

    def _severity(self, step: int) -> float:
        """0 when healthy, rising to 1 over the 40 steps before ``explode_at``, > 1 afterwards."""
        if self.explode_at is None:
            return 0.0
        return max(0.0, (step - (self.explode_at - 40)) / 40.0)

    def _loss(self, step: int) -> float:
        base = 2.3 * math.exp(-step / max(20.0, self.steps / 4)) + 0.35
        loss = base * math.exp(0.03 * self.rng.standard_normal())
        if self.explode_at is not None and step >= self.explode_at:
            if self.nan_from is not None and step >= self.nan_from:
                return math.nan
            if step == self.explode_at + 8:
                return math.inf
            loss *= math.exp((step - self.explode_at + 1) / 1.5)
        return loss

    def step(self, step: int) -> tuple[list[Record], list[Event], list[Status]]:
        records: list[Record] = []
        events: list[Event] = []
        statuses: list[Status] = []
        rng = self.rng
        diverged = self.nan_from is not None and step >= self.explode_at + 8
        lr = _lr(step, self.steps)
        sev = self._severity(step)

        for diag, (every, _) in SCHEDULE.items():
            if step % every:
                continue
            draw = self.srng if diag in _OWN_STREAM else rng
            seconds = float({1: 0.002, 5: 0.03, 10: 0.08, 20: 0.6}[every] * (1 + 0.2 * draw.random()))
            out: list[Record] = []
            status = Status(diag, "ok", None, seconds, None)
            if diverged and every > 1:
                status = Status(diag, "failed", "loss is not finite; no estimate", seconds, 0)
                if diag == "hessian_eigen":
                    events.append(Event("estimator_failed", f"{diag} failed at step {step}: loss is not finite",
                                        "error", data={"diagnostic": diag}))  # fmt: skip
            elif diag == "ggn_eigen" and step == self.failed_step:
                status = Status(diag, "failed", "NonDeterministicOperatorError: products with the same vector "
                                "differ by 3.2e-04 (dropout active?)", seconds, 2)  # fmt: skip
                events.append(Event("estimator_failed", f"ggn_eigen failed at step {step}: operator is not "
                                    "deterministic", "warning", data={"diagnostic": diag, "difference": 3.2e-4}))  # fmt: skip
            else:
                out, status, more = getattr(self, "_" + diag)(step, lr, sev, seconds)
                events += more
            records += out
            records.append(Record("monitor_seconds", seconds, key=diag))
            statuses.append(status)
        # The amortised overhead against the fixed clock's half second of training per step.
        self.monitor_window.append(sum(s.seconds for s in statuses))
        overhead = sum(self.monitor_window) / (_TRAIN_SECONDS * len(self.monitor_window))
        records.append(Record("monitor_overhead", overhead))
        records.append(Record("monitor_stride", 1.0))  # half-second steps: every-step diagnostics every step
        return records, events, statuses

    # -- diagnostics -----------------------------------------------------------------------------------

    def _basics(self, step, lr, sev, seconds):
        rng = self.rng
        loss = self._loss(step)
        events: list[Event] = []
        bad_grads = 0
        scale = 1.0 if self.explode_at is None or step < self.explode_at else math.exp(step - self.explode_at)
        if step == self.nonfinite_step:
            bad_grads = 3
            events.append(Event("nonfinite", f"3 non-finite gradient entries at step {step} (blocks.0.attn.qkv.weight)",
                                "warning", metric="grad_norm", key="blocks.0.attn.qkv.weight",
                                data={"count": 3}))  # fmt: skip
        if not math.isfinite(loss) and (step == self.explode_at + 8 or step == self.nan_from):
            events.append(Event("nonfinite", f"loss is {loss} at step {step}", "error", metric="loss",
                                data={"loss": str(loss)}))  # fmt: skip
        if self.explode_at is not None and step == self.explode_at + 2:
            events.append(Event("loss_explosion", f"loss rose to {loss:.3g}, over 2x its lowest value so far",
                                "error", metric="loss", key="all", data={"loss": loss}))  # fmt: skip
        recs = [
            Record("loss", loss),
            Record("learning_rate", lr),
            Record("nonfinite_grads", float(bad_grads)),
            Record("nonfinite_loss", 0.0 if math.isfinite(loss) else 1.0),
        ]
        total_g = total_w = 0.0
        for p in self.params:
            g = float(np.exp(rng.normal(-1.0, 0.3)) * scale * (1 + 2 * sev))
            if self.nan_from is not None and step >= self.nan_from:
                g = math.nan
            elif self.explode_at is not None and step == self.explode_at + 8:
                g = math.inf
            if bad_grads and p == "blocks.0.attn.qkv.weight":
                g = math.inf
            w = float(np.sqrt(np.prod(self.params[p])) * 0.02 * (1 + step / (2 * self.steps)) * (1 + sev))
            recs.append(Record("grad_norm", g, key=p))
            recs.append(Record("weight_norm", w, key=p))
            recs.append(Record("update_ratio", lr * g / w, key=p))
            total_g += g * g
            total_w += w * w
        recs.append(Record("grad_norm", math.sqrt(total_g)))
        recs.append(Record("weight_norm", math.sqrt(total_w)))
        recs.append(Record("update_ratio", lr * math.sqrt(total_g) / math.sqrt(total_w)))
        return recs, Status("basics", "ok", None, seconds), events

    def _gsnr(self, step, lr, sev, seconds):
        recs = []
        decay = 1.0 / (1 + step / 50)
        means, medians = [], []
        for p in self.params:
            mean = float(0.5 * decay * np.exp(self.rng.normal(0, 0.3)))
            median = mean * 0.3
            means.append(mean)
            medians.append(median)
            recs += [Record("gsnr_mean", mean, key=p), Record("gsnr_median", median, key=p)]
            # The uncorrected ratio is N/(N-1) (corrected + 1/N); N = 32 here. No draw: earlier streams unchanged.
            recs += [Record("gsnr_raw_mean", (mean + 1 / 32) * 32 / 31, key=p),
                     Record("gsnr_raw_median", (median + 1 / 32) * 32 / 31, key=p)]  # fmt: skip
        b_simple = float(40 * (1 + step / 20) * np.exp(self.rng.normal(0, 0.1)))
        sqnorm = 0.5 * decay
        recs += [Record("gsnr_mean", float(np.mean(means))), Record("gsnr_median", float(np.median(medians))),
                 Record("gsnr_raw_mean", (float(np.mean(means)) + 1 / 32) * 32 / 31),
                 Record("gsnr_raw_median", (float(np.median(medians)) + 1 / 32) * 32 / 31),
                 Record("grad_noise_scale", b_simple), Record("grad_noise_trace", b_simple * sqnorm),
                 Record("grad_noise_sqnorm", sqnorm)]  # fmt: skip
        return recs, Status("gsnr", "ok", None, seconds), []

    def _gsnr_microbatch(self, step, lr, sev, seconds):
        # Micro-batch GSNR estimates about (micro-batch size) x the per-sample GSNR: a different series.
        mean = float(8 * 0.5 / (1 + step / 50) * np.exp(self.rng.normal(0, 0.3)))
        recs = [Record("gsnr_microbatch_mean", mean), Record("gsnr_microbatch_median", mean * 0.3)]
        return recs, Status("gsnr_microbatch", "ok", None, seconds), []

    def _rank(self, step, lr, sev, seconds):
        recs, events = [], []
        for m in self.linears:
            rows, cols = self.params[f"{m}.weight"]
            full = min(rows, cols)
            collapse = 1.0 - 0.8 * min(1.0, sev) if m in self.drifting else 1.0
            w_er = full * (0.9 - 0.2 * step / self.steps) * (1 - 0.3 * (1 - collapse))
            a_er = full * 0.5 * collapse * np.exp(self.rng.normal(0, 0.02))
            recs += [
                Record("weight_effective_rank", float(w_er), key=m),
                Record("weight_stable_rank", float(w_er / 6), key=m),
                Record("grad_effective_rank", float(full * 0.2 * np.exp(self.rng.normal(0, 0.1))), key=m),
                Record("grad_stable_rank", float(1.5 + self.rng.random()), key=m),
                Record("activation_effective_rank", float(a_er), key=m),
                Record("activation_stable_rank", float(a_er / 8), key=m),
                Record(
                    "activation_alpha_req",
                    float(0.9 + 0.6 * (1 - collapse) + 0.05 * self.rng.normal()),
                    key=m,
                ),
            ]
        if sev >= 0.75 and not self.collapsed:
            self.collapsed = True
            events.append(Event("rank_collapse", f"activation effective rank of {sorted(self.drifting)[0]} fell "
                                "below 50% of its baseline", "warning", metric="activation_effective_rank",
                                key=sorted(self.drifting)[0], data={"fraction_of_baseline": 0.45}))  # fmt: skip
        return recs, Status("rank", "ok", None, seconds), events

    def _top_eigs(self, step: int, lr: float, scale: float = 1.0) -> np.ndarray:
        threshold = 2.0 / lr
        progressive = 5.0 + 100.0 * step / self.steps  # reaches 2/lr at about 35%
        lam1 = min(progressive, threshold * (1.0 + 0.04 * self.rng.random()))
        return scale * lam1 * np.array([1.0, 0.55, 0.3]) * np.exp(self.rng.normal(0, 0.02, _TOP_K))

    def _eigen(self, prefix, step, lr, seconds):
        eig = np.sort(self._top_eigs(step, lr, 1.0 if prefix == "hessian" else 0.9))[::-1]
        converged = np.ones(_TOP_K)
        residual = np.abs(eig) * 10 ** self.rng.uniform(-6, -4, _TOP_K)
        status = Status(f"{prefix}_eigen", "ok", None, seconds, 40)
        if prefix == "hessian" and step == self.not_converged_step:
            converged[-1] = 0.0
            residual[-1] = abs(eig[-1]) * 0.05
            status = Status("hessian_eigen", "not_converged", "max_matvecs=60 reached; eigenvalue 2 residual "
                            "5.0e-02 > tol 1e-03", seconds, 60)  # fmt: skip
        if prefix == "hessian":
            self.last_eig = eig  # sharpness is the Hessian's, not the GGN's
        recs = []
        for i in range(_TOP_K):
            recs += [Record(f"{prefix}_eigenvalue", float(eig[i]), index=i),
                     Record(f"{prefix}_residual", float(residual[i]), index=i),
                     Record(f"{prefix}_converged", float(converged[i]), index=i)]  # fmt: skip
        bottom = -0.05 * eig[0] * self.rng.random() if prefix == "hessian" else 1e-6 * self.rng.random()
        recs.append(Record(f"{prefix}_bottom_eigenvalue", float(bottom)))
        unconverged = prefix == "hessian" and step == self.not_converged_step
        if step >= self.not_converged_step and not unconverged and prefix not in self._spanned:
            # A run that began at an earlier probe and ended here says which step it measured.
            self._spanned.add(prefix)
            recs.append(Record(f"{prefix}_probe_step", float(max(0, step - 10))))
        return recs, status, []

    def _hessian_eigen(self, step, lr, sev, seconds):
        return self._eigen("hessian", step, lr, seconds)

    def _ggn_eigen(self, step, lr, sev, seconds):
        return self._eigen("ggn", step, lr, seconds)

    def _density(self, prefix, step, lr, seconds):
        lam = self._top_eigs(step, lr)[0]
        low = -0.05 * lam if prefix == "hessian" else 0.0
        recs = []
        for probe in range(_PROBES):
            # Bulk near zero plus a few outliers: most weight on small Ritz values.
            bulk = np.sort(self.rng.uniform(low, 0.05 * lam, _NODES - 2))
            nodes = np.concatenate([bulk, [0.5 * lam, lam]])
            weights = np.concatenate([self.rng.dirichlet(np.ones(_NODES - 2)) * 0.97, [0.02, 0.01]])
            for j in range(_NODES):
                recs += [Record(f"{prefix}_density_node", float(nodes[j]), index=probe * _NODES + j),
                         Record(f"{prefix}_density_weight", float(weights[j]), index=probe * _NODES + j)]  # fmt: skip
        if step >= self.not_converged_step and f"{prefix}_density" not in self._spanned:
            self._spanned.add(f"{prefix}_density")  # a probe spread over calls says which step it measured
            recs.append(Record(f"{prefix}_density_probe_step", float(max(0, step - 10))))
        return recs, Status(f"{prefix}_density", "ok", None, seconds, _PROBES * _NODES), []

    def _hessian_density(self, step, lr, sev, seconds):
        return self._density("hessian", step, lr, seconds)

    def _ggn_density(self, step, lr, sev, seconds):
        return self._density("ggn", step, lr, seconds)

    def _trace(self, prefix, step, lr, seconds):
        trace = float(self._top_eigs(step, lr)[0] * 4.0 * np.exp(self.rng.normal(0, 0.05)))
        recs = [Record(f"{prefix}_trace", trace), Record(f"{prefix}_trace_stderr", abs(trace) * 0.03)]
        if step >= self.not_converged_step and f"{prefix}_trace" not in self._spanned:
            self._spanned.add(f"{prefix}_trace")  # a probe spread over calls says which step it measured
            recs.append(Record(f"{prefix}_trace_probe_step", float(max(0, step - 10))))
        return recs, Status(f"{prefix}_trace", "ok", None, seconds, 30), []

    def _hessian_trace(self, step, lr, sev, seconds):
        return self._trace("hessian", step, lr, seconds)

    def _ggn_trace(self, step, lr, sev, seconds):
        return self._trace("ggn", step, lr, seconds)

    def _sharpness(self, step, lr, sev, seconds):
        eig = getattr(self, "last_eig", None)
        s = float(eig[0]) if eig is not None else float(self._top_eigs(step, lr)[0])
        adam_threshold = 38.0 / lr
        adam_s = adam_threshold * (0.2 + 0.7 * step / self.steps)
        trace = s * 4.0
        recs = [
            Record("sharpness", s), Record("stability_threshold", 2.0 / lr), Record("sharpness_ratio", s * lr / 2),
            Record("adam_sharpness", adam_s), Record("adam_threshold", adam_threshold),
            Record("adam_sharpness_ratio", adam_s / adam_threshold), Record("trace_ratio", trace * lr / 2),
        ]  # fmt: skip
        if step >= self.not_converged_step and "sharpness" not in self._spanned:
            self._spanned.add("sharpness")  # a probe spread over calls says which step it measured
            recs.append(Record("sharpness_probe_step", float(max(0, step - 10))))
        events = []
        ratio = s * lr / 2
        if ratio >= 1.0 and not self.eos_active:
            self.eos_active = True
            events.append(Event("edge_of_stability", f"sharpness {s:.3g} reached 2/lr = {2 / lr:.3g} "
                                f"(ratio {ratio:.3f})", "info", metric="sharpness_ratio", key="all",
                                data={"sharpness": s, "threshold": 2 / lr}))  # fmt: skip
        elif ratio < 0.9:
            self.eos_active = False
        return recs, Status("sharpness", "ok", None, seconds), events

    def _subspace(self, step, lr, sev, seconds):
        frac = float(np.clip(0.6 + 0.1 * self.rng.normal(), 0, 1))
        recs = [
            Record("grad_subspace_fraction", frac),
            Record("update_subspace_fraction", float(np.clip(frac * 0.8, 0, 1))),
            Record("grad_hessian_overlap", float(np.clip(0.7 + 0.1 * self.rng.normal(), -1, 1))),
            Record("subspace_overlap_ref", float(np.clip(1.0 - step / (1.5 * self.steps), 0, 1))),
        ]
        if self.prev_top is not None:
            recs.append(Record("subspace_overlap_prev", float(np.clip(0.9 + 0.05 * self.rng.normal(), 0, 1))))
        self.prev_top = np.ones(1)
        return recs, Status("subspace", "ok", None, seconds, 1), []

    def _spectral_alignment(self, step, lr, sev, seconds):
        recs = []
        edges = np.linspace(-1.0, 1.0, 21)
        for m in self.linears:
            mu = self.sa_base[m] + (0.75 * min(1.0, sev) ** 2 if m in self.drifting else 0.0)
            a = np.clip(self.rng.normal(mu, 0.3 * (1 - 0.5 * min(1.0, sev)), _TOKENS), -1.0, 1.0)
            p_pos = float(np.mean(a > 0))
            hist, _ = np.histogram(a, bins=edges)
            self.sigma1[m] *= 1.0 + 0.002 + (0.05 * sev if m in self.drifting else 0.0)
            recs += [
                Record("sa_positive_fraction", p_pos, key=m),
                Record("sa_sign_diversity", 1.0 - abs(2 * p_pos - 1), key=m),
                Record("sa_mean", float(a.mean()), key=m),
                Record("sa_mean_abs", float(np.abs(a).mean()), key=m),
                Record("sa_sigma1", float(self.sigma1[m]), key=m),
            ]
            recs += [
                Record("sa_quantile", float(q), key=m, index=i)
                for i, q in enumerate(np.quantile(a, _QUANTILES))
            ]
            recs += [Record("sa_histogram", float(h / _TOKENS), key=m, index=i) for i, h in enumerate(hist)]
        return recs, Status("spectral_alignment", "ok", None, seconds), []

    def _explosion_detector(self, step, lr, sev, seconds):
        score = float(np.clip(0.08 + 0.03 * self.rng.random() + 0.9 * min(1.0, sev) ** 2, 0, 1))
        events = []
        if score > 0.5 and not self.warned:
            self.warned = True
            events.append(Event("explosion_warning", f"sign diversity of {len(self.drifting)} layers collapsed "
                                f"against their baselines (score {score:.2f})", "warning", metric="explosion_score",
                                key="all", data={"score": score, "layers": sorted(self.drifting)}))  # fmt: skip
        return [Record("explosion_score", score)], Status("explosion_detector", "ok", None, seconds), events

    def _attention_stats(self, step, lr, sev, seconds):
        r, recs, tops, means, mins = self.srng, [], [], [], []
        for m in self.attention:
            top = float(6 + 3 * step / self.steps + 25 * sev ** 2 + r.random())
            mean = float(max(0.05, 3.2 - 0.4 * step / self.steps - 2.5 * min(1.0, sev) ** 2 + 0.05 * r.random()))
            low = float(max(0.01, mean - 0.6 - 0.2 * r.random() - 0.5 * min(1.0, sev)))
            recs += [Record("attn_logit_max", top, key=m), Record("attn_entropy_mean", mean, key=m),
                     Record("attn_entropy_min", low, key=m)]  # fmt: skip
            tops.append(top)
            means.append(mean)
            mins.append(low)
        recs += [Record("attn_logit_max", max(tops)), Record("attn_entropy_mean", float(np.mean(means))),
                 Record("attn_entropy_min", min(mins)), Record("attn_modules", float(len(self.attention)))]  # fmt: skip
        return recs, Status("attention_stats", "ok", None, seconds), []

    def _output_logits(self, step, lr, sev, seconds):
        r = self.srng
        lz = float(6.3 + 0.8 * step / self.steps + 12 * sev ** 2 + 0.05 * r.standard_normal())
        recs = [Record("output_logit_max", float(lz + 4 + 0.3 * r.random() + 10 * sev ** 2)),
                Record("output_log_z_mean", lz), Record("output_log_z_max", float(lz + 1.5 + 0.3 * r.random()))]  # fmt: skip
        return recs, Status("output_logits", "ok", None, seconds), []

    def _adam_state(self, step, lr, sev, seconds):
        r, recs = self.srng, []
        for p in self.params:
            recs += [
                Record("adam_update_rms", float(0.2 + 0.05 * r.random() + 0.8 * sev ** 2), key=p),
                Record("adam_update_grad_cosine", float(0.3 + 0.1 * r.random() - 0.2 * min(1.0, sev)), key=p),
                Record("adam_small_grad_fraction", float(0.08 + 0.02 * r.random() + 0.4 * min(1.0, sev)), key=p),
            ]
        recs += [Record("adam_update_rms", float(0.22 + 0.8 * sev ** 2)),
                 Record("adam_update_grad_cosine", float(0.32 - 0.2 * min(1.0, sev))),
                 Record("adam_small_grad_fraction", float(0.09 + 0.4 * min(1.0, sev)))]  # fmt: skip
        base = 1e-3 * (1 + 2 * sev) * np.exp(np.array([-4.0, -2.5, -1.2, 0.0, 1.0, 2.2, 3.5]))
        recs += [Record("adam_sqrt_v_quantile", float(v * (1 + 0.05 * r.random())), index=i)
                 for i, v in enumerate(base)]  # fmt: skip
        return recs, Status("adam_state", "ok", None, seconds), []

    def _attention_logits(self, step, lr, sev, seconds):
        recs = [Record("max_attention_logit", float(8 + 4 * step / self.steps + 30 * sev ** 2 + self.rng.random()),
                       key=m) for m in self.attention]  # fmt: skip
        return recs, Status("attention_logits", "ok", None, seconds), []

    def _activation_kurtosis(self, step, lr, sev, seconds):
        recs = [Record("activation_kurtosis", float(3.2 + 0.5 * self.rng.random() + 20 * sev ** 2), key=m)
                for m in self.linears]  # fmt: skip
        return recs, Status("activation_kurtosis", "ok", None, seconds), []
