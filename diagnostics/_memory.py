"""Whether a tensor's memory is used by anything else: the test for handing a kept buffer out again."""

from __future__ import annotations

import torch

__all__ = ["sole_holder"]


def sole_holder(t: torch.Tensor) -> bool:
    """Whether nothing but ``t`` itself uses its memory (no view of it is alive anywhere). False when this
    torch cannot tell, so that what cannot be checked is never reused. Cost: O(1)."""
    try:
        # The storage object made here holds one reference of its own.
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2
    except (AttributeError, RuntimeError):
        return False
