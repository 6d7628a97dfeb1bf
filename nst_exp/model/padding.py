"""Reflect padding by one pixel that keeps the memory format and dtype, and keeps nothing for its backward.

``F.pad(x, (1, 1, 1, 1), mode="reflect")`` falls short three ways here:
- on CUDA it returns an NCHW tensor even for NHWC input, so with channels-last weights cuDNN
  copied every padded activation back to NHWC, and the backward every gradient (a large share
  of a step's GPU time: docs/performance.md);
- it keeps its input for the backward: new memory where that input is a pooling output;
- CPU autocast runs it in fp32, so each bf16 activation was upcast, kept, and cast back.
This version writes the padded tensor in the input's layout and dtype, and its backward needs
only the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nst_exp.model.layout import is_channels_last


def _format_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


class _ReflectPad1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        y = torch.empty((b, c, h + 2, w + 2), dtype=x.dtype, device=x.device, memory_format=_format_of(x))
        y[:, :, 1:-1, 1:-1] = x
        y[:, :, 0, 1:-1] = x[:, :, 1]
        y[:, :, -1, 1:-1] = x[:, :, -2]
        y[:, :, :, 0] = y[:, :, :, 2]
        y[:, :, :, -1] = y[:, :, :, -3]
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> Tensor:  # type: ignore[override]
        # The adjoint of the forward: border gradients flow to the rows/columns they copied.
        g = torch.empty_like(gy[:, :, 1:-1, 1:-1], memory_format=_format_of(gy))
        g.copy_(gy[:, :, 1:-1, 1:-1])
        g[:, :, :, 1] += gy[:, :, 1:-1, 0]
        g[:, :, :, -2] += gy[:, :, 1:-1, -1]
        top = gy[:, :, 0, 1:-1].clone()
        top[:, :, 1] += gy[:, :, 0, 0]
        top[:, :, -2] += gy[:, :, 0, -1]
        bottom = gy[:, :, -1, 1:-1].clone()
        bottom[:, :, 1] += gy[:, :, -1, 0]
        bottom[:, :, -2] += gy[:, :, -1, -1]
        g[:, :, 1] += top
        g[:, :, -2] += bottom
        return g


def reflect_pad1(x: Tensor) -> Tensor:
    """``F.pad(x, (1, 1, 1, 1), mode="reflect")`` in ``x``'s memory format (needs H, W >= 2)."""
    return _ReflectPad1.apply(x)
