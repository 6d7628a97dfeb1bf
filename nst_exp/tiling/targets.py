"""Target features of an image of any size, tile by tile (no autograd): the content maps assembled
from the tiles' owned windows, the style statistics (sums over positions) added up over the tiles.
``model/losses.build_style_transfer_loss`` takes a ``TargetTiles`` for its ``tiles``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nst_exp.model.layers import map_size, reach
from nst_exp.tiling.geometry import OwnedFeatures, owned, tiles


@dataclass(frozen=True)
class TargetTiles:
    """Targets computed in tiles of ``tile`` px: the memory of one crop's forward, whatever the image."""

    tile: int

    def owned_parts(self, encoder: Any, image: Tensor, layers: Sequence[str]) -> Iterator[OwnedFeatures]:
        """Each tile's owned features of ``image``."""
        size = (image.shape[-2], image.shape[-1])
        grid, halo = reach(layers)
        with torch.no_grad():
            for rows, cols in tiles(*size, self.tile, grid, halo):
                crop = image[..., rows.crop_start : rows.crop_end, cols.crop_start : cols.crop_end]
                yield owned(encoder(crop, layers), rows, cols, size)

    def whole_maps(self, encoder: Any, image: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """The features of ``image`` at ``layers``, assembled from tiles (only these maps are ever whole)."""
        maps: dict[str, Tensor] = {}
        for part in self.owned_parts(encoder, image, layers):
            for layer, feats in part.features.items():
                if layer not in maps:
                    b, c = feats.shape[:2]
                    shape = (b, c, map_size(image.shape[-2], layer), map_size(image.shape[-1], layer))
                    maps[layer] = feats.new_empty(shape)
                r, c_ = part.regions[layer]
                maps[layer][..., r, c_] = feats
        return maps

    def summed_stats(
        self, encoder: Any, image: Tensor, layers: Sequence[str], stats: Mapping[str, Callable[[Tensor], tuple[Tensor, ...]]]
    ) -> dict[str, tuple[tuple[Tensor, ...], int]]:
        """Per layer, the layer's ``stats`` (sums over positions) of ``image``'s features, added up over the tiles, and
        the number of positions: a style target of any size with the memory of one tile."""
        out: dict[str, tuple[tuple[Tensor, ...], int]] = {}
        for part in self.owned_parts(encoder, image, layers):
            for layer, feats in part.features.items():
                sums = stats[layer](feats)
                if layer in out:
                    total, n = out[layer]
                    out[layer] = (tuple(a + s for a, s in zip(total, sums)), n + part.positions[layer])
                else:
                    out[layer] = (sums, part.positions[layer])
        return out
