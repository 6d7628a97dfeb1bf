"""A run's settings, resolved once: the validated config as asked, and every ``auto`` decided for the device.

``resolve`` is called once per run (``run/runner.py``), after ``config.validate`` and once the device
is known. What it returns is frozen: the requested config read-only (``config.yaml`` records it as the
user asked), the labels the run is named by, and ``Resolved``: precision, channels-last, compile,
CUDA graphs, the L-BFGS implementation, the max-pool implementation, iterations per step, the final
style size and ``image.tile`` parsed. ``Resolved.record`` is the ``resolved`` block of the records
(``provenance.yaml``, ``result.json``, HPARAMS ``resolved.*``), under the config's key names.

The precision rule (``trainer.precision=auto``): bf16 autocast on a CPU whose bf16 convolutions beat
fp32, fp32 everywhere else. A CPU with AMX-BF16 runs a bf16-mixed step much faster than fp32, and an
AMD CPU with AVX512-BF16 faster too, at evaluator distances close to fp32's. An Intel CPU with
AVX512-BF16 but no AMX runs oneDNN's bf16 convolutions at about half its fp32 rate, and a CPU without
either emulates bf16: both get fp32 (docs/performance.md, *Precision auto*; docs/performance-cpu.md).
GPUs keep fp32 (TF32 convolutions): ``32-true`` is also the choice for bit-for-bit reproducible runs.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nst_exp.config import LBFGSImpl, Memory, OptimizerConfig, OptimizerName, style_long_side, tile_setting
from nst_exp.labels import labels_of
from nst_exp.optim.build import OptimizerSpec

AUTO_ITERS_PER_STEP_CUDA = 10


class Precision(str, Enum):
    """The Lightning precision a run uses (``trainer.precision`` with ``auto`` decided; ``32`` is ``32-true``)."""

    fp32 = "32-true"
    bf16_mixed = "bf16-mixed"
    bf16_true = "bf16-true"

    @property
    def bf16(self) -> bool:
        return self is not Precision.fp32


class MaxPool(str, Enum):
    """Which max pooling the network runs (``model.memory``, auto decided per device)."""

    lean = "lean"  # keeps no int64 indices; its backward finds the maxima again
    fast = "fast"  # torch's: 8 bytes per pooled value more, one pass less


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


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``trainer.precision`` for ``device``: ``auto`` decided (see the module docstring), ``32`` as ``32-true``."""
    if precision == "auto":
        return Precision.bf16_mixed if device.type == "cpu" and cpu_has_fast_bf16() else Precision.fp32
    return Precision.fp32 if precision in ("32", "32-true") else Precision(precision)


def resolve_impl(cfg: OptimizerConfig, device: torch.device) -> LBFGSImpl:
    """``optimizer.impl=auto``: compact on CUDA (no host syncs, CUDA graphs); torch on the CPU, where
    compact's three passes over the stored pairs per step cost more than torch's two (figures in
    docs/performance.md), and with a line search (only torch's has one)."""
    if cfg.impl != LBFGSImpl.auto:
        return LBFGSImpl(cfg.impl)
    return LBFGSImpl.compact if device.type == "cuda" and not cfg.line_search else LBFGSImpl.torch


def resolve_max_pool(memory: Memory | str, device: torch.device) -> MaxPool:
    """``model.memory=auto``: lean on CUDA (device memory is the limit there), fast on the CPU (lean costs time)."""
    memory = Memory(memory)
    if memory != Memory.auto:
        return MaxPool(memory.value)
    return MaxPool.lean if device.type == "cuda" else MaxPool.fast


def optimizer_spec(cfg: OptimizerConfig, device: torch.device) -> OptimizerSpec:
    """``optimizer`` as plain typed arguments for ``optim.build``, its implementation resolved for ``device``."""
    lbfgs = cfg.name == OptimizerName.lbfgs
    return OptimizerSpec(
        OptimizerName(cfg.name),
        float(cfg.lr),
        int(cfg.history_size),
        cfg.line_search,
        resolve_impl(cfg, device) if lbfgs else LBFGSImpl.torch,
        tuple(cfg.betas),
    )


