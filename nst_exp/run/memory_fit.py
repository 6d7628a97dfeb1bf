"""Will L-BFGS's memory fit? Checked before any work, for the final image size.

The pairs L-BFGS stores grow with the image: ``optimizer.history_size`` pairs of two image-sized
fp32 vectors, 24 bytes per pixel per pair (1.2 KB per pixel at the default 50: 36 GB at 30 Mpx).
They fill up over the first ``history_size`` steps, so a history that does not fit runs out of
memory mid-run, long after the start. Tiling (``image.tile``) bounds the activations, not these;
so a run whose pairs alone would take most of the free memory stops at once, naming the largest
history that fits and Adam (no pairs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from nst_exp.config import OptimizerName
from nst_exp.errors import UserError

PAIR_BYTES_PER_PIXEL = 2 * 3 * 4  # one (s, y) pair: two fp32 RGB vectors
OTHER_BYTES_PER_PIXEL = 8 * 3 * 4  # the image, its gradient, L-BFGS's direction and previous gradient, ...
SHARE = 0.8  # of the free memory the pairs and vectors may take; the network and targets need the rest


def available_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Free memory on ``device``: the GPU's free memory (with what torch's caching allocator holds unused,
    e.g. a previous stage's blocks), or the host's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + max(0, cached))
    if device.type != "cpu":
        return None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_history_fits(cfg: DictConfig, pixels: int, device: torch.device, available: int | None = None) -> None:
    """A one-line error, with the largest ``optimizer.history_size`` that fits, when L-BFGS's pairs for an
    image of ``pixels`` would not fit in ``available`` bytes (default: what ``device`` has free now)."""
    if cfg.optimizer.name != OptimizerName.lbfgs:
        return
    free = available_bytes(device) if available is None else available
    if free is None:
        return
    budget = SHARE * free
    history = int(cfg.optimizer.history_size)
    need = pixels * (PAIR_BYTES_PER_PIXEL * history + OTHER_BYTES_PER_PIXEL)
    if need <= budget:
        return
    fits = int((budget / pixels - OTHER_BYTES_PER_PIXEL) // PAIR_BYTES_PER_PIXEL)
    fix = f"optimizer.history_size={fits} (or less), or optimizer=adam" if fits >= 3 else "optimizer=adam, or a smaller image.size"
    raise UserError(
        f"optimizer.history_size={history}: L-BFGS's pairs need {need / 2**30:.1f} GiB for a {pixels / 1e6:.1f} Mpx image "
        f"({PAIR_BYTES_PER_PIXEL} bytes per pixel per pair), and {free / 2**30:.1f} GiB is free on {device.type}; fix: {fix}"
    )
