"""Averaged iterates (optimizer.ema_decay) and automatic scales (image.scale_from): what is saved,
the schedule's sizes, and a checkpoint/resume round trip that ends on the uninterrupted run's image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from run_callbacks import Final, StopAt

from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.run import runner
from nst_exp.run.stages import scale_sizes, stages_of

BASE = ["trainer.accelerator=cpu", "logging.progress_bar=false", "logging.image_every=0", "trainer.precision=32-true"]


def test_scale_schedule_goes_up_by_the_ratio_to_image_size():
    assert scale_sizes(128, math.sqrt(2), 256) == [128, 181]
    assert scale_sizes(128, math.sqrt(2), 320) == [160, 226]
    assert scale_sizes(128, math.sqrt(2), 512) == [128, 181, 256, 362]
    assert scale_sizes(128, 2.0, 100) == []
    cfg = compose_config(["image.size=256", "image.scale_from=128", "image.scale_steps=30", "trainer.max_steps=20"])
    assert [(s.size, s.steps) for s in stages_of(cfg)] == [(128, 30), (181, 30), (256, 20)]


class Iterates(pl.Callback):
    """Every optimiser iterate (after the clamp) and the module's output image, per stage."""

    def __init__(self) -> None:
        self.iterates: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.iterates.append(pl_module.image.detach().clone())
        self.outputs.append(pl_module.output_image.clone())


def test_saved_image_is_the_bias_corrected_average_of_the_iterates(tmp_path):
    decay = 0.8
    cfg = compose_config(
        [*BASE, "image.size=32", "trainer.max_steps=6", "optimizer=adam", "optimizer.lr=0.05", f"optimizer.ema_decay={decay}"]
    )
    seen = Iterates()
    result = runner.run(cfg, tmp_path / "run", extra_callbacks=(seen,))
    assert result.status == "completed"
    total, weight = torch.zeros_like(seen.iterates[0]), 0.0
    for x in seen.iterates:
        total, weight = decay * total + (1 - decay) * x, decay * weight + (1 - decay)
    average = total / weight
    assert torch.allclose(seen.outputs[-1], average, atol=1e-6)
    assert not torch.allclose(average, seen.iterates[-1], atol=1e-3)  # the average is not the last iterate
    saved = torch.from_numpy(np.asarray(result.image, dtype=np.float32) / 255).permute(2, 0, 1)
    assert (saved - average[0]).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("optimizer, stop", [("adam", 3), ("lbfgs", 6)])  # cut in the coarse stage, in the last
def test_checkpoint_resume_of_averaged_scaled_run_ends_on_the_uninterrupted_image(tmp_path, optimizer, stop):
    overrides = [
        *BASE,
        "image.size=64",
        "image.scale_from=32",
        "image.scale_ratio=2",
        "image.scale_steps=4",
        "trainer.max_steps=5",
        f"optimizer={optimizer}",
        "optimizer.ema_decay=0.7",
    ]
    if optimizer == "adam":
        overrides.append("optimizer.lr=0.03")
    whole = Final()
    assert runner.run(compose_config(overrides), tmp_path / "whole", extra_callbacks=(whole,)).status == "completed"
    cut = runner.run(compose_config(overrides), tmp_path / "cut", extra_callbacks=(StopAt(stop),))
    assert cut.status == "interrupted" and (tmp_path / "cut" / "last.ckpt").is_file()
    state = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert state["stage_sizes"] == [32, 64] and state["ema"] is not None
    resumed = Final()
    result = runner.run(compose_config(overrides), tmp_path / "cut", extra_callbacks=(resumed,))
    assert result.status == "completed" and result.metrics["result/steps"] == 9
    assert torch.equal(resumed.image, whole.image)
    assert np.array_equal(np.asarray(result.image), np.asarray(Image_of(tmp_path / "whole")))


def Image_of(run_dir):
    from PIL import Image

    return Image.open(run_dir / "final.png").convert("RGB")


def test_resume_with_another_schedule_is_a_one_line_error(tmp_path):
    overrides = [*BASE, "image.size=64", "image.scale_from=32", "image.scale_ratio=2", "image.scale_steps=3", "trainer.max_steps=3"]
    cut = runner.run(compose_config(overrides), tmp_path / "run", extra_callbacks=(StopAt(2),))
    assert cut.status == "interrupted"
    with pytest.raises(UserError, match="the checkpoint's stages are \\[32, 64\\] px and this config makes \\[64\\] px"):
        runner.run(compose_config([*overrides, "image.scale_from=null"]), tmp_path / "run")
