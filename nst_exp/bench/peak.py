"""The machine's measured peak: a short microbench of VGG19's 3x3 convolutions, in the tool's layout.

A CPU has no datasheet figure this bench can trust (cores, clocks, AVX-512 or AMX, a VM hiding
some of them), so the ``of peak`` column on the CPU divides by what ``torch`` itself reaches on
the convolutions a step runs: each VGG19 block's ``C -> C`` 3x3 convolution (64, 128, 256, 512
channels) at the map size that block sees for a ``base`` image, NHWC (channels-last) as the
encoder runs them, in the precision asked for, forward under ``no_grad``. Each shape is timed
``repeats`` times after one warm-up call and keeps its fastest call; the peak is the fastest
shape. A square matmul is timed the same way, as a reference printed beside it. With
``--repeats`` the bench measures again after each round and keeps each kernel's fastest call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nst_exp.bench.clock import sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (channels, downsampling): each VGG19 block's C -> C convolution and the pooling before it.
_VGG_BLOCKS = ((64, 1), (128, 2), (256, 4), (512, 8))


@dataclass(frozen=True)
class Timed:
    """One timed kernel: what it is, its FLOPs, and its fastest call."""

    what: str
    flops: int
    seconds: float

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12


@dataclass
class Peak:
    """A measured peak in one basis (fp32 | bf16): the fastest VGG-shaped conv, every shape, and the matmul."""

    basis: str
    device: str
    convs: list[Timed] = field(default_factory=list)
    matmul: Timed | None = None

    @property
    def tflops(self) -> float:
        return max(t.tflops for t in self.convs)

    def merge(self, other: Peak) -> Peak:
        """Each kernel's fastest call of two measurements: on a shared machine noise only adds time."""
        convs = [min(a, b, key=lambda t: t.seconds) for a, b in zip(self.convs, other.convs, strict=True)]
        mm = min((t for t in (self.matmul, other.matmul) if t), key=lambda t: t.seconds, default=None)
        return Peak(self.basis, self.device, convs, mm)

    def summary(self) -> str:
        best = max(self.convs, key=lambda t: t.tflops)
        mm = f"; {self.matmul.what} {self.matmul.tflops:.3f}" if self.matmul else ""
        return f"{self.basis} {self.tflops:.3f} TFLOP/s ({best.what}{mm})"


def vgg_conv_shapes(base: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each block's C -> C convolution for a ``base`` (H, W) input."""
    h, w = base
    return [(c, max(1, h // d), max(1, w // d)) for c, d in _VGG_BLOCKS]


def _fastest(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds and caches its primitive for the shape on the first call
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def time_conv(channels: int, height: int, width: int, dtype: torch.dtype, device: torch.device, repeats: int) -> Timed:
    """A ``channels -> channels`` 3x3 convolution on a ``height x width`` map (padded by 1), NHWC."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, height + 2, width + 2, generator=gen).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(channels, channels, 3, 3, generator=gen) * 0.05).to(device, dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.zeros(channels, dtype=dtype, device=device)
    with torch.no_grad():
        seconds = _fastest(lambda: F.conv2d(x, weight, bias), device, repeats)
    return Timed(f"conv {channels}->{channels} at {height}x{width}", 2 * channels * channels * 9 * height * width, seconds)


def time_matmul(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> Timed:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    with torch.no_grad():
        seconds = _fastest(lambda: a @ b, device, repeats)
    return Timed(f"matmul {n}^2", 2 * n**3, seconds)


def measure_peak(basis: str, device: str = "cpu", base: tuple[int, int] = (128, 192), repeats: int = 3, matmul: int | None = 1024) -> Peak:
    """Time the VGG-shaped convolutions (and a ``matmul``-sized square matmul) in ``basis``.

    The default ``base`` gives each shape about 1.8 GFLOP: tens of milliseconds a call on a
    two-core CPU, about a second for the whole microbench.
    """
    dtype, dev = DTYPES[basis], torch.device(device)
    peak = Peak(basis, device)
    peak.convs = [time_conv(c, h, w, dtype, dev, repeats) for c, h, w in vgg_conv_shapes(base)]
    if matmul:
        peak.matmul = time_matmul(matmul, dtype, dev, repeats)
    return peak


def measure_peaks(bases: Sequence[str], device: str = "cpu", **kwargs) -> dict[str, Peak]:
    """One ``Peak`` per basis (the bench's precision, and fp32 for pastiche's rows)."""
    return {basis: measure_peak(basis, device, **kwargs) for basis in dict.fromkeys(bases)}
