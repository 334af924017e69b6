"""The catalogue of names a run store holds: every metric ID and every meta key, in one place. No torch.

Metric IDs are written by the registered diagnostics (each declares its IDs in ``Diagnostic.metrics``),
by the Monitor itself (``monitor_seconds``) and by the explosion benchmark's probes; they are read by the
report's panels (``Panel.metrics``), by the synthetic run of :mod:`diagnostics.testing.synthetic` and by
users through ``open_run(...).series(metric=...)``. Those lists never import each other, so this
catalogue is the one they are all checked against (``tests/store/test_catalog.py``): a metric added to a
diagnostic but not here, not to a panel, or not to the synthetic run fails a test. Renaming an ID is a
schema change. The definitions behind each ID are in ``docs/metrics.md``.

Each :class:`MetricSpec` says what the ``key`` and ``index`` columns of its rows hold (its ``kind``),
which diagnostic writes it (by its registered name, with the constructor options under which it does),
and, when no report panel draws it, why.

Meta keys are JSON values in the store's ``meta`` table; :data:`META` lists every key this package
writes and who writes it. ``Monitor.set_meta`` also accepts keys of the user's own.

    >>> METRICS["hessian_eigenvalue"].kind, METRICS["hessian_eigenvalue"].diagnostic
    ('vector', 'hessian_top')
    >>> METRICS["ggn_bottom_eigenvalue"].diagnostic, dict(METRICS["ggn_bottom_eigenvalue"].options)
    ('ggn_top', {'bottom': True})
    >>> written_by("nonfinite")
    ('nonfinite_grads', 'nonfinite_loss')
    >>> META["model_fingerprint"].writer
    'monitor'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "KINDS",
    "SCALAR",
    "PER_LAYER",
    "VECTOR",
    "PER_LAYER_VECTOR",
    "PER_DIAGNOSTIC",
    "MetricSpec",
    "MetaKey",
    "METRICS",
    "META",
    "metric_ids",
    "written_by",
    "store_meta_keys",
    "monitor_meta_keys",
    "own_meta_keys",
    "ADAM_SETTLING_REASON",
]

#: How the ``sharpness`` diagnostic's status reason begins at a probe where Adam's preconditioner is still
#: settling (its ``adam_sharpness_ratio`` is stored but not compared with 1): readers find those probes by it.
ADAM_SETTLING_REASON = "Adam's preconditioner is still settling"

# --- kinds: what the key and index columns of a metric's rows hold ----------------------------------------
#: One value per step (key ``"all"``, or a curvature block when blocks are chosen; index 0).
SCALAR = "scalar"
#: One value per parameter or module (``key`` = its name), often with the whole-model value under ``"all"``.
PER_LAYER = "per-layer"
#: A vector per step: eigenvalues, quadrature nodes, parameter groups (``index`` numbers the entries).
VECTOR = "vector"
#: A vector per module (``key`` = module, ``index`` = entry): quantiles, histograms.
PER_LAYER_VECTOR = "per-layer vector"
#: One value per diagnostic (``key`` = the diagnostic's name in the status table).
PER_DIAGNOSTIC = "per-diagnostic"
KINDS = (SCALAR, PER_LAYER, VECTOR, PER_LAYER_VECTOR, PER_DIAGNOSTIC)


@dataclass(frozen=True)
class MetricSpec:
    """One metric ID of the store.

    Attributes:
        id: the stable snake_case metric ID.
        kind: one of :data:`KINDS`.
        keys: what the ``key`` column holds, in words.
        family: the heading of the section of ``docs/metrics.md`` that defines it.
        meaning: one line: what the number is.
        diagnostic: registered name of the diagnostic that writes it; ``None`` when no registered
            diagnostic does (see ``writer``).
        options: constructor options under which ``diagnostic`` writes it (``bottom=True``).
        writer: the name its writer has in the status table and in ``monitor_seconds``' keys: the
            diagnostic's name, ``"monitor"`` for the Monitor itself, or the benchmark's probe.
        not_shown: why no panel of the report declares it; empty when one does.
    """

    id: str
    kind: str
    keys: str
    family: str
    meaning: str
    diagnostic: str | None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    writer: str = ""
    not_shown: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if not self.writer:
            if self.diagnostic is None:
                raise ValueError(f"metric {self.id!r}: give the writer when no registered diagnostic writes it")
            object.__setattr__(self, "writer", self.diagnostic)


@dataclass(frozen=True)
class MetaKey:
    """One key of the store's ``meta`` table.

    Attributes:
        key: the key.
        writer: ``"store"`` (the RunWriter, in every store), ``"monitor"`` (every run the Monitor opens),
            ``"monitor-state"`` (the Monitor, when it saves diagnostics' state), ``"analyze"``,
            ``"integration"``, ``"combine"`` or ``"benchmark"`` (the explosion suite's trainer).
        meaning: what the JSON value holds.
        own: it describes the store file rather than the training run, so ``combine`` writes its own
            value instead of merging the inputs'.
    """

    key: str
    writer: str
    meaning: str
    own: bool = False


# --- metric IDs --------------------------------------------------------------------------------------------
_ALL = '"all"'
_PARAM = 'parameter name, and "all" for the whole model'
_MATRIX = "parameter name of each matrix-shaped parameter"
_MODULE = "module name"
_BLOCK = 'curvature block ("all" for the whole model, the default)'
_RESIDUAL_NOTE = ("quality detail behind the converged flags; read it with open_run(...).series or "
                  "tdiag export")
_BASELINE_NOTE = ("written only by the explosion benchmark's probes; its own panel "
                  "(benchmarks/explosions/baselines_panel.py) draws it through build_report(extra_panels=...)")


def _curvature(p: str) -> list[MetricSpec]:
    """The IDs of ``{p}_top``, ``{p}_density`` and ``{p}_trace``, for ``p`` = ``"hessian"`` or ``"ggn"``."""
    name = "Hessian" if p == "hessian" else "Gauss-Newton matrix"

    def spec(suffix: str, kind: str, base: str, meaning: str, options: Mapping[str, Any] | None = None,
             not_shown: str = "") -> MetricSpec:
        return MetricSpec(f"{p}_{suffix}", kind, _BLOCK, "Hessian spectra", meaning, f"{p}_{base}", options or {},
                          not_shown=not_shown)

    return [
        spec("eigenvalue", VECTOR, "top", f"k largest algebraic eigenvalues of the {name}, index 0 the largest"),
        spec("residual", VECTOR, "top", "Lanczos residual ||A y - theta y|| of each eigenvalue",
             not_shown=_RESIDUAL_NOTE),
        spec("converged", VECTOR, "top", "1 when the eigenvalue's residual is within tol * |theta|, else 0"),
        spec("bottom_eigenvalue", SCALAR, "top", f"smallest algebraic eigenvalue of the {name}", {"bottom": True}),
        spec("probe_step", SCALAR, "top", "the step whose curvature the eigenvalues describe, for a run that "
             "spanned several probes (stored with them when it ends)",
             not_shown="the eigenvalue charts plot a run that spanned several probes at the step this series names"),
        spec("density_node", VECTOR, "density", "SLQ quadrature nodes (Ritz values), index = probe * steps + j"),
        spec("density_weight", VECTOR, "density", "SLQ quadrature weights; each probe's weights sum to 1"),
        spec("density_probe_step", SCALAR, "density", "the step whose curvature a density probe that spanned several "
             "calls measured (stored with it when it ends)",
             not_shown="the density panel draws a probe that spanned several calls at the step this series names"),
        spec("trace", SCALAR, "trace", f"trace of the {name} by Hutch++"),
        spec("trace_stderr", SCALAR, "trace", "standard error of the trace estimate"),
        spec("trace_probe_step", SCALAR, "trace", "the step whose curvature a trace probe that spanned several "
             "calls measured (stored with it when it ends)",
             not_shown="the trace chart draws a probe that spanned several calls at the step this series names"),
    ]


def _family(family: str, keys: str, diagnostic: str | None, *entries: tuple[str, str, str], **extra: Any,
            ) -> list[MetricSpec]:
    """Specs of one family sharing keys and writer: ``entries`` are ``(id, kind, meaning)``."""
    return [MetricSpec(i, kind, keys, family, meaning, diagnostic, **extra) for i, kind, meaning in entries]


_NONFINITE_NOTE = "counted in the report's findings (with the nonfinite events), not drawn"
_SHARP = "Sharpness and edge of stability"
_SUBSPACE = "Gradient-subspace alignment"
_SA = "Spectral alignment"
_ATTN = "Attention and output logits"

_METRICS: tuple[MetricSpec, ...] = (
    *_family("Training signals", _ALL, "loss",
             ("loss", SCALAR, "the loss passed to monitor.step (mean over the batch)")),
    *_family("Training signals", _ALL, "learning_rate",
             ("learning_rate", VECTOR, "the optimizer's learning rate, index = parameter group")),
    *_family("Training signals", _PARAM, "grad_norm", ("grad_norm", PER_LAYER, "L2 norm of the gradient")),
    *_family("Training signals", _PARAM, "weight_norm", ("weight_norm", PER_LAYER, "L2 norm of the parameters")),
    *_family("Training signals", _PARAM, "update_ratio",
             ("update_ratio", PER_LAYER, "||theta_after - theta_before|| / ||theta_before||")),
    *_family("Training signals", '"all", and each parameter with non-finite entries', "nonfinite",
             ("nonfinite_grads", PER_LAYER, "number of NaN or infinite gradient entries"), not_shown=_NONFINITE_NOTE),
    *_family("Training signals", _ALL, "nonfinite",
             ("nonfinite_loss", SCALAR, "1 when the loss is NaN or infinite, else 0"), not_shown=_NONFINITE_NOTE),
    *_family("GSNR", _PARAM, "gsnr",
             ("gsnr_mean", PER_LAYER, "mean over parameter entries of the bias-corrected per-sample GSNR"),
             ("gsnr_median", PER_LAYER, "median over parameter entries of the bias-corrected per-sample GSNR")),
    *_family("GSNR", _PARAM, "gsnr",
             ("gsnr_raw_mean", PER_LAYER, "mean of the uncorrected ratio mean^2 / population variance"),
             ("gsnr_raw_median", PER_LAYER, "median of the uncorrected ratio mean^2 / population variance"),
             not_shown="biased upwards by about 1/N; kept to compare with published numbers, the report draws "
                       "the corrected gsnr_mean / gsnr_median"),
    *_family("GSNR", _ALL, "gsnr", ("grad_noise_scale", SCALAR,
                                    "gradient noise scale: running tr(Sigma) over running ||G||^2")),
    *_family("GSNR", _ALL, "gsnr",
             ("grad_noise_trace", SCALAR, "running average of the unbiased estimate of tr(Sigma)"),
             ("grad_noise_sqnorm", SCALAR, "running average of the unbiased estimate of ||G||^2"),
             not_shown="the two parts of grad_noise_scale, which the report draws; read them with open_run"),
    *_family("GSNR", _PARAM, "gsnr_microbatch",
             ("gsnr_microbatch_mean", PER_LAYER, "mean GSNR across micro-batch gradients (a different estimator)"),
             ("gsnr_microbatch_median", PER_LAYER, "median GSNR across micro-batch gradients")),
    *_family("Effective rank", _MATRIX, "weight_rank",
             ("weight_effective_rank", PER_LAYER, "effective rank of the weight matrix"),
             ("weight_stable_rank", PER_LAYER, "stable rank ||W||_F^2 / ||W||_2^2 of the weight")),
    *_family("Effective rank", _MATRIX, "grad_rank",
             ("grad_effective_rank", PER_LAYER, "effective rank of the layer's gradient matrix"),
             ("grad_stable_rank", PER_LAYER, "stable rank of the layer's gradient matrix")),
    *_family("Effective rank", _MODULE, "activation_rank",
             ("activation_effective_rank", PER_LAYER, "effective rank of the layer's outputs (tokens x features)"),
             ("activation_stable_rank", PER_LAYER, "stable rank of the layer's outputs"),
             ("activation_alpha_req", PER_LAYER, "decay exponent of the outputs' covariance spectrum, ranks 11-100")),
    *_curvature("hessian"),
    *_curvature("ggn"),
    *_family(_SHARP, _BLOCK, "sharpness",
             ("sharpness", SCALAR, "largest eigenvalue of the training-loss Hessian"),
             ("stability_threshold", SCALAR, "largest stable curvature of (momentum) GD, 2/lr without momentum"),
             ("sharpness_ratio", SCALAR, "sharpness / stability_threshold; 1 = edge of stability"),
             ("adam_sharpness", SCALAR, "largest eigenvalue of Adam's preconditioned Hessian"),
             ("adam_threshold", SCALAR, "Adam's stability threshold (2 + 2 beta1) / ((1 - beta1) lr)"),
             ("adam_sharpness_ratio", SCALAR, "adam_sharpness / adam_threshold"),
             ("trace_ratio", SCALAR, "Tr(H) lr / 2; SGD's linear-stability bound is 1")),
    *_family(_SHARP, _BLOCK, "sharpness",
             ("sharpness_probe_step", SCALAR, "the step whose curvature and threshold a probe that spanned "
              "several calls measured (stored with them when it ends)"),
             not_shown="the sharpness charts plot a probe that spanned several calls at the step this series "
                       "names"),
    *_family(_SUBSPACE, _BLOCK, "grad_subspace",
             ("grad_subspace_fraction", SCALAR, "||P_k g||^2 / ||g||^2: share of the gradient in the top-k eigenspace"),
             ("update_subspace_fraction", SCALAR, "the same share for the optimizer's update"),
             ("grad_hessian_overlap", SCALAR, "g'Hg / (||g|| ||Hg||), a one-product proxy"),
             ("subspace_overlap_prev", SCALAR, "(1/k) Tr(P_t P_t') between the latest top-k eigenspace and the last"),
             ("subspace_overlap_ref", SCALAR, "(1/k) Tr(P_t P_ref) against the reference probe's eigenspace")),
    *_family(_SA, _MODULE, "spectral_alignment",
             ("sa_positive_fraction", PER_LAYER, "p+: fraction of tokens whose alignment <x, v1> / ||x|| is positive"),
             ("sa_sign_diversity", PER_LAYER, "1 - |2 p+ - 1|: 1 balanced, 0 one-sided"),
             ("sa_mean", PER_LAYER, "mean alignment over tokens"),
             ("sa_mean_abs", PER_LAYER, "mean |alignment| over tokens"),
             ("sa_quantile", PER_LAYER_VECTOR, "alignment quantiles 0.05, 0.25, 0.5, 0.75, 0.95 (index 0-4)"),
             ("sa_histogram", PER_LAYER_VECTOR, "fraction of tokens in 20 equal bins over [-1, 1] (index 0-19)"),
             ("sa_sigma1", PER_LAYER, "top singular value estimate ||W v1|| (a lower bound that converges)")),
    *_family("Loss explosion", _ALL, "explosion_detector",
             ("explosion_score", SCALAR, "the detector's score: its signal's deviation from the run's own baseline "
              "(a warning fires above the threshold), or, for the spectral-alignment detector, the mean over "
              "eligible layers of the deviation from their baselines, in [0, 1]")),
    *_family(_ATTN, 'attention module name (the module that made the call), and "all"', "attention_stats",
             ("attn_logit_max", PER_LAYER, "largest pre-softmax attention logit over heads, queries and allowed keys"),
             ("attn_entropy_mean", PER_LAYER, "mean attention entropy (nats) over heads, batch and queries"),
             ("attn_entropy_min", PER_LAYER, "smallest per-head mean attention entropy (nats)")),
    *_family(_ATTN, _ALL, "attention_stats",
             ("attn_modules", SCALAR, "number of attention modules measured in the probe forward"),
             not_shown="a check that the probe saw attention calls; read it with open_run(...).series"),
    *_family(_ATTN, _ALL, "output_logits",
             ("output_logit_max", SCALAR, "largest output logit over tokens and classes"),
             ("output_log_z_mean", SCALAR, "mean over tokens of log Z = logsumexp of the output logits"),
             ("output_log_z_max", SCALAR, "largest log Z over tokens")),
    *_family("Adam state", _PARAM, "adam_state",
             ("adam_update_rms", PER_LAYER, "RMS of Adam's normalised update m_hat / (sqrt(v_hat) + eps)"),
             ("adam_update_grad_cosine", PER_LAYER, "cosine between that update and the gradient"),
             ("adam_small_grad_fraction", PER_LAYER, "fraction of coordinates with g^2 < small_ratio * v_hat (0.01)")),
    *_family("Adam state", _ALL, "adam_state",
             ("adam_sqrt_v_quantile", VECTOR, "sqrt(v_hat) over all coordinates: min, q .05 .25 .5 .75 .95, max "
              "(index 0-6)")),
    # The explosion benchmark's baselines: no registered diagnostic writes them.
    *_family("Explosion baselines", "attention module name", None,
             ("max_attention_logit", PER_LAYER, "largest pre-softmax attention logit"),
             writer="suite_baselines", not_shown=_BASELINE_NOTE),
    *_family("Explosion baselines", "block name", None,
             ("activation_kurtosis", PER_LAYER, "kurtosis E[(h - mean)^4] / var^2 of the block's output"),
             writer="suite_baselines", not_shown=_BASELINE_NOTE),
    *_family("Cost", "diagnostic name (as in the status table)", None,
             ("monitor_seconds", PER_DIAGNOSTIC, "wall-clock seconds the diagnostic took at the step"),
             writer="monitor"),
    *_family("Cost", _ALL, None,
             ("monitor_overhead", SCALAR, "monitor time / training time over the last 200 steps (runs with a "
              "budget)"),
             ("monitor_stride", SCALAR, "steps between runs of the every-step diagnostics (runs with a budget; "
              "above 1 when they alone took more than half of it)"),
             writer="monitor"),
)

#: Every metric ID, in catalogue order (the order of ``docs/metrics.md``).
METRICS: Mapping[str, MetricSpec] = MappingProxyType({m.id: m for m in _METRICS})
if len(METRICS) != len(_METRICS):  # pragma: no cover - caught at import by every test
    raise ValueError("a metric ID is listed twice in the catalogue")


def metric_ids() -> tuple[str, ...]:
    """Every metric ID, in catalogue order."""
    return tuple(METRICS)


def written_by(*writers: str) -> tuple[str, ...]:
    """The IDs whose ``writer`` (the status-table name, e.g. ``"ggn_top"``) is one of ``writers``, in order."""
    unknown = set(writers) - {m.writer for m in _METRICS}
    if unknown:
        raise KeyError(f"no metric of the catalogue is written by {sorted(unknown)}")
    return tuple(m.id for m in _METRICS if m.writer in writers)


# --- meta keys ---------------------------------------------------------------------------------------------
_META: tuple[MetaKey, ...] = (
    MetaKey("schema_version", "store", "version of the table layout; managed by the store, never set by hand",
            own=True),
    MetaKey("run_name", "store", "the run's name (default: the run directory's name)", own=True),
    MetaKey("created", "store", "ISO 8601 UTC time the store was created", own=True),
    MetaKey("versions", "store", "versions of Python, SQLite, this package and its main dependencies "
            "(the Monitor adds torch)"),
    MetaKey("config", "monitor", "the user's Monitor(meta=...) options, or analyze's configuration"),
    MetaKey("model_summary", "monitor", "{class, num_params, num_trainable, parameters: {name: shape}}"),
    MetaKey("model_fingerprint", "monitor", "hash of parameter names and shapes; a resumed run must match it"),
    MetaKey("diagnostics", "monitor", "{diagnostic name: {class, settings}}: every estimator's settings"),
    MetaKey("gradients_seen", "monitor", "which gradients the diagnostics saw (after the user's backward; "
            "clipped under an adapter that clips; the mean-loss gradient for checkpoints)"),
    MetaKey("loss_reduction", "monitor", "the reduction of the loss curvature is measured on: mean"),
    MetaKey("curvature_mode", "monitor", "eval or train: the module mode inside curvature estimates"),
    MetaKey("activation_mode", "monitor", "the module mode of the extra forward of activation diagnostics"),
    MetaKey("num_classes", "monitor", "number of classes (default k of hessian_top), or null"),
    MetaKey("budget", "monitor", "the overhead budget (monitor time / training time) the schedules kept, or "
            "null for fixed schedules"),
    MetaKey("diagnostic_state", "monitor-state", "each diagnostic's declared cross-step state, and under a "
            "budget the schedule's (key monitor.budget), for resuming"),
    MetaKey("last_step", "monitor-state", "the last step the Monitor committed"),
    MetaKey("analysis_mode", "analyze", "mode of the model during checkpoint analysis: eval"),
    MetaKey("integration", "integration", "{framework, version, ...}: the framework adapter that ran the "
            "Monitor, and its settings"),
    MetaKey("combined_from", "combine", "[{name, path}] of the runs merged into this one", own=True),
    MetaKey("combine_conflicts", "combine", "{key: {run name: value}} for meta keys whose inputs disagreed",
            own=True),
    MetaKey("combine_duplicates", "combine", "{table: rows dropped as duplicates} while merging", own=True),
    MetaKey("explosion_step", "benchmark", "step at which the benchmark run's loss exploded, or null"),
    MetaKey("final_step", "benchmark", "last step the benchmark run trained"),
    MetaKey("seconds", "benchmark", "wall-clock seconds of the benchmark run"),
    MetaKey("seconds_per_step", "benchmark", "seconds per training step of the benchmark run"),
    MetaKey("complete", "benchmark", "true once the benchmark run finished writing"),
)

#: Every meta key this package (and its benchmark) writes.
META: Mapping[str, MetaKey] = MappingProxyType({m.key: m for m in _META})


def store_meta_keys() -> tuple[str, ...]:
    """Keys the RunWriter writes into every store."""
    return tuple(m.key for m in _META if m.writer == "store")


def monitor_meta_keys() -> tuple[str, ...]:
    """Keys the Monitor writes when it opens a run (on top of :func:`store_meta_keys`)."""
    return tuple(m.key for m in _META if m.writer == "monitor")


def own_meta_keys() -> frozenset[str]:
    """Keys that describe a store file itself; ``combine`` writes its own rather than copying the inputs'."""
    return frozenset(m.key for m in _META if m.own)
