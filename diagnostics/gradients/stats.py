"""Gradient statistics from per-sample (or per-micro-batch) gradients: GSNR and the gradient noise scale.

All functions are pure: tensors in, tensors or floats out, computed in float64 on the input's device.

What a "sample" is. The leading dimension of each per-sample gradient indexes the units the batch is made
of, as :func:`diagnostics.gradients.per_sample_gradients` splits it: one image for a classifier, one
*sequence* for a language model (a batch of token ids ``[B, T]`` gives B per-sample gradients, each the
gradient of that sequence's loss, e.g. its mean token loss). Tokens within a sequence share context and
are not independent draws, so a per-token GSNR would be a different quantity; every statistic here
assumes the N units are independent draws from the data distribution.

Shapes: ``N`` gradients (the leading dimension), any parameter shape after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import ConfigError, DataError
from diagnostics.gradients.summaries import GSNRSummary, gsnr_summary, ratio_summaries

__all__ = [
    "GradientMoments",
    "gradient_moments",
    "gsnr",
    "gsnr_raw",
    "gsnr_summary",
    "GSNRSummary",
    "gradient_noise_scale",
    "noise_scale_parts",
    "gradient_noise_parts",
    "NoiseScaleParts",
    "NoiseScaleEMA",
    "microbatch_gsnr",
]

#: Floor of the variance in the GSNR denominator (elements with zero variance and zero mean give 0).
GSNR_EPS = 1e-20


def _check(per_sample: Mapping[str, Tensor], what: str) -> None:
    if not per_sample:
        raise DataError(f"{what}: no gradients given")
    for name, g in per_sample.items():
        if g.ndim < 1 or g.shape[0] < 2:
            raise DataError(
                f"{what}: {name!r} has {g.shape[0] if g.ndim else 0} gradient(s); at least 2 are needed"
            )


#: Bytes of the ``[N, chunk]`` temporary :func:`_moments` centres at once (on a CUDA device: more, since
#: there each chunk costs kernel launches while memory is recycled by the caching allocator).
_MOMENT_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def _moments(g: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, int]:
    """Mean and unbiased (N - 1) variance over the leading dimension (returned as float64), and N;
    written into ``out`` (two float64 tensors of ``g[0]``'s number of elements, e.g. views of a model-wide
    vector) when given, which saves a copy.

    Two passes in the gradients' own precision (float32 for half-precision input): the variance is of
    centred values, so its rounding error is of the order of the gradients' own, and a float64 copy of
    ``[N, P]`` would cost more than the gradients themselves (``torch.var_mean`` over dim 0 is slower
    still on the CPU). The centred values are formed a column chunk at a time
    (:data:`_MOMENT_CHUNK_BYTES`), so the temporary memory is a few megabytes rather than another
    ``[N, P]``, and on the CPU the temporary is not mapped afresh at each call: 2-5x faster from a few
    million elements on (benchmarks/RESULTS.md, "GSNR's moments a chunk at a time"). The values agree
    with the one-piece ones to the rounding of the reduction order.
    """
    g = _computable(g)
    n = g.shape[0]
    flat = g.reshape(n, -1)
    size = flat.shape[1]
    if size <= _moment_chunk(flat) and out is None:
        mean = g.mean(0)
        var = (g - mean).square_().sum(0).div_(n - 1)
        return mean.to(torch.float64), var.to(torch.float64), n
    if out is None:
        mean = torch.empty(size, dtype=torch.float64, device=g.device)
        var = torch.empty(size, dtype=torch.float64, device=g.device)
    else:
        mean, var = (t.view(-1) for t in out)
    for lo, hi, part_mean, part_var in moment_chunks(flat):
        var[lo:hi] = part_var
        mean[lo:hi] = part_mean
    return mean.view(g.shape[1:]), var.view(g.shape[1:]), n


def _computable(g: Tensor) -> Tensor:
    """``g`` detached, in float32 when it is in a half precision (the precision the moments are taken in)."""
    g = g.detach()
    return g if g.dtype in (torch.float32, torch.float64) else g.float()


def _moment_chunk(flat: Tensor) -> int:
    """Columns of ``flat`` (``[N, P]``) per chunk of :func:`moment_chunks`."""
    budget = _MOMENT_CHUNK_BYTES.get(flat.device.type, _MOMENT_CHUNK_BYTES["cpu"])
    return max(1, budget // (flat.shape[0] * flat.element_size()))


def moment_chunks(flat: Tensor) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """``(lo, hi, mean, var)`` over column chunks of ``flat`` (``[N, P]``, float32 or float64, N >= 2): the
    mean and unbiased variance of columns ``lo:hi`` in ``flat``'s dtype, the centred values formed a chunk
    (:data:`_MOMENT_CHUNK_BYTES`) at a time. What :func:`_moments` writes, for callers that reduce each
    chunk further instead of keeping the moments. Cost: two passes over ``flat``."""
    n, size = flat.shape
    chunk = _moment_chunk(flat)
    for lo in range(0, size, chunk):
        part = flat[:, lo : lo + chunk]
        part_mean = part.mean(0)
        yield lo, min(lo + chunk, size), part_mean, (part - part_mean).square_().sum(0).div_(n - 1)


@dataclass(frozen=True)
class GradientMoments:
    """Per-element mean and unbiased variance of N gradients, per parameter: everything GSNR and the
    noise scale need, so that one pass over the ``[N, P]`` gradients serves all of them.

    Attributes:
        mean: ``{name: float64 Tensor[...]}``, the mean gradient.
        var: ``{name: float64 Tensor[...]}``, the unbiased (N - 1) variance over the N gradients.
        n: the number of gradients N.
    """

    mean: Mapping[str, Tensor]
    var: Mapping[str, Tensor]
    n: int
    #: the same means and variances laid end to end (float64 ``[P]`` each), when built by :meth:`from_flat`.
    flat: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_flat(cls, grads: Tensor, layout: Sequence[tuple[str, torch.Size]]) -> GradientMoments:
        """The moments of N gradients laid end to end in the rows of ``grads`` (``[N, P]``), ``layout``
        naming each parameter's segment and shape in order. Cost: two passes over ``grads``, with no
        per-parameter operation but the views."""
        if grads.ndim != 2 or grads.shape[0] < 2:
            raise DataError(f"GradientMoments.from_flat needs [N, P] gradients with N >= 2, got {tuple(grads.shape)}")
        mean64, var64, n = _moments(grads)
        return cls.from_moments(mean64, var64, layout, n)

    @classmethod
    def from_moments(cls, mean64: Tensor, var64: Tensor, layout: Sequence[tuple[str, torch.Size]],
                     n: int) -> GradientMoments:
        """The moments of N gradients given laid end to end (float64 ``[P]`` means and unbiased variances),
        ``layout`` naming each parameter's segment and shape in order. No copy: the tensors are viewed, each
        parameter's view made when it is first read (the summaries and the noise parts read the vectors)."""
        views = _SegmentViews(mean64, layout)
        if views.total != mean64.numel():
            raise DataError(f"GradientMoments: the layout covers {views.total} of {mean64.numel()} values")
        return cls(mean=views, var=_SegmentViews(var64, layout), n=n, flat=(mean64, var64))

    def gsnr(self, eps: float = GSNR_EPS) -> dict[str, Tensor]:
        """:func:`gsnr`, the bias-corrected ratio per element."""
        return {k: (m.square() - self.var[k] / self.n) / self.var[k].clamp_min(eps) for k, m in self.mean.items()}

    def gsnr_raw(self, eps: float = GSNR_EPS) -> dict[str, Tensor]:
        """:func:`gsnr_raw`, the mean squared over the population variance."""
        n = self.n
        return {k: m.square() / (self.var[k] * (n - 1) / n).clamp_min(eps) for k, m in self.mean.items()}

    def microbatch_gsnr(self, eps: float = GSNR_EPS, gaussian: bool = True) -> dict[str, Tensor]:
        """:func:`microbatch_gsnr` (corrected) of the N micro-batch gradients these moments are over: the
        corrected ratio times ``(N - 3) / (N - 1)`` with ``gaussian``.

        Raises:
            DataError: fewer than 4 gradients with the Gaussian correction.
        """
        out = self.gsnr(eps)
        if gaussian:
            if self.n < 4:
                raise DataError(f"microbatch_gsnr's Gaussian correction (M - 3) / (M - 1) needs at least 4 "
                                f"micro-batch gradients, got {self.n}; use more micro-batches or pass gaussian=False")
            out = {k: v * ((self.n - 3) / (self.n - 1)) for k, v in out.items()}
        return out

    def summaries(self, eps: float = GSNR_EPS) -> tuple[GSNRSummary, GSNRSummary]:
        """``(gsnr_summary(self.gsnr(eps)), gsnr_summary(self.gsnr_raw(eps)))``, the second mostly mapped
        from the first, where the moments are (numpy on the CPU, torch on another device): see
        :func:`~diagnostics.gradients.summaries.ratio_summaries` for how and what it costs."""
        names = list(self.mean)
        sizes = self.mean.sizes if isinstance(self.mean, _SegmentViews) else [self.mean[k].numel() for k in names]
        if self.flat is not None:
            m, v = self.flat
        else:
            m = torch.cat([self.mean[k].reshape(-1) for k in names])
            v = torch.cat([self.var[k].reshape(-1) for k in names])
        return ratio_summaries(names, sizes, m, v, self.n, eps)

    def noise_parts(self) -> NoiseScaleParts:
        """:func:`gradient_noise_parts`: unbiased ``tr(Sigma)`` and ``|G|^2``."""
        if self.flat is not None and self.flat[0].device.type == "cpu":
            # numpy: a fraction of torch's cost per call on a small model, BLAS's dot on a large one
            m, v = self.flat[0].numpy(), self.flat[1].numpy()
            trace, sqnorm = float(v.sum()), float(m @ m)
        elif self.flat is not None:
            # dot, not square().sum(): no temporary as large as the model (1 GB at GPT-2 small)
            trace, sqnorm = float(self.flat[1].sum()), float(torch.dot(self.flat[0], self.flat[0]))
        else:
            trace = float(sum(v.sum() for v in self.var.values()))
            sqnorm = float(sum(torch.dot(m.reshape(-1), m.reshape(-1)) for m in self.mean.values()))
        return NoiseScaleParts(trace=trace, sqnorm=sqnorm - trace / self.n)


