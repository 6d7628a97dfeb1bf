"""``trainer.precision=auto``: bf16 autocast on a CPU that computes bf16 natively, fp32 everywhere else.

On a CPU with AMX-BF16 or AVX512-BF16 a bf16-mixed step is much faster than fp32 at evaluator
distances close to fp32's (docs/performance.md, *Precision auto*); a CPU without them emulates bf16,
so it gets fp32. GPUs keep fp32 (TF32 convolutions): ``32-true`` is also the choice for bit-for-bit
reproducible runs on any machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Does the CPU list AMX-BF16 or AVX512-BF16 among its flags (Linux; False where unknown)?"""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The Lightning precision a run uses: ``auto`` resolved for ``device``, anything else as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if device.type == "cpu" and cpu_has_native_bf16() else "32-true"
