"""A frozen 3x3 convolution and its ReLU in one oneDNN call on the CPU (a post-op), with its own backward.

On the CPU a convolution followed by ``relu_`` writes its output, then reads and writes it again
for the ReLU: a pass over every activation that oneDNN can do in the convolution's own store
(``mkldnn._convolution_pointwise`` with the ``relu`` post-op, the kernel inductor fuses to for
inference). It is used only where ``conv2d`` itself would run oneDNN (``_select_conv_backend``),
so the result is the same bits as ``relu(conv2d(x))`` in fp32 and bf16 (the ReLU is exact).
The backward needs only the output, which the next layer and the losses keep anyway
(``ReLU``'s own backward keeps it too), and the input's shape: the input is not saved, as in
``frozen_conv.py``. Under CPU autocast the input and weights are cast per call, as autocast casts
them for ``conv2d`` (no cached copy: it would add a fixed amount of memory to every run).
"""

from __future__ import annotations

import torch
from torch import Tensor


_ONEDNN = torch.backends.mkldnn.is_available()
_MKLDNN = torch._C._ConvBackend.Mkldnn
_STRIDE = [1, 1]
_DILATION = [1, 1]


def fused_applies(x: Tensor) -> bool:
    """Whether to try this path at all: a CPU tensor, a torch with oneDNN, not while tracing for ``torch.compile``."""
    return not torch.compiler.is_compiling() and x.device.type == "cpu" and _ONEDNN


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``conv2d`` runs in for ``x`` here: CPU autocast's lower dtype when it is on, else ``x``'s."""
    if x.is_floating_point() and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


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
    """``relu(conv2d(x, weight, bias, padding))`` for frozen weights on the CPU; None where ``conv2d``
    would not run oneDNN for these shapes (small maps go to other kernels, whose sums round differently:
    the caller then runs ``conv2d`` and the ReLU, and the bits stay those of the plain path)."""
    if not fused_applies(x):
        return None
    dtype = autocast_dtype(x)
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    pad = [padding, padding]
    if torch._C._select_conv_backend(x, weight, bias, _STRIDE, pad, _DILATION, False, [0, 0], 1) != _MKLDNN:
        return None
    return _ConvReLU.apply(x, weight, bias, padding)