class _SegmentViews(Mapping[str, Tensor]):
    """``{name: view}`` of consecutive segments of one flat vector (``layout``: each name and shape in
    order), each view made when first read: on a small model building them all costs more than the
    arithmetic that reads the flat vector instead."""

    def __init__(self, flat: Tensor, layout: Sequence[tuple[str, torch.Size]]) -> None:
        self._flat = flat
        self._place: dict[str, tuple[int, int, torch.Size]] = {}
        self.sizes: list[int] = []
        at = 0
        for name, shape in layout:
            size = math.prod(shape)
            self._place[name] = (at, at + size, shape)
            self.sizes.append(size)
            at += size
        self.total = at
        self._views: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        view = self._views.get(name)
        if view is None:
            a, b, shape = self._place[name]
            view = self._views[name] = self._flat[a:b].view(shape)
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._place)

    def __len__(self) -> int:
        return len(self._place)


def gradient_moments(per_sample: Mapping[str, Tensor]) -> GradientMoments:
    """Mean and unbiased variance of each element over the leading dimension of each tensor.

    Args:
        per_sample: ``{name: Tensor[N, ...]}`` with N >= 2, e.g. from :func:`per_sample_gradients`.

    Returns:
        :class:`GradientMoments`. Cost: two passes over each tensor in its own precision (float32 for
        half-precision input); the results are float64.
    """
    _check(per_sample, "gradient_moments")
    mean, var, n = {}, {}, 0
    for name, g in per_sample.items():
        mean[name], var[name], n = _moments(g)
    return GradientMoments(mean=mean, var=var, n=n)


