"""A convolution by frozen weights whose autograd node does not keep its input alive.

PyTorch's convolution saves its input for the weight gradient even when the weight needs none.
Here the weights are frozen buffers and only the image's gradient is ever computed, which needs
the weight and the input's shape alone. With reflect padding the saved input is a padded copy of
an activation the ReLU keeps anyway, so dropping it saves a step's memory (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class _Layout:
    """What is kept of the input: enough to allocate a stand-in of the same shape, strides and type."""

    size: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def conv2d_frozen(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int = 0) -> Tensor:
    """``F.conv2d`` for weights that need no gradient, without saving ``x`` for the backward."""
    if (
        weight.requires_grad or (bias is not None and bias.requires_grad) or not x.requires_grad or torch.compiler.is_compiling()
    ):  # compiled graphs choose what to save themselves
        return F.conv2d(x, weight, bias, padding=padding)
    ptr, size = x.data_ptr(), x.shape  # not x itself: the hooks must not keep it alive

    def pack(t: Tensor) -> Tensor | _Layout:
        if t.data_ptr() == ptr and t.shape == size:
            return _Layout(t.shape, t.stride(), t.dtype, t.device)
        return t

    def unpack(saved: Tensor | _Layout) -> Tensor:
        if isinstance(saved, _Layout):  # the input-gradient kernels read only its shape and layout
            return torch.empty_strided(saved.size, saved.stride, dtype=saved.dtype, device=saved.device)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return F.conv2d(x, weight, bias, padding=padding)
