"""Whether, and how, a stage's loss pass runs in tiles (``image.tile``, ``image.tile_keep``, ``image.memory_mib``).

One pass's memory is the graph autograd keeps for the backward, plus the maps alive beside it.
Both scale with the pixels of what runs through VGG19 at once (the whole image, or one tile's
crop), so a *footprint* in bytes per pixel predicts them. It is measured, not assumed: one small
crop of the real image runs through the real loss (this stage's layers, padding, pooling, memory
mode, precision and layout) and every tensor autograd saves is counted once (``measure``).

With ``image.tile=auto`` (the default) the plan is the cheapest way that fits the budget:
- the whole image, if its pass fits (always the cheapest for one process);
- else tiles: for each candidate tile size the crops (tile + halo), and how many of their pass-1
  graphs fit beside each other (``tile_keep``: those crops skip pass 2's forward); the cost is the
  crop pixels run, a crop not kept running its forward once more (a third of forward + backward),
  plus a fixed cost per crop; with several processes, the busiest one's share.
The budget is ``image.memory_mib``, else 80% of the device's free memory less the bytes the image,
its gradient and the optimiser's state will take (``memory.state_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from nst_exp.config import TILE_AUTO
from nst_exp.errors import UserError
from nst_exp.model.layers import out_channels, reach
from nst_exp.model.losses import StyleTransferLoss, mixes_kinds, not_tileable_error, untileable_kind
from nst_exp.tiling.exact import tile_stats
from nst_exp.tiling.geometry import tiles
from nst_exp.tiling.memory import SHARE, available_bytes, state_bytes

MIB = 2**20
WIDEST_CHANNELS = 64  # conv1_x: the widest maps per input pixel (64 channels at full resolution)
# Live beside the kept graph, in widest maps (calibrated on the CPU; the measurements are in docs/print-size.md):
BACKWARD_MAPS = 2.0  # during the backward: the gradient of a widest map and of its input
NO_GRAD_MAPS = 4.0  # a forward without autograd: input, padded copy, output
PROBE_TILES = (32, 96)  # px owned by the two probe crops (plus their halo)
PROBE_MARGIN = 1.03  # deep maps of a small crop floor a little more than a large image's
FORWARD_SHARE = 1 / 3  # a forward's share of forward + backward: what a crop not kept costs once more
CROP_COST_PX = 128 * 128  # fixed cost of a crop (launches, stats, bookkeeping) in pixel-equivalents
STEP_GROWTH = 1.06  # candidate tile sizes grow by this factor (on the pooling grid)
# trainer.keep_freed_memory: the kept heap over a loss pass's peak bytes in use (its first step's holes stay)
KEPT_HEAP_GROWTH = 2.0


@dataclass(frozen=True)
class Footprint:
    """Bytes per pixel of what runs through VGG19 at once."""

    graph: float  # what autograd keeps for the backward
    backward: float  # live beside the graph during the backward
    no_grad: float  # peak of a forward without autograd (pass 1 of a crop not kept; targets)
    fixed: float = 0.0  # bytes per graph that do not grow with the crop (Gram-sized products)

    @property
    def loss_pass(self) -> float:
        return self.graph + self.backward

    def kept(self, pixels: float) -> float:
        """What one graph of a crop of ``pixels`` holds."""
        return self.fixed + pixels * self.graph

    def peak(self, pixels: float) -> float:
        """The peak of one crop run alone (its graph and backward, or its forward without autograd)."""
        return self.fixed + pixels * max(self.loss_pass, self.no_grad)


@dataclass(frozen=True)
class TilePlan:
    """How one stage runs its loss pass."""

    tile: int | None  # px; None: the whole image at once
    keep: int = 0  # crops per process whose pass-1 graph pass 2 reuses
    crops: int = 1  # crops in all
    need_bytes: int = 0  # the estimated peak of one loss pass (per process)
    budget_bytes: int | None = None  # what it had to fit (None: unknown, e.g. on MPS)
    auto: bool = False  # chosen by image.tile=auto
    world: int = 1  # processes sharing the crops
    whole_bytes: int = 0  # what the whole image's pass would need
    work: float = 1.0  # the busiest process's estimated time per loss pass, in whole-image passes
    kept_heap: bool = False  # trainer.keep_freed_memory holds for the stage's steps (``with_kept_heap``)

    def record(self, size: int) -> dict[str, object]:
        """The plan as result.json keeps it (``size``: the stage's long side)."""
        mib = lambda b: None if b is None else round(b / MIB, 1)
        return {
            "size": size,
            "tile": self.tile,
            "keep": self.keep,
            "crops": self.crops,
            "auto": self.auto,
            "world": self.world,
            "need_mib": mib(self.need_bytes),
            "budget_mib": mib(self.budget_bytes),
            "whole_mib": mib(self.whole_bytes),
            "work": round(self.work, 3),
            "keep_freed_memory": self.kept_heap,
            "line": self.describe(),
        }

    def describe(self) -> str:
        """One line for the run's log."""
        need = f"~{self.need_bytes / MIB:,.0f} MiB"
        of = f" of a {self.budget_bytes / MIB:,.0f} MiB budget" if self.budget_bytes is not None else ""
        if self.tile is None:
            return f"whole image ({need}{of})"
        if not self.auto:
            why = f"image.tile={self.tile}"
        elif self.world > 1 and self.budget_bytes is not None and self.whole_bytes <= self.budget_bytes:
            why = f"image.tile=auto: shared by {self.world} processes"
        else:
            why = "image.tile=auto: the whole image would not fit"
        per = " per process" if self.world > 1 else ""
        return (
            f"tiles of {self.tile} px ({why}): {self.crops} crops, pass 2 reusing {self.keep}{per} of pass 1's "
            f"graphs ({need}{per}{of}; ~{self.work:.2f}x the time of one whole pass)"
        )


def element_bytes(image: Tensor, bf16: bool) -> int:
    return 2 if bf16 else image.element_size()


def saved_storage_bytes(run: Callable[[], object], exclude: Iterable[Tensor]) -> tuple[int, int]:
    """Bytes of the storages autograd saves while ``run()`` builds its graph, each counted once and
    ``exclude``'s not at all: (those of 4-d, activation-shaped tensors, those of the others).

    The saved tensors are held in a list until the count is done (so no storage is freed and its
    address reused mid-run) and the graph keeps only ``None`` in their place: a pack hook that returns
    the tensor itself makes a node that saves its own output hold that output, and the output holds
    the node, a cycle Python's gc cannot see, which would leak every probe's graph."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    maps: dict[int, int] = {}
    other: dict[int, int] = {}
    alive: list[Tensor] = []

    def pack(t: Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            (maps if t.dim() == 4 else other)[ptr] = t.untyped_storage().nbytes()
        alive.append(t)

    def unpack(_: None) -> Tensor:
        raise RuntimeError("a graph built to count its saved tensors cannot be differentiated")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        run()
    alive.clear()
    return sum(maps.values()), sum(other.values())


def _saved_bytes(loss: StyleTransferLoss, image: Tensor, tile: int, bf16: bool) -> tuple[int, int, int, int]:
    """(crop pixels, owned pixels, bytes of activation-shaped storages, of the others) that autograd
    saves running the first (corner) tile of ``tile`` px; each storage counted once, the loss's own
    buffers (targets, masks, weights) not at all."""
    size = (image.shape[-2], image.shape[-1])
    grid, halo = reach(loss.layers())
    rows, cols = next(tiles(*size, max(grid, tile // grid * grid), grid, halo))
    crop = image.detach()[..., rows.crop_start : rows.crop_end, cols.crop_start : cols.crop_end].clone().requires_grad_(True)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        maps, other = saved_storage_bytes(
            lambda: tile_stats(loss, crop, rows, cols, size), [*loss.buffers(), *loss.encoder.buffers(), crop]
        )
    owned = (rows.end - rows.start) * (cols.end - cols.start)
    return crop.shape[-2] * crop.shape[-1], owned, maps, other


def measure(loss: StyleTransferLoss, image: Tensor, bf16: bool) -> Footprint:
    """The footprint of ``loss`` on crops of ``image``, measured on two small crops.

    Most of a graph grows with the crop (the encoder's maps); some with the positions the crop owns
    only (the content error, the owned windows); Gram-sized products not at all. Two crops with
    different shares of owned pixels separate the first two: ``graph`` is their sum per pixel, exact
    for the whole image (which owns every pixel) and an upper bound for a crop. The maps alive beside
    the graph are modelled from the widest map."""
    probes = [_saved_bytes(loss, image, tile, bf16) for tile in PROBE_TILES]
    whole = [p for p in probes if p[0] == p[1]]
    if whole:  # a probe covered the image: its bytes are the whole image's
        per_pixel = whole[0][2] / whole[0][0]
    else:
        (c1, o1, b1, _), (c2, o2, b2, _) = probes
        det = c1 * o2 - c2 * o1
        per_crop = (b1 * o2 - b2 * o1) / det if det else max(b1 / c1, b2 / c2)
        per_owned = (c1 * b2 - c2 * b1) / det if det else 0.0
        per_pixel = max(per_crop, 0.0) + max(per_owned, 0.0)
    widest = WIDEST_CHANNELS * element_bytes(image, bf16)
    # The terms' own graph (two fp32 C x C products per style layer) joins a whole image's graph.
    terms = sum(2 * 4 * out_channels(layer) ** 2 for layer in loss.style_losses)
    fixed = max(p[3] for p in probes) + terms
    return Footprint(PROBE_MARGIN * per_pixel, BACKWARD_MAPS * widest, NO_GRAD_MAPS * widest, fixed)


def with_kept_heap(plan: TilePlan, asked: bool) -> TilePlan:
    """The plan with ``trainer.keep_freed_memory`` (``asked``, where it applies) decided for its stage. The kept
    heap outgrows the pass's bytes in use: the holes its first step leaves stay in the process. So it holds
    only where the budget has room for ``KEPT_HEAP_GROWTH`` times the pass; a plan without a budget
    (``image.tile=null``, or the free memory unknown) leaves the choice to the setting."""
    fits = plan.budget_bytes is None or plan.need_bytes * KEPT_HEAP_GROWTH <= plan.budget_bytes
    return replace(plan, kept_heap=asked and fits)


def no_grad_bytes_per_pixel(image: Tensor) -> float:
    """A forward without autograd (targets), in ``image``'s dtype."""
    return NO_GRAD_MAPS * WIDEST_CHANNELS * image.element_size()


def budget(memory_mib: int | None, history_pairs: int, device: torch.device, pixels: int) -> int | None:
    """Bytes one loss pass may use: ``memory_mib`` (``image.memory_mib``), else 80% of what ``device`` has
    free now less the state still to come for an image of ``pixels`` with ``history_pairs`` L-BFGS pairs
    (``memory.state_bytes``); None where the free memory is unknown."""
    if memory_mib is not None:
        return int(memory_mib) * MIB
    free = available_bytes(device)
    if free is None:
        return None
    return max(0, int(SHARE * free) - state_bytes(history_pairs, pixels))


def candidate_tiles(long_side: int, grid: int, halo: int) -> list[int]:
    """Tile sizes worth trying: on the pooling grid, from about the halo up to the long side, growing by ~6%."""
    out, t = [], max(grid, -(-halo // grid) * grid)
    while t < long_side:
        out.append(t)
        t = max(t + grid, int(t * STEP_GROWTH) // grid * grid)
    return out


def _crop_areas(size: tuple[int, int], tile: int, grid: int, halo: int) -> list[int]:
    return [(r.crop_end - r.crop_start) * (c.crop_end - c.crop_start) for r, c in tiles(*size, tile, grid, halo)]


@dataclass(frozen=True)
class _Option:
    cost: float
    keep: int
    need: float


def _option(areas: list[int], world: int, fp: Footprint, budget_bytes: float | None, keep: int | None) -> _Option | None:
    """The busiest process's cost and peak for these crops (tile i on process i mod world), keeping the
    last ``keep`` crops' graphs (None: as many as fit in ``budget_bytes``; with no budget known, all).

    Peaks: a crop of pass 1 not kept runs alone (its forward's live maps); the kept ones hold their
    graphs together, plus the live maps of one backward; a crop run again in pass 2 holds its graph
    and those maps."""
    shares = [areas[rank::world] for rank in range(world)]
    largest = max(areas)
    working = largest * max(fp.loss_pass, fp.no_grad)
    if budget_bytes is not None and working > budget_bytes:
        return None
    kept_count = min(len(s) for s in shares if s) if keep is None else keep
    if keep is None and budget_bytes is not None:
        for share in shares:
            held, k = 0.0, 0
            for area in reversed(share):  # the last crops of pass 1 are kept
                if held + fp.kept(area) + largest * fp.backward > budget_bytes:
                    break
                held, k = held + fp.kept(area), k + 1
            kept_count = min(kept_count, max(1, k))  # one kept costs no more than one run again
    cost, need = 0.0, working
    for share in shares:
        kept, rest = share[max(0, len(share) - kept_count) :], share[: max(0, len(share) - kept_count)]
        cost = max(cost, sum(kept) + (1 + FORWARD_SHARE) * sum(rest) + CROP_COST_PX * len(share))
        need = max(need, sum(fp.kept(a) for a in kept) + largest * fp.backward)
    return _Option(cost, min(kept_count, max(len(s) for s in shares)), need)


def plan_step(
    tile: int | str | None,
    keep: int | None,
    size: tuple[int, int],
    layers: Sequence[str],
    fp: Footprint,
    budget_bytes: int | None,
    world: int = 1,
) -> TilePlan:
    """The stage's plan: ``tile`` is ``image.tile`` (px, ``"auto"`` or None: as ``config.tile_setting``
    reads it), ``keep`` ``image.tile_keep``, ``budget_bytes`` the budget (None: unknown), ``world`` the
    processes sharing tiles."""
    grid, halo = reach(layers)
    pixels = size[0] * size[1]
    whole_need = int(fp.fixed + pixels * fp.loss_pass)
    whole = TilePlan(None, 0, 1, whole_need, budget_bytes, whole_bytes=whole_need)
    if tile is None or (isinstance(tile, int) and tile >= max(size)):
        return whole
    if isinstance(tile, int):
        areas = _crop_areas(size, tile, grid, halo)
        if budget_bytes is None and keep is None:
            keep = 1  # an explicit tile with no known budget: one graph at a time
        option = _option(areas, world, fp, budget_bytes, keep) or _option(areas, world, fp, None, keep or 1)
        assert option is not None
        return TilePlan(
            tile,
            option.keep,
            len(areas),
            int(option.need),
            budget_bytes,
            False,
            world,
            whole.need_bytes,
            option.cost / (pixels + CROP_COST_PX),
        )
    assert tile == TILE_AUTO
    if budget_bytes is None or (world == 1 and whole.need_bytes <= budget_bytes):
        return whole
    best: tuple[float, TilePlan] | None = None
    if whole.need_bytes <= budget_bytes:  # several processes: one whole pass may still beat sharing tiles
        best = (pixels + CROP_COST_PX, whole)
    for candidate in candidate_tiles(max(size), grid, halo):
        areas = _crop_areas(size, candidate, grid, halo)
        option = _option(areas, world, fp, budget_bytes, keep)
        if option is not None and (best is None or option.cost < best[0]):
            best = (
                option.cost,
                TilePlan(
                    candidate,
                    option.keep,
                    len(areas),
                    int(option.need),
                    budget_bytes,
                    True,
                    world,
                    whole.need_bytes,
                    option.cost / (pixels + CROP_COST_PX),
                ),
            )
    if best is None:
        smallest = candidate_tiles(max(size), grid, halo)[:1] or [grid]
        need = fp.peak(max(_crop_areas(size, smallest[0], grid, halo)))
        raise UserError(
            f"even tiles of {smallest[0]} px need ~{need / MIB:,.0f} MiB per loss pass and the budget is "
            f"{budget_bytes / MIB:,.0f} MiB; fix: free memory, raise image.memory_mib, trainer.precision=bf16-mixed, "
            "optimizer=adam (less state) or a smaller image.size"
        )
    return best[1]


def plan_targets(
    tile: int | str | None, shapes: Sequence[tuple[int, int]], layers: Sequence[str], bytes_per_pixel: float, budget_bytes: int | None
) -> int | None:
    """The tile the targets are computed in (no autograd, so no graph to keep): ``image.tile`` when it
    is a size; with auto the whole images if the largest fits, else the largest tile whose crops fit."""
    if tile is None or isinstance(tile, int):
        return tile
    largest = max(shapes, key=lambda s: s[0] * s[1])
    if budget_bytes is None or largest[0] * largest[1] * bytes_per_pixel <= budget_bytes:
        return None
    grid, halo = reach(layers)
    fitting = [
        t for t in candidate_tiles(max(largest), grid, halo) if max(_crop_areas(largest, t, grid, halo)) * bytes_per_pixel <= budget_bytes
    ]
    return fitting[-1] if fitting else (candidate_tiles(max(largest), grid, halo)[:1] or [grid])[0]


def stage_plan(
    tile: int | str | None,
    keep: int | None,
    memory_mib: int | None,
    history_pairs: int,
    loss: StyleTransferLoss,
    image: Tensor,
    bf16: bool,
    world: int = 1,
) -> TilePlan:
    """The plan for a stage whose generated image is like ``image``: measured footprint, budget, plan.
    ``tile``, ``keep``, ``memory_mib``: ``image.tile`` (px, ``"auto"`` or None), ``image.tile_keep``,
    ``image.memory_mib``; ``history_pairs``: the L-BFGS pairs the budget leaves budget_bytes for (0 for Adam).
    Call it with the plain encoder in ``loss`` (a compiled one would not show what it saves)."""
    size = (image.shape[-2], image.shape[-1])
    if tile is None:
        return TilePlan(None)
    fp = measure(loss, image, bf16)
    budget_bytes = budget(memory_mib, history_pairs, image.device, size[0] * size[1])
    plan = plan_step(tile, keep, size, loss.layers(), fp, budget_bytes, world)
    kind = untileable_kind(loss)
    if plan.tile is not None and kind is not None:
        what = f"a {size[1]}x{size[0]} image does not fit the memory budget whole"
        raise UserError(not_tileable_error(what, kind, per_layer=mixes_kinds(loss)))
    return plan
