"""Lightning callbacks, each on its own: when to flush the losses, the progress bar, image snapshots.

None of them holds a result the runner reads, and none refers to another (the checkpointer is in
``run.checkpoint``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from nst_exp.images import save_png
from nst_exp.run.module import HostCopy, StylizeModule


class ScalarFlusher(pl.Callback):
    """When the module writes its buffered per-step losses: every ``every`` steps without waiting for
    the device, and everything at the end of training and on an exception (Ctrl-C)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: StylizeModule, *args: Any) -> None:
        if trainer.global_step - pl_module.history_start >= self.every:
            pl_module.flush_losses(wait=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: StylizeModule) -> None:
        pl_module.flush_losses()

    def on_exception(self, trainer: pl.Trainer, pl_module: StylizeModule, exception: BaseException) -> None:
        pl_module.flush_losses()


class LossProgressBar(TQDMProgressBar):
    """One bar per stage counting optimiser steps (``320 px: 40/200``), redrawn once per flush with the
    loss the module wrote last; Lightning's "Training"/"Epoch 0" bars do not fit a run of steps.

    The loss is a host float passed straight to the bar: ``self.log(..., prog_bar=True)`` would
    copy it to the device and read it back at every redraw, two waits for the GPU per flush.
    """

    def __init__(self, every: int, description: str, steps: int) -> None:
        super().__init__(refresh_rate=every)
        self.description = description
        self.steps = steps

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.description,
            total=self.steps,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, *_: Any) -> None:
        pass  # one endless epoch: no "Epoch 0" bar

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: StylizeModule, *args: Any) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if not bar.disable and (crossed(step, pl_module.iters_per_step, self.refresh_rate) or step >= self.steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def on_train_epoch_end(self, *_: Any) -> None:
        pass

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.train_progress_bar.close()  # what is printed next starts on its own line

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run folder names the run
        latest = getattr(pl_module, "latest_losses", None)
        if latest:
            metrics["loss"] = f"{latest['loss/total']:.4g}"
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
        if crossed(pl_module.logged_step, pl_module.iters_per_step, self.every):  # on the run's steps: a resumed run keeps the schedule
            # The one copy (the image moves on); clamping waits for the host side.
            self._pending.append((pl_module.logged_step, HostCopy(pl_module.output_image[0])))

    def on_train_end(self, trainer: pl.Trainer, pl_module: StylizeModule) -> None:
        self.write_pending(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: StylizeModule, exception: BaseException) -> None:
        self.write_pending(trainer)

    def write_pending(self, trainer: pl.Trainer) -> None:
        for step, copy in self._pending:
            image = copy.get().float()
            if not bool(image.isfinite().all()):  # a diverged step (on the host copy: no wait for the device)
                continue  # the run ends "diverged" on its last good image; a NaN snapshot would be a flat PNG
            image = image.clamp(0, 1)
            trainer.logger.experiment.add_image("output/generated", image, step)
            if self.snapshot_dir is not None:
                save_png(image, self.snapshot_dir / f"step_{step:06d}.png", "snapshot")
        self._pending.clear()


def crossed(step: int, advanced: int, every: int) -> bool:
    """Did the last batch (``advanced`` steps up to ``step``) pass a multiple of ``every``?"""
    return bool(every) and step // every > max(0, step - advanced) // every