def gsnr(per_sample: Mapping[str, Tensor], eps: float = GSNR_EPS) -> dict[str, Tensor]:
    """Bias-corrected gradient signal-to-noise ratio per parameter element (Liu et al. 2020).

    The population GSNR of element j is ``mu_j^2 / sigma_j^2`` (mean and variance of the per-sample
    gradient over the data distribution). Over N independent per-sample gradients ``g_ij`` with sample
    mean ``m_j`` and unbiased variance ``s_j^2 = sum_i (g_ij - m_j)^2 / (N - 1)``::

        r_j = (m_j^2 - s_j^2 / N) / max(s_j^2, eps)

    Why: ``E[m^2] = mu^2 + sigma^2 / N`` and ``E[s^2] = sigma^2``, so ``m^2 - s^2 / N`` is unbiased for
    ``mu^2``, while the plain ratio ``m^2 / var`` (:func:`gsnr_raw`) carries the noise floor ``sigma^2 / N``
    in its numerator: a parameter with no signal at all reads about ``1 / (N - 3)`` (0.077 at N = 16)
    instead of 0. What remains is the bias of a ratio: for Gaussian gradients ``m`` and ``s^2`` are
    independent and ``E[1 / s^2] = (N - 1) / ((N - 3) sigma^2)``, so
    ``E[r] = (mu^2 / sigma^2) (N - 1) / (N - 3) + 2 / (N (N - 3))``: 0.0096 at zero signal and N = 16, and
    a relative excess ``2 / (N - 3)`` at large signal (7% at N = 32; the raw ratio's is ``3 / (N - 3)``
    plus its ``1/N`` floor). The factor ``(N - 3) / (N - 1)`` that would remove it holds only for Gaussian
    gradients (heavy-tailed per-sample gradients have a larger ``E[1 / s^2]``), so it is not applied.

    No clipping: a negative ``r_j`` is a legitimate estimate for an element whose signal is below the
    noise of its own mean (``m^2 < s^2 / N``). Averages over elements (:func:`gsnr_summary`) are taken
    over the unclipped values, so that their mean stays (nearly) unbiased; clipping at 0 would bring back
    an upward bias of the same order as the one removed.

    Args:
        per_sample: ``{name: Tensor[N, ...]}`` with N >= 2, e.g. from :func:`per_sample_gradients`.
        eps: floor of the variance, so that constant elements give a finite ratio.

    Returns:
        ``{name: Tensor[...]}`` of float64 estimates, shaped like the parameters. Cost: two passes over
        the input.

    >>> gsnr({"w": torch.tensor([[1.0], [3.0]])})["w"]  # m = 2, s^2 = 2: (4 - 1) / 2
    tensor([1.5000], dtype=torch.float64)
    """
    _check(per_sample, "gsnr")
    return gradient_moments(per_sample).gsnr(eps)


