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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nst_exp.model.layers import reach
from nst_exp.model.losses import StyleTransferLoss
from nst_exp.model.tiles import Span, owned, tiles

Stats = dict[str, tuple[Tensor, ...]]


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
