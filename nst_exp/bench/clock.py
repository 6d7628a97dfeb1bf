"""Timing windows over optimiser steps, and the memory figures read at their ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(key: str) -> float:
    """A ``VmHWM``/``VmRSS`` line of /proc/self/status in MiB (NaN where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory_now(device: torch.device) -> float:
    """Memory in use now (MiB): CUDA allocated bytes, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mib("VmRSS")


def memory_peak(device: torch.device) -> float:
    """CUDA: the larger of max_memory_allocated and max_memory_reserved; CPU: peak resident set (VmHWM), MiB.

    A replayed CUDA graph allocates nothing: its activations live in the graph's private pool,
    which counts as reserved, not allocated. ``reset_memory_peak`` empties the allocator's cache
    first, so reserved is then the live tensors plus that pool.
    """
    if device.type == "cuda":
        return max(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)) / 2**20
    return _proc_status_mib("VmHWM")


def reset_memory_peak(device: torch.device) -> bool:
    """Restart the peak counter from the memory in use now; False where the CPU's cannot be reset."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # cuDNN's autotuning leaves tens of GB cached; a run does not need them
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


class StepClock:
    """Timestamps at the start of optimiser steps; CUDA is synchronised only at the window's two ends.

    The window opens at the first tick at or after step ``warmup`` and closes at the first tick
    ``steps`` or more steps later (a loop that runs several iterations per tick, as the tool's
    ``trainer.iters_per_step`` does, ticks every few steps). The memory peak is read at both
    ends and restarted at the first, so the window's steady-state peak is kept apart from
    warm-up transients such as cuDNN's autotuning workspaces.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.stamps: list[tuple[int, float]] = []  # (step, time) inside the window
        self.closed = False
        self.peak_warmup_mib = float("nan")  # the peak up to the window (setup and warm-up)
        self.peak_window_mib = float("nan")  # the peak inside the window (the whole run's where it cannot be reset)
        self.peak_was_reset = False

    def tick(self, step: int, device: torch.device) -> None:
        if self.closed or step < self.warmup:
            return
        opening = not self.stamps
        closing = not opening and step >= self.stamps[0][0] + self.steps
        if opening or closing:
            sync(device)
        if opening:
            self.peak_warmup_mib = memory_peak(device)
            self.peak_was_reset = reset_memory_peak(device)
        self.stamps.append((step, time.perf_counter()))
        if closing:
            self.closed = True
            self.peak_window_mib = memory_peak(device)

    def durations(self) -> list[float]:
        """Seconds per optimiser step inside the window (a tick covering n steps gives n equal entries)."""
        if not self.closed:
            raise RuntimeError(f"the run stopped before {self.steps} steps after {self.warmup} warm-up steps were timed")
        out: list[float] = []
        for (s0, t0), (s1, t1) in zip(self.stamps, self.stamps[1:]):
            out += [(t1 - t0) / (s1 - s0)] * (s1 - s0)
        return out


def window_end(warmup: int, steps: int, stride: int) -> int:
    """The step at which a StepClock closes when it ticks every ``stride`` steps from step 0."""
    opens = -(-warmup // stride) * stride
    return opens + -(-steps // stride) * stride


class StepTimer(pl.Callback):
    """Feeds a StepClock from Lightning's batch starts (``global_step`` counts optimiser steps)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.shape: tuple[int, int] = (0, 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.clock.tick(trainer.global_step, pl_module.device)
        self.shape = tuple(pl_module.image.shape[-2:])


def timed_loop(step: Callable[[], None], clock: StepClock, device: torch.device) -> None:
    """Run ``warmup + steps`` steps of a plain loop, stamping the clock before each and after the last."""
    end = clock.warmup + clock.steps
    for i in range(end):
        clock.tick(i, device)
        step()
    clock.tick(end, device)
