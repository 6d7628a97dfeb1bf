"""The exact loss and image gradient of a large image, evaluated tile by tile (``image.tile``).

Every term is a function of sums over positions (``model/losses.py``: Gram matrices, means and
covariances, the content error), so:

1. pass 1, no autograd: each tile's crop (the tile plus a halo) runs through the encoder; the sums
   over the positions the tile *owns* are added up over the tiles (the last ``keep`` crops run with
   autograd, and pass 2 starts from their graphs rather than running them again);
2. the loss is computed from those small sums, made leaves, and differentiated: dL/dS per term
   (a C x C matrix, a C vector, or a number); the TV term, cheap, is differentiated on the image;
3. pass 2, with autograd: each crop again, and the surrogate ``sum <dL/dS, S(tile)>``, whose
   gradient with respect to the tile's features is the true one; its gradient is added into the
   image's at the crop.

Features of the owned positions are exact when the crop reaches ``layers.reach``'s halo past them
(beyond it, the encoder's padding at a cut edge changes nothing they depend on), when the crop's
origin lies on the pooling grid (the same pooling windows as the whole image), and when a tile at the
image's border keeps that border (the same padding). Tiled and untiled then differ only in the order
floats are summed. Activation memory is bounded by ``keep`` crops' graphs, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nst_exp.model.layers import downsampling, map_size, reach
from nst_exp.model.layout import channels_fastest
from nst_exp.model.losses import Region, StyleTransferLoss

Stats = dict[str, tuple[Tensor, ...]]


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


def tile_stats(loss: StyleTransferLoss, crop: Tensor, rows: Span, cols: Span, size: tuple[int, int]) -> tuple[Stats, dict[str, int]]:
    """The terms' sums over the positions this tile owns, and how many positions that is per layer."""
    part = owned(loss.encoder(crop), rows, cols, size)
    return loss.stats(part.features, part.regions), part.positions


def _add(total: Stats | None, part: Stats) -> Stats:
    if total is None:
        return {k: tuple(s.clone() for s in v) for k, v in part.items()}
    for key, sums in part.items():
        for acc, s in zip(total[key], sums):
            acc += s
    return total


def _share() -> tuple[int, int]:
    """(rank, world size): with ``torch.distributed`` initialised the tiles are shared out over its
    processes (tile i on rank i mod world); alone, one process does them all."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(tensors: Sequence[Tensor]) -> None:
    """Sum over the processes, in place (nothing to do alone)."""
    if _share()[1] > 1:
        for t in tensors:
            torch.distributed.all_reduce(t)


def _broadcast(tensors: Sequence[Tensor]) -> None:
    """Process 0's values everywhere, in place (nothing to do alone)."""
    if _share()[1] > 1:
        for t in tensors:
            torch.distributed.broadcast(t, 0)


def _all_crops(size: tuple[int, int], tile: int, loss: StyleTransferLoss) -> list[tuple[Span, Span, slice, slice]]:
    """Every tile, with its crop's rows and columns."""
    grid, halo = reach(loss.layers())
    return [(rows, cols, slice(rows.crop_start, rows.crop_end), slice(cols.crop_start, cols.crop_end))
            for rows, cols in tiles(*size, tile, grid, halo)]


def _crops(size: tuple[int, int], tile: int, loss: StyleTransferLoss) -> list[tuple[Span, Span, slice, slice]]:
    """This process's tiles (all of them when alone)."""
    rank, world = _share()
    return _all_crops(size, tile, loss)[rank::world]


@dataclass
class Kept:
    """A crop of pass 1 run with autograd: pass 2 starts from its graph instead of running it again."""

    crop: Tensor
    part: Stats


