"""The exact loss and image gradient of a large image, tile by tile, and the loss passes a run steps with.

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

Processes sharing the tiles pass a ``Reduction`` (``tiling/group.py``'s over ``torch.distributed``);
the maths here holds no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from nst_exp.model.losses import StyleTransferLoss
from nst_exp.tiling.geometry import Span, crops, needs_tiles, owned

Stats = dict[str, tuple[Tensor, ...]]


class Reduction(Protocol):
    """The processes sharing the tiles: tile i is process ``i mod world``'s."""

    rank: int
    world: int

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        """Sum over the processes, in place."""

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Process 0's values everywhere, in place."""


class Alone:
    """One process does every tile: nothing to reduce."""

    rank, world = 0, 1

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        pass

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        pass


ALONE = Alone()


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


@dataclass
class KeptGraph:
    """A crop of pass 1 run with autograd: pass 2 starts from its graph instead of running it again."""

    crop: Tensor
    part: Stats


def first_pass(
    loss: StyleTransferLoss, image: Tensor, tile: int, keep: int = 1, reduction: Reduction = ALONE
) -> tuple[Stats, dict[str, int], list[KeptGraph]]:
    """Pass 1: the terms' sums over the whole ``image``, tile by tile, and the number of positions
    they cover per layer; summed over the processes of ``reduction``. This process's last ``keep``
    crops run with autograd and their graphs are handed to pass 2 (in pass 1's order); the others
    run without."""
    size = (image.shape[-2], image.shape[-1])
    sums: Stats | None = None
    positions = dict.fromkeys(loss.layers(), 0)
    every = crops(size, tile, loss.layers())
    mine = every[reduction.rank :: reduction.world]
    kept: list[KeptGraph] = []
    for i, (rows, cols, r, c) in enumerate(mine or every[:1]):
        graph = bool(mine) and i >= len(mine) - keep
        crop = image.detach()[..., r, c].requires_grad_(graph)
        with torch.set_grad_enabled(graph):
            part, counts = tile_stats(loss, crop, rows, cols, size)
        if graph:
            kept.append(KeptGraph(crop, part))
            part = {k: tuple(t.detach() for t in v) for k, v in part.items()}
        if not mine:  # more processes than tiles: this one adds zeros of the right shapes
            part, counts = {k: tuple(torch.zeros_like(t) for t in v) for k, v in part.items()}, dict.fromkeys(counts, 0)
        sums = _add(sums, part)
        for layer, n in counts.items():
            positions[layer] += n
    assert sums is not None
    count = torch.tensor([positions[k] for k in positions], dtype=torch.float64, device=image.device)
    reduction.all_reduce([t for v in sums.values() for t in v] + [count])
    return sums, {k: int(n) for k, n in zip(positions, count.tolist())}, kept


def tiled_loss_and_grad(
    loss: StyleTransferLoss, image: Tensor, tile: int, keep: int = 1, reduction: Reduction = ALONE
) -> dict[str, Tensor]:
    """The loss terms of ``image`` (detached), with d total / d image added into ``image.grad``.
    ``keep``: how many crops' pass-1 graphs this process holds for pass 2 (each one a forward less,
    and its graph's memory; ``tiling/plan.py`` chooses it to fit).

    The processes of ``reduction`` all get the same terms and gradient: pass 1's sums and pass 2's
    gradient are summed over them."""
    size = (image.shape[-2], image.shape[-1])
    sums, positions, kept = first_pass(loss, image.detach(), tile, keep, reduction)
    leaves = {k: tuple(s.detach().requires_grad_(True) for s in v) for k, v in sums.items()}
    with torch.enable_grad():
        terms = loss.terms(leaves, positions, image)
        terms["loss/total"].backward()  # dL/dS into the leaves; the TV term's gradient into image.grad
    if image.grad is None:
        image.grad = torch.zeros_like(image)
    slopes = {k: [leaf.grad for leaf in v] for k, v in leaves.items()}
    # Every process uses process 0's dL/dS: the gradient is then that of one loss, even where the
    # processes' targets differ in the last bits (convolutions summed in another order).
    reduction.broadcast([g for v in slopes.values() for g in v if g is not None])
    features_grad = torch.zeros_like(image.grad)
    mine = crops(size, tile, loss.layers())[reduction.rank :: reduction.world]
    for rows, cols, r, c in reversed(mine):  # the kept (last) crops first
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
    reduction.all_reduce([features_grad])
    image.grad += features_grad
    return {k: v.detach() for k, v in terms.items()}


Backward = Callable[[Tensor], None]


class LossPass(Protocol):
    """One loss-and-gradient pass at ``image``: the named terms, and d total / d image in ``image.grad``
    (``backward`` is how the caller differentiates a total that still has its graph: Lightning's)."""

    loss: StyleTransferLoss
    replayable: bool  # one fixed sequence of kernels, so a CUDA graph may capture and replay it

    def __call__(self, image: Tensor, backward: Backward) -> dict[str, Tensor]: ...


@dataclass
class WholePass:
    """The whole image through the network at once."""

    loss: StyleTransferLoss
    replayable: ClassVar[bool] = True

    def __call__(self, image: Tensor, backward: Backward) -> dict[str, Tensor]:
        terms = self.loss(image)
        backward(terms["loss/total"])
        return terms


@dataclass
class TiledPass:
    """The exact pass tile by tile (``tiled_loss_and_grad``); terms come back detached."""

    loss: StyleTransferLoss
    tile: int
    keep: int = 1
    reduction: Reduction = ALONE
    replayable: ClassVar[bool] = False  # many passes per step, not one graph

    def __call__(self, image: Tensor, backward: Backward) -> dict[str, Tensor]:
        return tiled_loss_and_grad(self.loss, image, self.tile, self.keep, self.reduction)


def loss_pass(loss: StyleTransferLoss, tile: int | None, keep: int, shape: Sequence[int]) -> WholePass | TiledPass:
    """The pass for an image of ``shape`` with a stage's plan (``tile``, ``keep``): tiles only where the
    image is larger than one."""
    return TiledPass(loss, tile, keep) if tile is not None and needs_tiles(tile, shape) else WholePass(loss)
