"""A frozen 3x3 convolution and its ReLU in one oneDNN call on the CPU (a post-op), with its own backward.

On the CPU a convolution followed by ``relu_`` writes its output, then reads and writes it again
for the ReLU: a pass over every activation that oneDNN can do in the convolution's own store
(``mkldnn._convolution_pointwise`` with the ``relu`` post-op, the kernel inductor fuses to for
inference). It is used only where ``conv2d`` itself would run oneDNN (``_select_conv_backend``;
small fp32 maps go to another kernel whose sums round differently), so the result is the same
bits as ``relu(conv2d(x))``. The backward needs only the output, which the next layer and the
losses keep anyway (``ReLU``'s own backward keeps it too), the weight buffer, and the input's
shape: the input is not saved, as in ``frozen_conv.py``.

fp32 only: under bf16 autocast the weights would need a bf16 copy per call, and measured side by
side that path was no faster than autocast's ``conv2d`` + ``relu_`` (docs/performance-cpu.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

_ONEDNN = torch.backends.mkldnn.is_available()
_MKLDNN = torch._C._ConvBackend.Mkldnn
_STRIDE = [1, 1]
_DILATION = [1, 1]


def _runs_fp32(x: Tensor) -> bool:
    """``conv2d`` would run in fp32 here: fp32 input and no CPU autocast to a lower precision."""
    return x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


class _ConvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:  # type: ignore[override]
        pad = [padding, padding]
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pad, _STRIDE, _DILATION, 1, "relu", [], "")
        ctx.save_for_backward(y, weight)
        ctx.x_layout = (x.shape, x.stride(), x.dtype)
        ctx.padding = pad
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        y, weight = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(gy, y, 0)
        size, stride, dtype = ctx.x_layout
        # The input-gradient kernel reads only the input's shape and layout, never its values.
        stand_in = torch.empty_strided(size, stride, dtype=dtype, device=gy.device)
        gx = torch.ops.aten.convolution_backward(
            g, stand_in, weight, None, _STRIDE, ctx.padding, _DILATION, False, [0, 0], 1, [True, False, False]
        )[0]
        return gx, None, None, None


def conv_relu_frozen(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int = 0) -> Tensor | None:
    """``relu(conv2d(x, weight, bias, padding))`` for frozen fp32 weights on the CPU; None where this path
    does not apply (the caller then runs ``conv2d`` and the ReLU)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or not _ONEDNN or not _runs_fp32(x):
        return None
    if weight.dtype != torch.float32 or weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    pad = [padding, padding]
    if torch._C._select_conv_backend(x, weight, bias, _STRIDE, pad, _DILATION, False, [0, 0], 1) != _MKLDNN:
        return None
    return _ConvReLU.apply(x, weight, bias, padding)
