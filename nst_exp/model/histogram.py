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

from nst_exp.model.quantiles import QuantileMatch

Region = tuple[slice, slice]  # where in a layer's whole map activations lie (as model/tiles.py's)
_EPS = 1e-8
_WHOLE: Region = (slice(None), slice(None))


class HistogramStyleLoss(QuantileMatch):
    """Each channel's sorted values against the style's per-channel quantiles (``target``: (B, C, Q)).

    ``model/losses.py`` builds it like the other style terms (``stats``, ``target_from_stats``,
    ``from_stats``) and imports it; it imports nothing from there.
    """

    tileable = False  # sorting is not a sum over positions
    selects_positions = True  # a mask picks the positions whose distributions are matched

    def __init__(self, target_quantiles: Tensor, normalize: bool = True) -> None:
        super().__init__()
        target = target_quantiles.detach().float()
        self.register_buffer("target", target)  # (B, C, Q), ascending
        scale = 1.0 / (target.pow(2).mean() + _EPS) if normalize else torch.tensor(1.0)  # as losses.relative_scale
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

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
