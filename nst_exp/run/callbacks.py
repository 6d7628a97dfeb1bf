"""Lightning callbacks: buffered per-step scalars, image snapshots, HPARAMS, divergence stop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import Tensor

from nst_exp.images import save_png
from nst_exp.run.module import StylizeModule
from nst_exp.run.folder import HPARAM_METRICS


def writer_of(trainer: pl.Trainer) -> Any:
    """The TensorBoard SummaryWriter behind the trainer's logger."""
    return trainer.logger.experiment  # type: ignore[union-attr]


class HostCopy:
    """A tensor on its way to host memory: from a GPU the copy is only queued, and ``get`` waits for it alone."""

    def __init__(self, source: Tensor) -> None:
        self.ready: torch.cuda.Event | None = None  # None: the copy is complete already
        if source.is_cuda:
            self._value = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self._value.copy_(source, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self._value = source.to("cpu", copy=True)

    def get(self) -> Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self._value


@dataclass
class _Staged:
    """History rows on their way to the host, written at the next flush."""

    rows: HostCopy
    first_step: int
    evaluations: int


class ScalarFlusher(pl.Callback):
    """Copy the module's on-device loss history to TensorBoard every ``every`` steps, without waiting.

    On a GPU each flush starts an asynchronous copy of the rows to pinned host memory and writes
    the rows staged at the previous flush, whose copy finished long ago: the step loop never
    waits for the GPU. On the CPU the rows are written at once. The end of training, an
    exception and every checkpoint (``drain``) write everything.

    Also the run's watchdog: a non-finite total stops training (the module kept the last good image).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.latest: dict[str, float] = {}
        self.diverged_at: int | None = None
        self._staged: _Staged | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: StylizeModule, *args: Any) -> None:
        if trainer.global_step - pl_module.history_start >= self.every:
            self.flush(trainer, pl_module, wait=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: StylizeModule) -> None:
        self.flush(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: StylizeModule, exception: BaseException) -> None:
        self.flush(trainer, pl_module)

    def drain(self, trainer: pl.Trainer, pl_module: StylizeModule) -> None:
        """Every step so far on disk: a checkpoint must never cover steps whose scalars a kill would lose."""
        self.flush(trainer, pl_module)
        writer_of(trainer).flush()

    def flush(self, trainer: pl.Trainer, pl_module: StylizeModule, wait: bool = True) -> None:
        """Write the rows staged last time and stage the new ones; these are written too if ``wait``, or if
        their copy is complete already (a CPU copy: only a GPU copy is worth deferring)."""
        staged = self._stage(trainer, pl_module)
        self._write(trainer, pl_module, self._staged)
        self._staged = staged
        if wait or (staged is not None and staged.rows.ready is None):
            self._write(trainer, pl_module, self._staged)
            self._staged = None

    def _stage(self, trainer: pl.Trainer, pl_module: StylizeModule) -> _Staged | None:
        n = min(trainer.global_step - pl_module.history_start, pl_module.history.shape[0])
        if n <= 0:
            return None
        staged = _Staged(HostCopy(pl_module.history[:n]), pl_module.step_offset + pl_module.history_start,
                         pl_module.evaluations)
        pl_module.history_flushed()  # later steps overwrite the buffer; the copy is ahead of them on the stream
        return staged

    def _write(self, trainer: pl.Trainer, pl_module: StylizeModule, staged: _Staged | None) -> None:
        if staged is None:
            return
        writer = writer_of(trainer)
        names = pl_module.term_names
        rows = staged.rows.get().tolist()
        for i, row in enumerate(rows):
            if self.diverged_at is not None:
                break
            if not math.isfinite(row[0]):
                self.diverged_at = staged.first_step + i
                trainer.should_stop = True
                break
            for name, value in zip(names, row):
                writer.add_scalar(name, value, staged.first_step + i)
            self.latest = dict(zip(names, row))
        writer.add_scalar("perf/evaluations", staged.evaluations, staged.first_step + len(rows) - 1)


class LossProgressBar(TQDMProgressBar):
    """Lightning's bar, redrawn once per flush, showing the loss the flusher wrote last.

    The loss is a host float passed straight to the bar: ``self.log(..., prog_bar=True)`` would
    copy it to the device and read it back at every redraw, two waits for the GPU per flush.
    """

    def __init__(self, flusher: ScalarFlusher) -> None:
        super().__init__(refresh_rate=flusher.every)
        self.flusher = flusher

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run folder names the run
        if self.flusher.latest:
            metrics["loss"] = f"{self.flusher.latest['loss/total']:.4g}"
        return metrics


class ImageSnapshots(pl.Callback):
    """The generated image in TensorBoard every ``every`` steps (and optionally as PNGs).

    The image is copied to the host without waiting and written at the next batch end (or at
    the end of training), when the copy has finished: the step loop never waits for the GPU,
    and the PNG encoding overlaps the steps already queued on it.
    """

    def __init__(self, every: int, snapshot_dir: Path | None = None) -> None:
        self.every = every
        self.snapshot_dir = snapshot_dir
        self._pending: list[tuple[int, HostCopy]] = []  # (logged step, image)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: StylizeModule, *args: Any) -> None:
        self.write_pending(trainer)
        if crossed(trainer.global_step, pl_module.iters_per_step, self.every):
            # The one copy (the image moves on); clamping waits for the host side.
            self._pending.append((pl_module.logged_step, HostCopy(pl_module.image.detach()[0])))

    def on_train_end(self, trainer: pl.Trainer, pl_module: StylizeModule) -> None:
        self.write_pending(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: StylizeModule, exception: BaseException) -> None:
        self.write_pending(trainer)

    def write_pending(self, trainer: pl.Trainer) -> None:
        for step, copy in self._pending:
            image = copy.get().float().clamp(0, 1)
            writer_of(trainer).add_image("image/generated", image, step)
            if self.snapshot_dir is not None:
                save_png(image, self.snapshot_dir / f"step_{step:06d}.png")
        self._pending.clear()


def crossed(step: int, advanced: int, every: int) -> bool:
    """Did the last batch (``advanced`` steps up to ``step``) pass a multiple of ``every``?"""
    return bool(every) and step // every > max(0, step - advanced) // every


def log_hparams_start(logger: Any, hparams: dict[str, Any]) -> None:
    """Declare every HPARAMS metric up front (NaN placeholders); the final values come at the end."""
    logger.log_hyperparams(hparams, {name: float("nan") for name in HPARAM_METRICS})


def log_final_metrics(writer: Any, metrics: dict[str, float], step: int) -> None:
    for name in HPARAM_METRICS:
        writer.add_scalar(name, metrics.get(name, float("nan")), step)
    writer.flush()


def log_input_images(writer: Any, images: dict[str, Tensor]) -> None:
    for tag, image in images.items():
        writer.add_image(tag, image.detach()[0].float().clamp(0, 1).cpu(), 0)


def divergence_message(step: int | None) -> str | None:
    if step is None:
        return None
    return (
        f"the loss became NaN/inf at step {step}; stopped and kept the last good image. "
        "fix: lower optimizer.lr, loss.style_weight or use optimizer.impl=torch optimizer.line_search=strong_wolfe"
    )
