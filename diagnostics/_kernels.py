"""Kernel choices for work that differentiates twice.

Fused attention kernels (flash and memory-efficient ``F.scaled_dot_product_attention`` on CPU and CUDA) have
a backward pass but no derivative of that backward and no forward-mode rule, so a Hessian-vector product
through them fails. The math backend composes differentiable operations and supports both. Curvature
products and per-sample gradients run inside :func:`twice_differentiable`; the user's own training keeps
its fast kernel, because the selection is scoped to the block and restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["twice_differentiable"]


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run the block with ``F.scaled_dot_product_attention`` restricted to its math backend.

    Values agree with the fused kernels to rounding; memory of attention grows to ``O(T^2)`` per head while
    the block runs. Cost: none beyond the kernel choice.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the selection API has no fused CPU kernel either
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
