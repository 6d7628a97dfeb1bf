"""Tile geometry: the pixels each tile owns, its crop, and the owned windows of its feature maps.

A tile owns a block of pixels; its crop adds a halo as wide as the deepest layer's reach
(``layers.reach``) and starts on the pooling grid, so the features at the owned positions are the
whole image's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from nst_exp.model.layers import downsampling, map_size, reach
from nst_exp.model.layout import channels_fastest
from nst_exp.model.losses import Region


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


class Crop(NamedTuple):
    """A tile (its rows and columns) and the image's rows and columns its crop takes."""

    rows: Span
    cols: Span
    row_slice: slice
    col_slice: slice


def crops(size: tuple[int, int], tile: int, layers: Sequence[str]) -> list[Crop]:
    """Every tile of an image of ``size`` (H, W) for a loss reading ``layers``, with its crop."""
    grid, halo = reach(layers)
    return [
        Crop(rows, cols, slice(rows.crop_start, rows.crop_end), slice(cols.crop_start, cols.crop_end))
        for rows, cols in tiles(*size, tile, grid, halo)
    ]


def needs_tiles(tile: int | None, shape: Sequence[int]) -> bool:
    """Is an image of ``shape`` (..., H, W) run in tiles of ``tile`` px? Only if larger than one."""
    return bool(tile) and max(shape[-2:]) > tile


@dataclass
class OwnedFeatures:
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


def window(x: Tensor, rows: slice, cols: slice) -> Tensor:
    """``x[..., rows, cols]``, with a gradient in ``x``'s layout."""
    return _Window.apply(x, rows, cols) if x.requires_grad else x[..., rows, cols]


def owned(features: Mapping[str, Tensor], rows: Span, cols: Span, size: tuple[int, int]) -> OwnedFeatures:
    """The windows of a crop's ``features`` at the positions its tile owns (``size``: the whole image's)."""
    out = OwnedFeatures({}, {}, {})
    for layer, feats in features.items():
        (local_r, whole_r), (local_c, whole_c) = rows.owned(layer, size[0]), cols.owned(layer, size[1])
        out.features[layer] = window(feats, local_r, local_c)
        out.regions[layer] = (whole_r, whole_c)
        out.positions[layer] = (whole_r.stop - whole_r.start) * (whole_c.stop - whole_c.start)
    return out
