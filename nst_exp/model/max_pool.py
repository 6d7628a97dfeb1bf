"""2x2 max pooling that keeps no indices for its backward.

``F.max_pool2d`` keeps its input and an int64 index per output for the backward. The input is
the ReLU's output, which the ReLU keeps anyway; the indices are new memory: at 8 bytes each
they outweigh an fp32 pooled map twice and a bf16 one four times (what that saves is in
docs/performance.md). Here the backward finds the maxima again from the kept
input: one more pooling pass per pooling layer, the same indices, the same gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_KERNEL = [2, 2]
_NO_PADDING = [0, 0]
_NO_DILATION = [1, 1]


class _MaxPool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        _, indices = F.max_pool2d(x, 2, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, _KERNEL, _KERNEL, _NO_PADDING, _NO_DILATION, False, indices)


def max_pool2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)``; when ``x`` needs a gradient, its backward keeps only ``x``."""
    if not x.requires_grad:
        return F.max_pool2d(x, 2)
    return _MaxPool2.apply(x)
