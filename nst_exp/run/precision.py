"""``trainer.precision=auto``: bf16 autocast on a CPU whose bf16 convolutions beat fp32, fp32 everywhere else.

A CPU with AMX-BF16 runs a bf16-mixed step much faster than fp32, and an AMD CPU with AVX512-BF16
faster too, at evaluator distances close to fp32's. An Intel CPU with AVX512-BF16 but no AMX runs
oneDNN's bf16 convolutions at about half its fp32 rate, and a CPU without either emulates bf16: both
get fp32 (docs/performance.md, *Precision auto*; docs/performance-cpu.md). GPUs keep fp32 (TF32
convolutions): ``32-true`` is also the choice for bit-for-bit reproducible runs on any machine.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _cpuinfo_field(text: str, name: str) -> list[str]:
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.split(":", 1)[0].strip() == name), [])


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Are this CPU's bf16 convolutions faster than its fp32 ones: AMX-BF16, or AVX512-BF16 on AMD (Linux; False where unknown)?"""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = _cpuinfo_field(text, "flags")
    if "amx_bf16" in flags:
        return True
    return "avx512_bf16" in flags and _cpuinfo_field(text, "vendor_id") == ["AuthenticAMD"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The Lightning precision a run uses: ``auto`` resolved for ``device``, anything else as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if device.type == "cpu" and cpu_has_fast_bf16() else "32-true"
