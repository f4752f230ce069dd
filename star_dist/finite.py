"""NaN/Inf checks that never allocate a mask the size of the tensor.

`torch.isfinite(t).all()` builds temporaries as large as `t` (an absolute value and two
boolean masks: about two more float32 copies at the peak of a STAR merge). A sum is finite
only if every term is, so one reduction decides the happy path; the exact chunked check
runs only when the sum is not finite (a NaN, an Inf, or a sum that overflowed).
"""

from __future__ import annotations

import torch


def finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN or Inf: one sum, then `all_finite` only if it is not finite.

    Args:
        tensor: any floating tensor, on any device.
    Returns:
        True when every entry is finite (an empty tensor is).
    """
    if tensor.numel() == 0:
        return True
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or all_finite(tensor)


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """The exact check, `chunk` entries at a time, so its masks stay small.

    Args:
        tensor: any floating tensor.
        chunk: entries checked per step.
    Returns:
        True when every entry is finite.
    """
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))