def gsnr_raw(per_sample: Mapping[str, Tensor], eps: float = GSNR_EPS) -> dict[str, Tensor]:
    """The uncorrected GSNR ratio ``r_j = m_j^2 / max(v_j, eps)``, ``v_j`` the population (divide by N)
    variance: the formula as written in Liu et al. 2020, kept for comparison with published numbers.

    Biased upwards by about ``1 / N`` (``1 / (N - 3)`` for Gaussian gradients at zero signal); prefer
    :func:`gsnr`. Without the floor the two are related exactly by
    ``raw = N / (N - 1) * (corrected + 1 / N)``.

    Returns:
        ``{name: Tensor[...]}`` of float64 ratios (non-negative). Cost: two passes over the input.

    >>> gsnr_raw({"w": torch.tensor([[1.0], [3.0]])})["w"]  # mean 2, population variance 1
    tensor([4.], dtype=torch.float64)
    """
    _check(per_sample, "gsnr_raw")
    return gradient_moments(per_sample).gsnr_raw(eps)


# --- the gradient noise scale ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseScaleParts:
    """Numerator and denominator of ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

    Attributes:
        trace: estimate of ``tr(Sigma)``, the trace of the per-sample gradient covariance.
        sqnorm: estimate of ``|G|^2``, the squared norm of the true (population) gradient; an unbiased
            estimate can be zero or negative when the mean gradient is below its own noise.
    """

    trace: float
    sqnorm: float

    @property
    def b_simple(self) -> float:
        """``trace / sqnorm``; ``math.inf`` when ``sqnorm <= 0`` (the signal cannot be told from noise)."""
        return self.trace / self.sqnorm if self.sqnorm > 0.0 else math.inf


