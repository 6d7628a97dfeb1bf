"""Tiles of an image for the encoder: geometry and the features of the positions each tile owns.

A tile owns a block of pixels; its crop adds a halo as wide as the deepest layer's reach
(``layers.reach``) and starts on the pooling grid, so the features at the owned positions are the
whole image's. This module knows nothing of losses: ``model/losses.py`` builds targets tile by tile
with ``whole_maps`` and ``summed_stats``, and ``model/tiled.py`` evaluates a loss tile by tile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nst_exp.model.layers import downsampling, map_size, reach
from nst_exp.model.layout import channels_fastest

Region = tuple[slice, slice]  # rows and columns of a layer's map (the positions a tile owns)


@dataclass(frozen=True)
class Span:
    """One axis of a tile: the pixels it owns, [start, end), and its crop, [crop_start, crop_end)."""

    start: int
    end: int
    crop_start: int
    crop_end: int

    def owned(self, layer: str, side: int) -> tuple[slice, slice]:
        """The owned positions of ``layer``'s map: in the crop's map, and in the whole image's map."""
        f = downsampling(layer)
        first = self.start // f
        last = map_size(side, layer) if self.end == side else self.end // f
        offset = self.crop_start // f
        return slice(first - offset, last - offset), slice(first, last)


def spans(side: int, tile: int, grid: int, halo: int) -> list[Span]:
    """Tiles along one axis: owned blocks of ``tile`` px (the last one to the border), crops with the
    halo on each side, starting on the pooling grid."""
    out = []
    for start in range(0, side, tile):
        end = min(side, start + tile)
        if side - end < grid:  # a sliver left over (or none): the last tile owns it
            end = side
        crop_start = max(0, start - halo) // grid * grid
        out.append(Span(start, end, crop_start, min(side, end + halo)))
        if end == side:
            break
    return out


def tiles(height: int, width: int, tile: int, grid: int, halo: int) -> Iterator[tuple[Span, Span]]:
    for rows in spans(height, tile, grid, halo):
        for cols in spans(width, tile, grid, halo):
            yield rows, cols


@dataclass
class Owned:
    """A tile's features at the positions it owns, where those lie in each layer's whole map, and how many."""

    features: dict[str, Tensor]
    regions: dict[str, Region]
    positions: dict[str, int]


class _Window(torch.autograd.Function):
    """``x[..., rows, cols]`` whose gradient is laid out as ``x`` is: slicing's own backward scatters into
    NCHW zeros, and an NCHW gradient meeting the NHWC ones of the network slows every op after it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: slice, cols: slice) -> Tensor:  # type: ignore[override]
        fmt = torch.channels_last if channels_fastest(x) else torch.contiguous_format
        ctx.like, ctx.rows, ctx.cols = (x.shape, x.dtype, x.device, fmt), rows, cols
        return x[..., rows, cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        shape, dtype, device, fmt = ctx.like
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).zero_()
        out[..., ctx.rows, ctx.cols] = grad
        return out, None, None


def _window(x: Tensor, rows: slice, cols: slice) -> Tensor:
    return _Window.apply(x, rows, cols) if x.requires_grad else x[..., rows, cols]


def owned(features: Mapping[str, Tensor], rows: Span, cols: Span, size: tuple[int, int]) -> Owned:
    out = Owned({}, {}, {})
    for layer, feats in features.items():
        (local_r, whole_r), (local_c, whole_c) = rows.owned(layer, size[0]), cols.owned(layer, size[1])
        out.features[layer] = _window(feats, local_r, local_c)
        out.regions[layer] = (whole_r, whole_c)
        out.positions[layer] = (whole_r.stop - whole_r.start) * (whole_c.stop - whole_c.start)
    return out


def owned_tiles(encoder: Any, image: Tensor, layers: Sequence[str], tile: int) -> Iterator[Owned]:
    """Each tile's owned features of ``image`` (no autograd): what targets are made of, tile by tile."""
    size = (image.shape[-2], image.shape[-1])
    grid, halo = reach(layers)
    with torch.no_grad():
        for rows, cols in tiles(*size, tile, grid, halo):
            crop = image[..., rows.crop_start:rows.crop_end, cols.crop_start:cols.crop_end]
            yield owned(encoder(crop, layers), rows, cols, size)


def whole_maps(encoder: Any, image: Tensor, layers: Sequence[str], tile: int) -> dict[str, Tensor]:
    """The features of ``image`` at ``layers``, assembled from tiles (only these maps are ever whole)."""
    maps: dict[str, Tensor] = {}
    for part in owned_tiles(encoder, image, layers, tile):
        for layer, feats in part.features.items():
            if layer not in maps:
                b, c = feats.shape[:2]
                shape = (b, c, map_size(image.shape[-2], layer), map_size(image.shape[-1], layer))
                maps[layer] = feats.new_empty(shape)
            r, c_ = part.regions[layer]
            maps[layer][..., r, c_] = feats
    return maps


def summed_stats(encoder: Any, image: Tensor, layers: Sequence[str], stats: Callable[[Tensor], tuple[Tensor, ...]],
                 tile: int) -> dict[str, tuple[tuple[Tensor, ...], int]]:
    """Per layer, ``stats`` (sums over positions) of ``image``'s features, added up over the tiles, and
    the number of positions: a style target of any size with the memory of one tile."""
    out: dict[str, tuple[tuple[Tensor, ...], int]] = {}
    for part in owned_tiles(encoder, image, layers, tile):
        for layer, feats in part.features.items():
            sums = stats(feats)
            if layer in out:
                total, n = out[layer]
                out[layer] = (tuple(a + s for a, s in zip(total, sums)), n + part.positions[layer])
            else:
                out[layer] = (sums, part.positions[layer])
    return out
