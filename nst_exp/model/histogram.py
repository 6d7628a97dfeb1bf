"""The histogram style loss (Risser et al. 2017, *Stable and controllable neural texture synthesis and
style transfer using histogram losses*): every channel's whole distribution of values over the positions.

A Gram matrix matches second moments only, so a Gram run can reach the style's Gram with the wrong
means and spreads per channel (Risser's washed-out colours and instabilities). This loss matches each
channel's histogram exactly: the positions' values of a channel are sorted and compared with the
style's quantile function at the same levels, the squared 1-D Wasserstein-2 distance per channel
(relative to the target's mean square like every other term). Its gradient is Risser's, the activations
minus their histogram-remapped selves, without binning.

It is the sliced Wasserstein loss (``loss.style_loss=swd``) along the channel axes themselves instead of
random directions: nothing random, so no seed; blended styles average the quantile functions (the 1-D
Wasserstein barycenter); a mask picks the positions matched. Sorting is not a sum over positions, so
tiles are refused in one line, as for swd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Region = tuple[slice, slice]  # where in a layer's whole map activations lie (as model/tiles.py's)
_EPS = 1e-8
_WHOLE: Region = (slice(None), slice(None))


class HistogramStyleLoss(nn.Module):
    """Each channel's sorted values against the style's per-channel quantiles (``target``: (B, C, Q)).

    ``model/losses.py`` builds it like the other style terms (``stats``, ``target_from_stats``,
    ``from_stats``) and imports it; it imports nothing from there.
    """

    tileable = False  # sorting is not a sum over positions
    selects_positions = True  # a mask picks the positions whose distributions are matched
    QUANTILES = 1024  # levels a style's quantile functions are kept at (and blended at)

    def __init__(self, target_quantiles: Tensor, normalize: bool = True) -> None:
        super().__init__()
        target = target_quantiles.detach().float()
        self.register_buffer("target", target)  # (B, C, Q), ascending
        scale = 1.0 / (target.pow(2).mean() + _EPS) if normalize else torch.tensor(1.0)  # as losses.relative_scale
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self._resampled: dict[int, Tensor] = {}

    @staticmethod
    def sorted_channels(features: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, N): each channel's values at the (kept) positions, ascending."""
        flat = features.float().flatten(2)  # (B, C, HW); a copy for channels-last maps, as sorting needs anyway
        if keep is not None:
            flat = flat.index_select(2, keep)
        return torch.sort(flat, dim=-1).values

    @staticmethod
    def stats(features: Tensor, region: Region = _WHOLE, keep: Tensor | None = None) -> tuple[Tensor, ...]:
        """The sorted channels (B, C, N) (not a sum: see ``tileable``)."""
        return (HistogramStyleLoss.sorted_channels(features, keep),)

    @staticmethod
    def quantiles(sorted_values: Tensor, count: int) -> Tensor:
        """Sorted samples (B, C, N) -> the quantile functions at ``count`` levels (i + 1/2) / count."""
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