def stats_of(loss: StyleTransferLoss, image: Tensor, tile: int, keep: int = 1) -> tuple[Stats, dict[str, int], list[Kept]]:
    """Pass 1: the terms' sums over the whole ``image``, tile by tile, and the number of positions
    they cover per layer; summed over the processes when they share the tiles. This process's last
    ``keep`` crops run with autograd and their graphs are handed to pass 2 (in pass 1's order); the
    others run without."""
    size = (image.shape[-2], image.shape[-1])
    sums: Stats | None = None
    positions = dict.fromkeys(loss.layers(), 0)
    crops = _crops(size, tile, loss)
    kept: list[Kept] = []
    for i, (rows, cols, r, c) in enumerate(crops or _all_crops(size, tile, loss)[:1]):
        graph = bool(crops) and i >= len(crops) - keep
        crop = image.detach()[..., r, c].requires_grad_(graph)
        with torch.set_grad_enabled(graph):
            part, counts = tile_stats(loss, crop, rows, cols, size)
        if graph:
            kept.append(Kept(crop, part))
            part = {k: tuple(t.detach() for t in v) for k, v in part.items()}
        if not crops:  # more processes than tiles: this one adds zeros of the right shapes
            part, counts = {k: tuple(torch.zeros_like(t) for t in v) for k, v in part.items()}, dict.fromkeys(counts, 0)
        sums = _add(sums, part)
        for layer, n in counts.items():
            positions[layer] += n
    assert sums is not None
    count = torch.tensor([positions[k] for k in positions], dtype=torch.float64, device=image.device)
    _all_reduce([t for v in sums.values() for t in v] + [count])
    return sums, {k: int(n) for k, n in zip(positions, count.tolist())}, kept


def needs_tiles(tile: int | None, shape: Sequence[int]) -> bool:
    """Is an image of ``shape`` (..., H, W) evaluated in tiles with ``image.tile=tile``? Only if larger than one."""
    return bool(tile) and max(shape[-2:]) > tile


def evaluate_tiled(loss: StyleTransferLoss, image: Tensor, tile: int, keep: int = 1) -> dict[str, Tensor]:
    """The loss terms of ``image`` (detached), with d total / d image added into ``image.grad``.
    ``keep``: how many crops' pass-1 graphs this process holds for pass 2 (each one a forward less,
    and its graph's memory; ``run/tile_plan.py`` chooses it to fit).

    Processes sharing the tiles (``torch.distributed``) all get the same terms and gradient: pass 1's
    sums and pass 2's gradient are summed over them."""
    size = (image.shape[-2], image.shape[-1])
    sums, positions, kept = stats_of(loss, image.detach(), tile, keep)
    leaves = {k: tuple(s.detach().requires_grad_(True) for s in v) for k, v in sums.items()}
    with torch.enable_grad():
        terms = loss.terms(leaves, positions, image)
        terms["loss/total"].backward()  # dL/dS into the leaves; the TV term's gradient into image.grad
    if image.grad is None:
        image.grad = torch.zeros_like(image)
    slopes = {k: [leaf.grad for leaf in v] for k, v in leaves.items()}
    # Every process uses process 0's dL/dS: the gradient is then that of one loss, even where the
    # processes' targets differ in the last bits (convolutions summed in another order).
    _broadcast([g for v in slopes.values() for g in v if g is not None])
    features_grad = torch.zeros_like(image.grad)
    for rows, cols, r, c in reversed(_crops(size, tile, loss)):  # the kept (last) crops first
        with torch.enable_grad():
            if kept:  # pass 1's last crops, from the last: each graph goes with its backward
                last = kept.pop()
                crop, part = last.crop, last.part
            else:
                crop = image.detach()[..., r, c].requires_grad_(True)
                part, _ = tile_stats(loss, crop, rows, cols, size)
            surrogate = sum((s * g).sum() for k, v in part.items() for s, g in zip(v, slopes[k]) if g is not None)
            (grad,) = torch.autograd.grad(surrogate, crop)
        features_grad[..., r, c] += grad.to(features_grad.dtype)
    _all_reduce([features_grad])
    image.grad += features_grad
    return {k: v.detach() for k, v in terms.items()}
