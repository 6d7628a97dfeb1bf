"""Whether, and how, a stage's loss is evaluated in tiles: ``image.tile``, ``image.tile_keep``, ``image.memory_mib``.

One evaluation's memory is the graph autograd keeps for the backward, plus the maps alive beside it.
Both scale with the pixels of what runs through VGG19 at once (the whole image, or one tile's
crop), so a *footprint* in bytes per pixel predicts them. It is measured, not assumed: one small
crop of the real image runs through the real loss (this stage's layers, padding, pooling, memory
mode, precision and layout) and every tensor autograd saves is counted once (``measure``).

With ``image.tile=auto`` (the default) the plan is the cheapest way that fits the budget:
- the whole image, if its evaluation fits (always the cheapest for one process);
- else tiles: for each candidate tile size the crops (tile + halo), and how many of their pass-1
  graphs fit beside each other (``tile_keep``: those crops skip pass 2's forward); the cost is the
  crop pixels run, a crop not kept running its forward once more (a third of forward + backward),
  plus a fixed cost per crop; with several processes, the busiest one's share.
The budget is ``image.memory_mib``, else 80% of the device's free memory less the bytes the image,
its gradient and the optimiser's state will take (``memory_fit``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor

from nst_exp.config import OptimizerName, TILE_AUTO, tile_setting
from nst_exp.errors import UserError
from nst_exp.model.losses import is_tileable, not_tileable_error
from nst_exp.model.layers import out_channels, reach
from nst_exp.model.losses import StyleTransferLoss
from nst_exp.model.tiled import tile_stats, tiles
from nst_exp.run.memory_fit import OTHER_BYTES_PER_PIXEL, PAIR_BYTES_PER_PIXEL, SHARE, available_bytes

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


@dataclass(frozen=True)
class Footprint:
    """Bytes per pixel of what runs through VGG19 at once."""

    graph: float  # what autograd keeps for the backward
    backward: float  # live beside the graph during the backward
    no_grad: float  # peak of a forward without autograd (pass 1 of a crop not kept; targets)
    fixed: float = 0.0  # bytes per graph that do not grow with the crop (Gram-sized products)

    @property
    def evaluation(self) -> float:
        return self.graph + self.backward

    def kept(self, pixels: float) -> float:
        """What one graph of a crop of ``pixels`` holds."""
        return self.fixed + pixels * self.graph

    def peak(self, pixels: float) -> float:
        """The peak of one crop evaluated alone (its graph and backward, or its forward without autograd)."""
        return self.fixed + pixels * max(self.evaluation, self.no_grad)


@dataclass(frozen=True)
class TilePlan:
    """How one stage evaluates its loss."""

    tile: int | None  # px; None: the whole image at once
    keep: int = 0  # crops per process whose pass-1 graph pass 2 reuses
    crops: int = 1  # crops in all
    need_bytes: int = 0  # the estimated peak of one evaluation (per process)
    budget_bytes: int | None = None  # what it had to fit (None: unknown, e.g. on MPS)
    auto: bool = False  # chosen by image.tile=auto
    world: int = 1  # processes sharing the crops
    whole_bytes: int = 0  # what the whole image's evaluation would need
    work: float = 1.0  # the busiest process's estimated time per evaluation, in whole-image evaluations

    def record(self, size: int) -> dict[str, object]:
        """The plan as result.json keeps it (``size``: the stage's long side)."""
        mib = (lambda b: None if b is None else round(b / MIB, 1))
        return {"size": size, "tile": self.tile, "keep": self.keep, "crops": self.crops, "auto": self.auto,
                "world": self.world, "need_mib": mib(self.need_bytes), "budget_mib": mib(self.budget_bytes),
                "whole_mib": mib(self.whole_bytes), "work": round(self.work, 3), "line": self.describe()}

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
        return (f"tiles of {self.tile} px ({why}): {self.crops} crops, pass 2 reusing {self.keep}{per} of pass 1's "
                f"graphs ({need}{per}{of}; ~{self.work:.2f}x the time of one whole evaluation)")


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
    saves evaluating the first (corner) tile of ``tile`` px; each storage counted once, the loss's own
    buffers (targets, masks, weights) not at all."""
    size = (image.shape[-2], image.shape[-1])
    grid, halo = reach(loss.layers())
    rows, cols = next(tiles(*size, max(grid, tile // grid * grid), grid, halo))
    crop = image.detach()[..., rows.crop_start:rows.crop_end, cols.crop_start:cols.crop_end].clone().requires_grad_(True)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        maps, other = saved_storage_bytes(lambda: tile_stats(loss, crop, rows, cols, size),
                                          [*loss.buffers(), *loss.encoder.buffers(), crop])
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


def no_grad_bytes_per_pixel(image: Tensor) -> float:
    """A forward without autograd (targets), in ``image``'s dtype."""
    return NO_GRAD_MAPS * WIDEST_CHANNELS * image.element_size()


def state_bytes(cfg: DictConfig, pixels: int) -> int:
    """What the image, its gradient and the optimiser's state take at full history (not activations)."""
    pairs = int(cfg.optimizer.history_size) if cfg.optimizer.name == OptimizerName.lbfgs else 0
    return pixels * (PAIR_BYTES_PER_PIXEL * pairs + OTHER_BYTES_PER_PIXEL)


def budget(cfg: DictConfig, device: torch.device, pixels: int) -> int | None:
    """Bytes one evaluation may use: ``image.memory_mib``, else 80% of what ``device`` has free now less
    the state still to come for an image of ``pixels``; None where the free memory is unknown."""
    if cfg.image.get("memory_mib") is not None:
        return int(cfg.image.memory_mib) * MIB
    free = available_bytes(device)
    if free is None:
        return None
    return max(0, int(SHARE * free) - state_bytes(cfg, pixels))


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


def _option(areas: list[int], world: int, fp: Footprint, room: float | None, keep: int | None) -> _Option | None:
    """The busiest process's cost and peak for these crops (tile i on process i mod world), keeping the
    last ``keep`` crops' graphs (None: as many as fit in ``room``; with no room known, all).

    Peaks: a crop of pass 1 not kept runs alone (its forward's live maps); the kept ones hold their
    graphs together, plus the live maps of one backward; a crop run again in pass 2 holds its graph
    and those maps."""
    shares = [areas[rank::world] for rank in range(world)]
    largest = max(areas)
    working = largest * max(fp.evaluation, fp.no_grad)
    if room is not None and working > room:
        return None
    fits = min(len(s) for s in shares if s) if keep is None else keep
    if keep is None and room is not None:
        for share in shares:
            held, k = 0.0, 0
            for area in reversed(share):  # the last crops of pass 1 are kept
                if held + fp.kept(area) + largest * fp.backward > room:
                    break
                held, k = held + fp.kept(area), k + 1
            fits = min(fits, max(1, k))  # one kept costs no more than one run again
    cost, need = 0.0, working
    for share in shares:
        kept, rest = share[max(0, len(share) - fits):], share[:max(0, len(share) - fits)]
        cost = max(cost, sum(kept) + (1 + FORWARD_SHARE) * sum(rest) + CROP_COST_PX * len(share))
        need = max(need, sum(fp.kept(a) for a in kept) + largest * fp.backward)
    return _Option(cost, min(fits, max(len(s) for s in shares)), need)


def plan_step(setting: int | str | None, keep: int | None, size: tuple[int, int], layers: Sequence[str],
              fp: Footprint, room: int | None, world: int = 1) -> TilePlan:
    """The stage's plan: ``setting`` is ``image.tile`` as ``config.tile_setting`` reads it, ``keep``
    ``image.tile_keep``, ``room`` the budget in bytes (None: unknown), ``world`` the processes sharing tiles."""
    grid, halo = reach(layers)
    pixels = size[0] * size[1]
    whole_need = int(fp.fixed + pixels * fp.evaluation)
    whole = TilePlan(None, 0, 1, whole_need, room, whole_bytes=whole_need)
    if setting is None or (isinstance(setting, int) and setting >= max(size)):
        return whole
    if isinstance(setting, int):
        areas = _crop_areas(size, setting, grid, halo)
        if room is None and keep is None:
            keep = 1  # an explicit tile with no known budget: one graph at a time
        option = _option(areas, world, fp, room, keep) or _option(areas, world, fp, None, keep or 1)
        assert option is not None
        return TilePlan(setting, option.keep, len(areas), int(option.need), room, False, world, whole.need_bytes,
                        option.cost / (pixels + CROP_COST_PX))
    assert setting == TILE_AUTO
    if room is None or (world == 1 and whole.need_bytes <= room):
        return whole
    best: tuple[float, TilePlan] | None = None
    if whole.need_bytes <= room:  # several processes: one whole evaluation may still beat sharing tiles
        best = (pixels + CROP_COST_PX, whole)
    for tile in candidate_tiles(max(size), grid, halo):
        areas = _crop_areas(size, tile, grid, halo)
        option = _option(areas, world, fp, room, keep)
        if option is not None and (best is None or option.cost < best[0]):
            best = (option.cost, TilePlan(tile, option.keep, len(areas), int(option.need), room, True, world, whole.need_bytes,
                                          option.cost / (pixels + CROP_COST_PX)))
    if best is None:
        smallest = candidate_tiles(max(size), grid, halo)[:1] or [grid]
        need = fp.peak(max(_crop_areas(size, smallest[0], grid, halo)))
        raise UserError(f"even tiles of {smallest[0]} px need ~{need / MIB:,.0f} MiB per evaluation and the budget is "
                        f"{room / MIB:,.0f} MiB; fix: free memory, raise image.memory_mib, trainer.precision=bf16-mixed, "
                        "optimizer=adam (less state) or a smaller image.size")
    return best[1]


def plan_targets(setting: int | str | None, shapes: Sequence[tuple[int, int]], layers: Sequence[str],
                 bytes_per_pixel: float, room: int | None) -> int | None:
    """The tile the targets are computed in (no autograd, so no graph to keep): ``image.tile`` when it
    is a size; with auto the whole images if the largest fits, else the largest tile whose crops fit."""
    if setting is None or isinstance(setting, int):
        return setting
    largest = max(shapes, key=lambda s: s[0] * s[1])
    if room is None or largest[0] * largest[1] * bytes_per_pixel <= room:
        return None
    grid, halo = reach(layers)
    fitting = [t for t in candidate_tiles(max(largest), grid, halo)
               if max(_crop_areas(largest, t, grid, halo)) * bytes_per_pixel <= room]
    return fitting[-1] if fitting else (candidate_tiles(max(largest), grid, halo)[:1] or [grid])[0]


def stage_plan(cfg: DictConfig, loss: StyleTransferLoss, image: Tensor, bf16: bool, world: int = 1) -> TilePlan:
    """The plan for a stage whose generated image is like ``image``: measured footprint, budget, plan.
    Call it with the plain encoder in ``loss`` (a compiled one would not show what it saves)."""
    setting = tile_setting(cfg)
    size = (image.shape[-2], image.shape[-1])
    if setting is None:
        return TilePlan(None)
    fp = measure(loss, image, bf16)
    room = budget(cfg, image.device, size[0] * size[1])
    keep = cfg.image.get("tile_keep")
    plan = plan_step(setting, None if keep is None else int(keep), size, loss.layers(), fp, room, world)
    if plan.tile is not None and not is_tileable(loss):
        raise UserError(not_tileable_error(f"a {size[1]}x{size[0]} image does not fit the memory budget whole"))
    return plan
