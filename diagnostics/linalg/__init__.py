"""Pure linear algebra on a minimal LinearOperator (shape, dtype, device, ``@``).

Every function also takes a dense Tensor. Shapes: ``N`` batch, ``P`` parameters (the operator's dimension),
``K`` vectors; sets of vectors are the columns of a ``[P, K]`` tensor. Results are frozen dataclasses that
carry their quality (residuals, converged flags, standard errors, num_matvecs, seconds, settings).
Randomised estimators draw from private generators seeded by ``seed``; the global RNG is never touched.
"""

from diagnostics.linalg.lanczos import EigenResult, lanczos
from diagnostics.linalg.lanczos_basis import BasisWorkspace
from diagnostics.linalg.lanczos_run import LanczosRun
from diagnostics.linalg.operator import DenseOperator, LinearOperator, ScaledOperator, as_operator
from diagnostics.linalg.power import power_iteration, top_singular_vector
from diagnostics.linalg.rank import (
    AlphaReqFit,
    alpha_req,
    effective_rank,
    nuclear_norm,
    singular_values,
    stable_rank,
)
from diagnostics.linalg.slq import DensityRun, SpectralDensity, spectral_density
from diagnostics.linalg.subspace import principal_angles, subspace_fraction, subspace_overlap
from diagnostics.linalg.trace import TraceEstimate, TraceRun, hutchinson_trace, hutchpp_trace

__all__ = [
    # operators
    "LinearOperator",
    "DenseOperator",
    "ScaledOperator",
    "as_operator",
    # eigenvalues
    "LanczosRun",
    "lanczos",
    "EigenResult",
    "BasisWorkspace",
    # spectral density
    "DensityRun",
    "spectral_density",
    "SpectralDensity",
    # trace
    "hutchinson_trace",
    "hutchpp_trace",
    "TraceEstimate",
    "TraceRun",
    # subspaces
    "principal_angles",
    "subspace_overlap",
    "subspace_fraction",
    # rank and norms
    "effective_rank",
    "stable_rank",
    "singular_values",
    "nuclear_norm",
    "alpha_req",
    "AlphaReqFit",
    "top_singular_vector",
    "power_iteration",
]
