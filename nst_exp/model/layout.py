"""Which memory layout an activation has: on CUDA the encoder runs NHWC, on the CPU NCHW."""

from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor stored NHWC (and not also plain-contiguous, as 1-channel or 1-pixel maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def channels_fastest(x: Tensor) -> bool:
    """Channels vary fastest in memory: NHWC, or a window (slice) of an NHWC tensor, which
    ``is_channels_last`` calls neither layout since it is not contiguous."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) < x.stride(3)
