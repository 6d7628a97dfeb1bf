"""Time to quality: wall time until the tool's image scores as well as pastiche's after N steps."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from nst_exp.bench.clock import sync
from nst_exp.bench.variants import compose_tool_config
from nst_exp.run.callbacks import crossed


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
        self._seen = 0  # the logged step at the last batch end

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = pl_module.logged_step
        if crossed(step, step - self._seen, self.every):  # the batch (perhaps several steps) passed a multiple
            self.take(pl_module)
        self._seen = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.images or self.images[-1][0] != pl_module.logged_step:
            self.take(pl_module)

    def take(self, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)  # the time stamp must not run ahead of the GPU
        self.images.append((pl_module.logged_step, time.perf_counter() - self.t0, pl_module.output_image.clone()))


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
        str(resolve_path(args.content, "content")),
        [str(resolve_path(args.style, "style"))],
        size=args.ttq_size,
        device=device,
        optimizer="lbfgs",
    )
    sync(torch.device(device))
    start = time.perf_counter()
    for _ in range(args.ttq_steps):
        artist.draw()
    sync(torch.device(device))
    return pastiche_rgb(artist.pastiche), time.perf_counter() - start


def ttq_tool(args: argparse.Namespace, device: str) -> list[tuple[int, float, Tensor]]:
    """The tool's run (its defaults at ``--ttq-size``, then ``--ttq-overrides``): (step, seconds, image) copies."""
    from nst_exp.run import runner

    cfg = compose_tool_config(args.ttq_size, device, args.precision, args.ttq_overrides)
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
        args.ttq_size,
        device,
        args.precision,
        args.ttq_steps,
        pastiche_seconds,
        ref.content_distance,
        ref.style_distance,
        points,
        criterion,
        reached,
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
        verdict = (
            f"  the tool never matched both distances ({target}); its content+style first drops below "
            f"pastiche's {t.pastiche_content + t.pastiche_style:.4f} at step {t.reached.step}"
        )
    else:
        return "\n".join(lines + [f"  the tool never reached pastiche's quality ({target}, nor its sum) in this run"])
    speed = f"{1 / t.ratio:.2f}x faster" if t.ratio < 1 else f"{t.ratio:.2f}x slower"
    lines.append(f"{verdict}, {t.reached.seconds:.2f} s after fit start: {t.ratio:.2f}x pastiche's {t.pastiche_seconds:.2f} s ({speed})")
    return "\n".join(lines)