def iters_per_step(cfg: Any, device: torch.device) -> int:
    """``trainer.iters_per_step``, or for 0 (auto): 10 on CUDA, where a replayed step is short
    beside Lightning's fixed cost per batch; 1 on the CPU, where a step is long beside it."""
    if cfg.trainer.iters_per_step:
        return int(cfg.trainer.iters_per_step)
    return AUTO_ITERS_PER_STEP_CUDA if device.type == "cuda" else 1


@dataclass(frozen=True)
class Resolved:
    """Every ``auto`` (and every setting that only applies on some devices) as this run uses it."""

    device: torch.device
    precision: Precision
    optimizer: OptimizerSpec  # the optimiser to build, its L-BFGS implementation decided
    max_pool: MaxPool
    iters_per_step: int
    channels_last: bool
    compile: bool
    cuda_graph: bool
    keep_freed_memory: bool  # trainer.keep_freed_memory where it applies: the CPU, with glibc (run/heap.py)
    style_size: int  # the style image's long side at the final size
    tile: int | str | None  # image.tile parsed: a tile in px, "auto" (decided per stage by the plan), None (whole)

    def record(self, final_tile: int | None | str = "auto") -> dict[str, Any]:
        """The records' ``resolved`` block, under the config's key names. ``image.tile`` is decided per
        stage: "auto" until the final stage's plan is known, then its tile in px as a string ("none": whole)."""
        return {
            "trainer.accelerator": self.device.type,
            "trainer.precision": self.precision.value,
            "optimizer.impl": self.optimizer.impl.value if self.optimizer.name == OptimizerName.lbfgs else None,
            "model.memory": self.max_pool.value,
            "trainer.iters_per_step": self.iters_per_step,
            "trainer.channels_last": self.channels_last,
            "trainer.compile": self.compile,
            "trainer.cuda_graph": self.cuda_graph,
            "image.style_size": self.style_size,
            "image.tile": "none" if final_tile is None else str(final_tile),
            "trainer.keep_freed_memory": self.keep_freed_memory,
        }


@dataclass(frozen=True)
class Labels:
    """What a run is called (``nst_exp.labels``): its images' labels and its experiment."""

    content: str | None
    style: str | None
    experiment: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"content": self.content, "style": self.style, "experiment": self.experiment}


@dataclass(frozen=True)
class Settings:
    """A run's settings: ``cfg`` as the user asked (validated, read-only), ``labels``, and ``resolved``."""

    cfg: DictConfig
    labels: Labels
    resolved: Resolved

    @property
    def device(self) -> torch.device:
        return self.resolved.device


def resolve(cfg: DictConfig, device: torch.device, experiment: str | None = None) -> Settings:
    """The run's settings, once (``cfg`` has passed ``config.validate``; ``device`` is the run's)."""
    requested = cfg.copy()
    OmegaConf.set_readonly(requested, True)
    optimizer = optimizer_spec(cfg.optimizer, device)  # its L-BFGS implementation decided once
    compact = optimizer.name == OptimizerName.lbfgs and optimizer.impl == LBFGSImpl.compact
    resolved = Resolved(
        device=device,
        precision=resolve_precision(str(cfg.trainer.precision), device),
        optimizer=optimizer,
        max_pool=resolve_max_pool(cfg.model.memory, device),
        iters_per_step=iters_per_step(cfg, device),
        channels_last=bool(cfg.trainer.channels_last and device.type in ("cuda", "cpu")),
        compile=bool(cfg.trainer.compile and device.type == "cuda"),
        cuda_graph=bool(cfg.trainer.cuda_graph and device.type == "cuda" and compact),
        keep_freed_memory=bool(cfg.trainer.keep_freed_memory and device.type == "cpu" and platform.libc_ver()[0] == "glibc"),
        style_size=style_long_side(cfg, cfg.image.size),
        tile=tile_setting(cfg),
    )
    return Settings(requested, Labels(**labels_of(cfg, experiment)), resolved)
