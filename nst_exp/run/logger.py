"""The run's logger: TensorBoard in the run folder, kept open across stages, and what goes into it
besides the per-step losses (HPARAMS, input images, final metrics). Also quiets Lightning's chatter."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from nst_exp.run.metrics import HPARAM_METRICS


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`IterableDataset` has `__len__`.*")
    warnings.filterwarnings("ignore", ".*Your `IterableDataset`.*")
    warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", ".*Trying to infer the `batch_size`.*")
    warnings.filterwarnings("ignore", ".*tensorboardX.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")


class RunLogger(TensorBoardLogger):
    """TensorBoard logger writing straight into the run folder, kept open across stages.

    Lightning finalizes (closes) its logger at the end of every ``fit``; a later write would
    open a second event file. Here ``finalize`` only flushes and ``close`` really ends it.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="", default_hp_metric=False)

    def finalize(self, status: str) -> None:
        self.experiment.flush()

    def close(self, status: str) -> None:
        super().finalize(status)


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
