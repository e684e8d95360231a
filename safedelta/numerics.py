"""Small tensor helpers shared by the kernel, the calibration pass and checkpoint I/O.

Kept apart from :mod:`safedelta.solver` so that reading a checkpoint does not import the kernel.
``torch`` is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch


@contextlib.contextmanager
def fp32_exact(device: "torch.device | str") -> Iterator[None]:
    """TF32 off on CUDA for the duration of the block (flags restored on exit); a no-op
    elsewhere. Hessian accumulation and the solve both run under it (the faithful mode)."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def all_finite(t: "torch.Tensor") -> bool:
    """True when ``t`` holds no NaN/Inf (integer and empty tensors are finite).

    One reduction (``aminmax``: NaN propagates to both ends, an Inf is an end) instead of a
    bool tensor of ``t``'s size: several times faster, and no allocation on an embedding matrix.
    """
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
