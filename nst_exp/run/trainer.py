"""The Lightning Trainer for one stage: no dataset (an endless batch source bounded by max_steps),
no Lightning checkpoints or loggers of its own, SLURM requeueing left to submitit."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from nst_exp.run.callbacks import LossProgressBar
from nst_exp.run.logger import RunLogger
from nst_exp.settings import Precision


class Forever:
    """An endless batch source: there is no dataset, only optimiser steps (bounded by max_steps)."""

    def __iter__(self):
        while True:
            yield 0


def make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    logger: RunLogger,
    steps: int,
    callbacks: list[pl.Callback],
    device: torch.device,
    precision: Precision,
    description: str = "steps",
) -> pl.Trainer:
    """``precision``: the resolved one (``nst_exp.settings``); ``description`` names the stage on the progress bar (e.g. ``stage 1/2, 128 px``)."""
    plugins = []
    if "SLURM_JOB_ID" in os.environ:
        # submitit owns requeueing (USR2 + max_num_timeout); Lightning must not requeue too.
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    if cfg.logging.progress_bar:
        # Redrawn once per flush: a redraw per step would cost a GPU run noticeably, and the loss it shows changes per flush.
        callbacks = [*callbacks, LossProgressBar(cfg.logging.flush_every, description, steps)]
    return pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="gpu" if device.type == "cuda" else device.type,
        # One device per process: trainer.devices > 1 means processes sharing tiles (tiling/group.py), not Lightning's DDP.
        devices=[device.index or 0] if device.type == "cuda" else 1,
        plugins=plugins,
        precision=precision.value,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.logging.progress_bar,
        log_every_n_steps=max(1, cfg.logging.flush_every),
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(run_dir),
        deterministic=cfg.trainer.deterministic,
        benchmark=device.type == "cuda",
    )
