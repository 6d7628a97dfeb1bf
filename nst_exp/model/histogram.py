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
from torch import Tensor

from nst_exp.model.losses import _WHOLE, SlicedWassersteinStyleLoss, positions_by_channels
from nst_exp.model.tiles import Region


class HistogramStyleLoss(SlicedWassersteinStyleLoss):
    """Each channel's sorted values against the style's per-channel quantiles (``target``: (B, C, Q))."""

    def __init__(self, target_quantiles: Tensor, normalize: bool = True) -> None:
        channels = target_quantiles.shape[1]
        super().__init__(target_quantiles, torch.empty(channels, 0), normalize)  # no projections: the axes

    @staticmethod
    def sorted_channels(features: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, N): each channel's values at the (kept) positions, ascending."""
        flat = positions_by_channels(features).float()  # (B, HW, C)
        if keep is not None:
            flat = flat.index_select(1, keep)
        return torch.sort(flat.transpose(1, 2), dim=-1).values

    @staticmethod
    def stats(features: Tensor, region: Region = _WHOLE, keep: Tensor | None = None) -> tuple[Tensor, ...]:  # type: ignore[override]
        """The sorted channels (B, C, N) (not a sum: see ``tileable``)."""
        return (HistogramStyleLoss.sorted_channels(features, keep),)