def noise_scale_parts(small_sqnorm: float, big_sqnorm: float, b_small: float, b_big: float) -> NoiseScaleParts:
    """Unbiased ``tr(Sigma)`` and ``|G|^2`` from two batch sizes (McCandlish et al. 2018, appendix A).

    A mean gradient over B independent samples has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``; two batch sizes
    ``b_small < b_big`` with measured ``|G_small|^2`` and ``|G_big|^2`` give::

        |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

    both unbiased when the two squared norms are. Their ratio is not: McCandlish et al. average each part
    over steps first (:class:`NoiseScaleEMA`). Cost: none.

    >>> p = noise_scale_parts(small_sqnorm=11.0, big_sqnorm=2.0, b_small=1, b_big=10)
    >>> round(p.sqnorm, 12), round(p.trace, 12), round(p.b_simple, 12)
    (1.0, 10.0, 10.0)
    """
    if not (b_small > 0 and b_big > b_small):
        raise ConfigError(f"noise_scale_parts needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    sqnorm = (b_big * big_sqnorm - b_small * small_sqnorm) / (b_big - b_small)
    trace = (small_sqnorm - big_sqnorm) / (1.0 / b_small - 1.0 / b_big)
    return NoiseScaleParts(trace=float(trace), sqnorm=float(sqnorm))


def gradient_noise_parts(per_sample: Mapping[str, Tensor]) -> NoiseScaleParts:
    """``tr(Sigma)`` and ``|G|^2`` from N per-sample gradients (all tensors flattened together).

    :func:`noise_scale_parts` with ``b_small = 1`` (``|G_small|^2`` the mean of ``|g_i|^2``) and
    ``b_big = N`` (``|G_big|^2 = |g_bar|^2``), which is::

        tr(Sigma) ~ S = sum_i |g_i - g_bar|^2 / (N - 1),    |G|^2 ~ |g_bar|^2 - S / N

    Cost: two passes over the input.
    """
    _check(per_sample, "gradient_noise_parts")
    return gradient_moments(per_sample).noise_parts()


def gradient_noise_scale(per_sample: Mapping[str, Tensor], bias_corrected: bool = True) -> float:
    """Simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018) of one batch.

    Uses :func:`gradient_noise_parts`; with ``bias_corrected=False`` the denominator is the plain
    ``|g_bar|^2`` (biased upwards by ``tr(Sigma) / N``, so B is biased downwards). A single batch gives a
    noisy ratio; in a training loop average the parts over steps with :class:`NoiseScaleEMA`.

    Returns:
        ``B_simple`` as a float; ``math.inf`` when the corrected ``|G|^2`` is not positive (the mean
        gradient is indistinguishable from noise at this N). Cost: two passes over the input.
    """
    parts = gradient_noise_parts(per_sample)
    if not bias_corrected:
        n = next(iter(per_sample.values())).shape[0]
        parts = NoiseScaleParts(parts.trace, parts.sqnorm + parts.trace / n)
    return parts.b_simple


class NoiseScaleEMA:
    """Running averages of ``tr(Sigma)`` and ``|G|^2`` and their ratio, as McCandlish et al. 2018 use them.

    Each call of :meth:`update` folds one (unbiased) estimate of each part into an exponential moving
    average ``a_k = decay * a_{k-1} + (1 - decay) * x_k``, debiased as in Adam by ``1 - decay^k`` so the
    first estimates are not pulled towards 0; ``B_simple`` is the ratio of the two averages (a ratio of
    averages, not an average of noisy ratios). The state is two floats and a count (:attr:`state`, plain
    Python values, safe to store with a run).

    >>> ema = NoiseScaleEMA(decay=0.5)
    >>> ema.update(NoiseScaleParts(trace=10.0, sqnorm=2.0)).b_simple
    5.0
    >>> ema.update(NoiseScaleParts(trace=10.0, sqnorm=-1.0))  # running |G|^2 is 0: B_simple = inf
    NoiseScaleParts(trace=10.0, sqnorm=0.0)
    """

    def __init__(self, decay: float = 0.9, state: Mapping[str, Any] | None = None) -> None:
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ConfigError(f"NoiseScaleEMA: decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.state: dict[str, Any] = {"trace": 0.0, "sqnorm": 0.0, "count": 0}
        if state:
            self.state.update({"trace": float(state["trace"]), "sqnorm": float(state["sqnorm"]),
                               "count": int(state["count"])})

    def update(self, parts: NoiseScaleParts) -> NoiseScaleParts:
        """Fold in one estimate; returns the debiased averages (their ``b_simple`` is the running B)."""
        if not (math.isfinite(parts.trace) and math.isfinite(parts.sqnorm)):
            raise DataError(f"NoiseScaleEMA: non-finite estimate {parts}")
        d = self.decay
        self.state["trace"] = d * self.state["trace"] + (1.0 - d) * parts.trace
        self.state["sqnorm"] = d * self.state["sqnorm"] + (1.0 - d) * parts.sqnorm
        self.state["count"] += 1
        return self.value()

    def value(self) -> NoiseScaleParts:
        """The debiased running averages (zeros before the first update)."""
        k = self.state["count"]
        if k == 0:
            return NoiseScaleParts(0.0, 0.0)
        c = 1.0 - self.decay**k
        return NoiseScaleParts(self.state["trace"] / c, self.state["sqnorm"] / c)


def microbatch_gsnr(grads_list: Sequence[Mapping[str, Tensor]], eps: float = GSNR_EPS,
                    corrected: bool = True, gaussian: bool = True) -> dict[str, Tensor]:
    """GSNR across micro-batch (or data-parallel rank) gradients: a *different* metric from :func:`gsnr`.

    :func:`gsnr` (``corrected=True``) or :func:`gsnr_raw` over the M micro-batch mean gradients ``G_m``.
    A mean over b independent samples has the per-sample mean and 1/b of the per-sample variance, so
    this estimates b x the per-sample GSNR; store it as ``gsnr_microbatch_*``, never in the same series as
    ``gsnr_*``.

    With few gradients the ratio itself is biased: for Gaussian gradients ``E[1 / s^2]`` is
    ``(M - 1) / (M - 3)`` times ``1 / sigma^2`` (3 times at M = 4). Unlike single-sample gradients, a
    micro-batch mean is close to Gaussian (a mean of b samples), so with ``gaussian=True`` (and
    ``corrected``) the estimate is multiplied by ``(M - 3) / (M - 1)``, which removes that bias for
    Gaussian gradients; it needs M >= 4 (and M >= 6 for the estimate to have a finite variance).

    Raises:
        DataError: fewer than 2 gradients, fewer than 4 with the Gaussian correction, or parameter names
            that differ between micro-batches.

    Returns:
        ``{name: Tensor[...]}`` of float64 estimates. Cost: one stack and two passes.

    >>> micro = [{"w": torch.tensor([x])} for x in (1.0, 2.0, 3.0, 6.0)]  # m = 3, s^2 = 14/3
    >>> round(float(microbatch_gsnr(micro)["w"][0]), 6)  # (9 - 14/12) / (14/3) x (4 - 3) / (4 - 1)
    0.559524
    """
    if len(grads_list) < 2:
        raise DataError(f"microbatch_gsnr needs at least 2 micro-batch gradients, got {len(grads_list)}")
    use_factor = corrected and gaussian
    if use_factor and len(grads_list) < 4:
        raise DataError(
            f"microbatch_gsnr's Gaussian correction (M - 3) / (M - 1) needs at least 4 micro-batch gradients, "
            f"got {len(grads_list)}; use more micro-batches or pass gaussian=False"
        )
    names = list(grads_list[0])
    for i, g in enumerate(grads_list):
        if list(g) != names:
            raise DataError(
                f"microbatch_gsnr: micro-batch {i} has parameters {list(g)[:4]}..., expected {names[:4]}..."
            )
    stacked = {k: torch.stack([g[k].detach() for g in grads_list]) for k in names}
    if not corrected:
        return gsnr_raw(stacked, eps=eps)
    return gradient_moments(stacked).microbatch_gsnr(eps, gaussian=use_factor)
