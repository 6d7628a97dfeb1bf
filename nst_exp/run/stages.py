"""The sizes a run works at: its stages (coarse multiscale sizes first, then image.size) and the style
image's long side at each. Plain config arithmetic, shared by the runner and the input checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nst_exp.config import style_long_side

__all__ = ["Stage", "scale_sizes", "stages_of", "style_long_side"]


@dataclass
class Stage:
    size: int  # long side of the generated image, px
    steps: int  # optimiser steps at this size (the final stage's is trainer.max_steps, a total)


def stages_of(cfg: Any) -> list[Stage]:
    """The coarse stages (image.multiscale_sizes, or image.scale_from's schedule), then image.size."""
    if cfg.image.get("scale_from"):
        coarse = [Stage(s, int(cfg.image.scale_steps)) for s in scale_sizes(cfg.image.scale_from, cfg.image.scale_ratio, cfg.image.size)]
    else:
        coarse = [Stage(s, n) for s, n in zip(cfg.image.multiscale_sizes, cfg.image.multiscale_steps)]
    return coarse + [Stage(cfg.image.size, cfg.trainer.max_steps)]


def scale_sizes(smallest: int, ratio: float, size: int) -> list[int]:
    """The coarse long sides before ``size``: size / ratio^k for k = 1, 2, ... while at least ``smallest``
    (rounded to 1e-6 first, so 256 / sqrt(2)^2 is 128), ascending; crowsonkb's schedule from its end."""
    sizes: list[int] = []
    k = 1
    while (s := round(round(size / ratio**k, 6))) >= smallest and s < size:
        if not sizes or s < sizes[-1]:
            sizes.append(s)
        k += 1
    return sizes[::-1]
