"""What the distribution-matching style losses share: sorted samples against a style's quantile functions.

``swd`` (``model/losses.py``, sorted projections) and ``histogram`` (``model/histogram.py``, sorted
channels) both compare, row by row, an image's sorted values with the style's quantile function at
the same levels; only what they sort differs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class QuantileMatch(nn.Module):
    """A style term whose ``stats`` are sorted rows (B, R, N) and whose ``target`` is the style's quantile
    functions (B, R, Q); subclasses say what the rows are (``stats``) and register ``target`` and ``scale``."""

    QUANTILES = 1024  # levels a style's quantile functions are kept at (and blended at)

    def __init__(self) -> None:
        super().__init__()
        self._resampled: dict[int, Tensor] = {}

    @staticmethod
    def quantiles(sorted_values: Tensor, count: int) -> Tensor:
        """Sorted samples (B, R, N) -> the quantile functions at ``count`` levels (i + 1/2) / count."""
        if sorted_values.shape[-1] == count:
            return sorted_values
        return F.interpolate(sorted_values, size=count, mode="linear", align_corners=False)

    @classmethod
    def target_from_stats(cls, stats: tuple[Tensor, ...], positions: int) -> Tensor:
        return cls.quantiles(stats[0], cls.QUANTILES)

    def target_at(self, count: int) -> Tensor:
        """The target quantiles at ``count`` levels (one interpolation per stage, then cached)."""
        if count not in self._resampled:
            self._resampled[count] = self.quantiles(self.target, count).detach()
        return self._resampled[count]

    def from_stats(self, stats: tuple[Tensor, ...], positions: int) -> Tensor:
        values = stats[0]
        return F.mse_loss(values, self.target_at(values.shape[-1]).expand_as(values)) * self.scale

    def forward(self, features: Tensor) -> Tensor:
        return self.from_stats(self.stats(features), features.shape[-2] * features.shape[-1])
