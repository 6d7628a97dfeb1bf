"""Which memory layout an activation has: on CUDA the encoder runs NHWC, on the CPU NCHW."""

from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor stored NHWC (and not also plain-contiguous, as 1-channel or 1-pixel maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
