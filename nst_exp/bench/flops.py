"""Analytic convolution FLOPs of a step and the datasheet peaks they are compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nst_exp.model.layers import LAYER_NAMES, deepest_layer

# Output channels of each VGG19 block's convolutions.
_BLOCK_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, SXM parts.
_HOPPER_SXM_PEAK = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}


def conv_flops(layers: Sequence[str], height: int, width: int) -> int:
    """Convolution FLOPs of one step: forward plus input-gradient backward of the truncated VGG19.

    The network is cut at the deepest of ``layers``; each 3x3 conv costs ``2*Cin*Cout*9*H*W``
    forward and the same again for the gradient w.r.t. its input (no weight gradients: the
    weights are frozen). Pooling halves H and W (floor), as ``max_pool2d(x, 2)`` does.
    """
    last = LAYER_NAMES.index(deepest_layer(layers))
    h, w, c_in, forward = height, width, 3, 0
    for name in LAYER_NAMES[: last + 1]:
        if name.startswith("conv"):
            c_out = _BLOCK_CHANNELS[int(name[4])]
            forward += 2 * c_in * c_out * 9 * h * w
            c_in = c_out
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
    return 2 * forward


def peak_tflops(device_name: str | None, basis: str) -> float | None:
    """Dense peak of a known GPU for ``basis`` (fp32, tf32 or bf16); None when unknown."""
    name = device_name or ""
    if "H200" in name or ("H100" in name and "PCIe" not in name and "NVL" not in name):
        return _HOPPER_SXM_PEAK.get(basis)
    return None


def peak_basis(device: str, precision: str) -> str:
    """Which peak a run is compared with: bf16, or tf32 when cuDNN runs fp32 convs as TF32 (its default)."""
    if precision == "bf16":
        return "bf16"
    if device == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"
