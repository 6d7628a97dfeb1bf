"""The sizes a run works at: its stages (coarse multiscale sizes first, then image.size) and the style
image's long side at each. Plain config arithmetic, shared by the runner and the input checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Stage:
    size: int  # long side of the generated image, px
    steps: int  # optimiser steps at this size (the final stage's is trainer.max_steps, a total)


def stages_of(cfg: Any) -> list[Stage]:
    coarse = [Stage(s, n) for s, n in zip(cfg.image.multiscale_sizes, cfg.image.multiscale_steps)]
    return coarse + [Stage(cfg.image.size, cfg.trainer.max_steps)]


def style_long_side(cfg: Any, size: int) -> int:
    """Long side of the style image(s) when the generated image's long side is ``size``:
    image.style_size (scaled with the stage) or style_scale * size."""
    if cfg.image.style_size:
        return max(16, round(cfg.image.style_size * size / cfg.image.size))
    return max(16, round(cfg.image.style_scale * size))
