"""Per-sample gradients and gradient statistics (GSNR, gradient noise scale); pure tensor-in, tensor-out."""

from diagnostics.gradients.per_sample import DEFAULT_MEMORY_BYTES, per_sample_gradients
from diagnostics.gradients.stats import (
    GSNR_EPS,
    GradientMoments,
    GSNRSummary,
    NoiseScaleEMA,
    NoiseScaleParts,
    gradient_moments,
    gradient_noise_parts,
    gradient_noise_scale,
    gsnr,
    gsnr_raw,
    gsnr_summary,
    microbatch_gsnr,
    noise_scale_parts,
)

__all__ = [
    "per_sample_gradients",
    "gradient_moments",
    "GradientMoments",
    "gsnr",
    "gsnr_raw",
    "gsnr_summary",
    "GSNRSummary",
    "gradient_noise_scale",
    "gradient_noise_parts",
    "noise_scale_parts",
    "NoiseScaleParts",
    "NoiseScaleEMA",
    "microbatch_gsnr",
    "GSNR_EPS",
    "DEFAULT_MEMORY_BYTES",
]
