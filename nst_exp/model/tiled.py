"""The exact loss and image gradient of a large image, evaluated tile by tile (``image.tile``).

Every term is a function of sums over positions (``model/losses.py``: Gram matrices, means and
covariances, the content error), so:

1. pass 1, no autograd: each tile's crop (the tile plus a halo) runs through the encoder; the sums
   over the positions the tile *owns* are added up over the tiles;
2. the loss is computed from those small sums, made leaves, and differentiated: dL/dS per term
   (a C x C matrix, a C vector, or a number); the TV term, cheap, is differentiated on the image;
3. pass 2, with autograd: each crop again, and the surrogate ``sum <dL/dS, S(tile)>``, whose
   gradient with respect to the tile's features is the true one; its gradient is added into the
   image's at the crop.

Features of the owned positions are exact when the crop reaches ``layers.reach``'s halo past them
(beyond it, the encoder's padding at a cut edge changes nothing they depend on), when the crop's
origin lies on the pooling grid (the same pooling windows as the whole image), and when a tile at the
image's border keeps that border (the same padding). Tiled and untiled then differ only in the order
floats are summed. Activation memory is bounded by one crop, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nst_exp.model.layers import LAYER_INDEX, LAYER_NAMES, reach
from nst_exp.model.losses import Region, StyleTransferLoss

Stats = dict[str, tuple[Tensor, ...]]


def downsampling(layer: str) -> int:
    """How many image pixels one position of ``layer``'s map spans per side: 2^(poolings before it)."""
    return 2 ** sum(1 for n in LAYER_NAMES[: LAYER_INDEX[layer] + 1] if n.startswith("pool"))


def map_size(side: int, layer: str) -> int:
    """A side of ``layer``'s map for an image side: each pooling floors."""
    for _ in range(downsampling(layer).bit_length() - 1):
        side //= 2
    return side


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


def _tile_stats(loss: StyleTransferLoss, crop: Tensor, rows: Span, cols: Span, size: tuple[int, int]) -> tuple[Stats, dict[str, int]]:
    """The terms' sums over the positions this tile owns, and how many positions that is per layer."""
    features = loss.encoder(crop)
    owned: dict[str, Tensor] = {}
    regions: dict[str, Region] = {}
    positions: dict[str, int] = {}
    for layer in loss.layers():
        (local_r, whole_r), (local_c, whole_c) = rows.owned(layer, size[0]), cols.owned(layer, size[1])
        owned[layer] = features[layer][..., local_r, local_c]
        regions[layer] = (whole_r, whole_c)
        positions[layer] = (whole_r.stop - whole_r.start) * (whole_c.stop - whole_c.start)
    return loss.stats(owned, regions), positions


def _add(total: Stats | None, part: Stats) -> Stats:
    if total is None:
        return {k: tuple(s.clone() for s in v) for k, v in part.items()}
    for key, sums in part.items():
        for acc, s in zip(total[key], sums):
            acc += s
    return total


def _crops(size: tuple[int, int], tile: int, loss: StyleTransferLoss) -> Iterator[tuple[Span, Span, slice, slice]]:
    grid, halo = reach(loss.layers())
    for rows, cols in tiles(*size, tile, grid, halo):
        yield rows, cols, slice(rows.crop_start, rows.crop_end), slice(cols.crop_start, cols.crop_end)


def stats_of(loss: StyleTransferLoss, image: Tensor, tile: int) -> tuple[Stats, dict[str, int]]:
    """Pass 1: the terms' sums over the whole ``image``, tile by tile (no autograd), and the number
    of positions they cover per layer."""
    size = (image.shape[-2], image.shape[-1])
    sums: Stats | None = None
    positions: dict[str, int] = {}
    with torch.no_grad():
        for rows, cols, r, c in _crops(size, tile, loss):
            part, counts = _tile_stats(loss, image[..., r, c], rows, cols, size)
            sums = _add(sums, part)
            for layer, n in counts.items():
                positions[layer] = positions.get(layer, 0) + n
    assert sums is not None
    return sums, positions


def evaluate_tiled(loss: StyleTransferLoss, image: Tensor, tile: int) -> dict[str, Tensor]:
    """The loss terms of ``image`` (detached), with d total / d image added into ``image.grad``."""
    size = (image.shape[-2], image.shape[-1])
    sums, positions = stats_of(loss, image.detach(), tile)
    leaves = {k: tuple(s.detach().requires_grad_(True) for s in v) for k, v in sums.items()}
    with torch.enable_grad():
        terms = loss.terms(leaves, positions, image)
        terms["loss/total"].backward()  # dL/dS into the leaves; the TV term's gradient into image.grad
    if image.grad is None:
        image.grad = torch.zeros_like(image)
    slopes = {k: [leaf.grad for leaf in v] for k, v in leaves.items()}
    for rows, cols, r, c in _crops(size, tile, loss):
        crop = image.detach()[..., r, c].requires_grad_(True)
        with torch.enable_grad():
            part, _ = _tile_stats(loss, crop, rows, cols, size)
            surrogate = sum((s * g).sum() for k, v in part.items() for s, g in zip(v, slopes[k]) if g is not None)
            (grad,) = torch.autograd.grad(surrogate, crop)
        image.grad[..., r, c] += grad.to(image.grad.dtype)
    return {k: v.detach() for k, v in terms.items()}
