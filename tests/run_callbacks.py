"""Lightning callbacks the resume tests share: a Ctrl-C at a given step, and the run's final image."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class StopAt(pl.Callback):
    """Ctrl-C at a given logged step (the run's checkpointer writes last.ckpt on it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.logged_step == self.step:
            raise KeyboardInterrupt


class Final(pl.Callback):
    """The image the run ends on (its average where iterates are averaged), as a float tensor."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.image = pl_module.output_image.clone()
