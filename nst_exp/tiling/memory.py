"""Free memory, and what the image and the optimiser's state take: the one byte formula that both the
tile plan's budget and the L-BFGS history check use.

The pairs L-BFGS stores grow with the image: ``optimizer.history_size`` pairs of two image-sized
fp32 vectors (``PAIR_BYTES_PER_PIXEL`` per pixel per pair). They fill up over the first
``history_size`` steps, so a history that does not fit runs out of memory mid-run, long after the
start. Tiling bounds the activations, not these; so a run whose pairs alone would take most of the
free memory stops at once (``check_history_fits``), naming the largest history that fits and Adam.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def state_bytes(pairs: int, pixels: int) -> int:
    """What the image, its gradient and the optimiser's state take for an image of ``pixels`` with
    ``pairs`` L-BFGS pairs stored (0 for Adam): everything but the activations."""
    return pixels * (PAIR_BYTES_PER_PIXEL * pairs + OTHER_BYTES_PER_PIXEL)


def check_history_fits(history_size: int | None, pixels: int, device: torch.device, available: int | None = None) -> None:
    """A one-line error, with the largest ``optimizer.history_size`` that fits, when L-BFGS's
    ``history_size`` pairs (None: not L-BFGS, nothing to check) for an image of ``pixels`` would not
    fit in ``available`` bytes (default: what ``device`` has free now)."""
    if history_size is None:
        return
    free = available_bytes(device) if available is None else available
    if free is None:
        return
    budget = SHARE * free
    need = state_bytes(history_size, pixels)
    if need <= budget:
        return
    largest = int((budget / pixels - OTHER_BYTES_PER_PIXEL) // PAIR_BYTES_PER_PIXEL)
    fix = f"optimizer.history_size={largest} (or less), or optimizer=adam" if largest >= 3 else "optimizer=adam, or a smaller image.size"
    raise UserError(
        f"optimizer.history_size={history_size}: L-BFGS's pairs need {need / 2**30:.1f} GiB for a {pixels / 1e6:.1f} Mpx image "
        f"({PAIR_BYTES_PER_PIXEL} bytes per pixel per pair), and {free / 2**30:.1f} GiB is free on {device.type}; fix: {fix}"
    )
