"""Checkpoints for continuing a run: after pre-emption (requeue), Ctrl-C, or by hand.

``last.ckpt`` in the run folder holds the stage, the steps done, the image and the optimiser
state (L-BFGS history included), written atomically every ``trainer.checkpoint_every`` steps
and on Ctrl-C. A run that starts in a folder with a ``last.ckpt`` continues from it, so a
job that the cluster requeues into the same folder resumes instead of starting over. A
finished run (no checkpoint, a final.png) continues from its final image with a fresh optimiser.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from nst_exp.errors import UserError
from nst_exp.files import atomic_write
from nst_exp.images import open_image, pil_to_tensor
from nst_exp.run.callbacks import crossed
from nst_exp.run.folder import CHECKPOINT, CONFIG_FILE, FINAL_IMAGE, check_resume_target, read_result
from nst_exp.run.module import StylizeModule
from nst_exp.run.signals import STEP_BOUNDARY_STOPS


@dataclass
class ResumeState:
    stage: int  # index of the stage to continue
    stage_step: int  # steps of that stage already done
    logged_step: int  # the step number on the curves
    wall_time_s: float
    image: Tensor
    optimizer: dict[str, Any] | None  # None: a fresh optimiser (continuing a finished run)
    ema: dict[str, Tensor] | None = None  # the averaged iterates (optimizer.ema_decay), None without
    stage_sizes: list[int] | None = None  # every stage's long side, as the run planned them


FULL_DISK_BYTES = 1 << 20  # free space below which a failed torch.save is taken for a full disk


def save_state(path: Path, state: ResumeState) -> None:
    atomic_write(path, lambda tmp: _torch_save(asdict(state), tmp), "checkpoint")


def _torch_save(obj: Any, tmp: Path) -> None:
    """``torch.save``, with a full disk as the OSError it is: torch's zip writer reports a short write as a
    RuntimeError ("unexpected pos", "iostream error"), which would reach the user as a traceback."""
    try:
        torch.save(obj, tmp)
    except RuntimeError as exc:
        if shutil.disk_usage(tmp.parent).free >= FULL_DISK_BYTES:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc


def check_stages(state: ResumeState | None, sizes: list[int]) -> None:
    """A checkpoint continues the stages it was cut in: the same long sides (a changed image.size or
    schedule would upscale into other stages than the steps done were counted in)."""
    if state is not None and state.optimizer is not None and state.stage_sizes is not None and list(state.stage_sizes) != sizes:
        raise UserError(
            f"the checkpoint's stages are {list(state.stage_sizes)} px and this config makes {sizes} px; fix: "
            "resume with the run's own image.size, image.scale_from and image.multiscale_sizes, or start a new run"
        )


def find_resume_state(run_dir: Path, resume: str | None, last_stage: int, coarse_steps: int = 0) -> ResumeState | None:
    """The state to continue from: ``run_dir/last.ckpt``, else a finished ``resume`` folder's final image.

    A finished run continues its last stage (``coarse_steps`` were spent in the stages before it),
    with a fresh optimiser; its steps so far count towards ``trainer.max_steps``, as a checkpoint's do.
    """
    ckpt = run_dir / CHECKPOINT
    if ckpt.is_file():
        return load_state(ckpt, resume)
    if not resume:
        return None
    src = Path(resume)
    check_resume_target(src)
    final = src / FINAL_IMAGE
    if not final.is_file():
        raise UserError(f"resume={src} holds neither {CHECKPOINT} nor {FINAL_IMAGE}; fix: point resume at a run folder")
    result = read_result(src) or {}
    metrics = result.get("metrics") or {}
    logged = int(metrics.get("result/steps") or 0)
    return ResumeState(
        stage=last_stage,
        stage_step=max(0, logged - coarse_steps),
        logged_step=logged,
        wall_time_s=float(metrics.get("result/wall_time_s") or 0.0),
        image=pil_to_tensor(open_image(final, "resume")),
        optimizer=None,
    )


def load_state(ckpt: Path, resume: str | None) -> ResumeState:
    """``last.ckpt`` as a ResumeState; a torn, damaged or foreign file is one line that says what the
    options really are, and nothing in the folder changes."""
    problem = None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file must not crash the run
        problem = f"it is damaged or not a checkpoint ({type(exc).__name__})"
    else:
        fields = set(ResumeState.__dataclass_fields__)
        if not isinstance(state, dict) or set(state) != fields or not isinstance(state.get("image"), Tensor):
            problem = "it is not a checkpoint of nst_exp (another program's file?)"
    if problem is None:
        return ResumeState(**state)
    run_dir = ckpt.parent
    final = run_dir / FINAL_IMAGE
    if final.is_file():
        steps = (read_result(run_dir) or {}).get("metrics", {}).get("result/steps")
        at = f" (step {int(steps)})" if isinstance(steps, (int, float)) else ""
        continue_from = (
            f"move it away (mv {ckpt} {ckpt}.bad) and resume={run_dir} continues from its saved {FINAL_IMAGE}{at} with a fresh optimiser"
        )
    else:
        continue_from = f"this run has no saved {FINAL_IMAGE} to continue from"
    start_over = "start over in a new folder (the same command without resume= and hydra.run.dir=)"
    raise UserError(f"cannot read the checkpoint {ckpt}: {problem}; fix: {continue_from}, or {start_over}")


class Checkpointer(pl.Callback):
    """Write ``last.ckpt`` every ``every`` steps (0: never periodically), on Ctrl-C and when a signal stops the job.

    Before each write the module puts every step's scalars on disk, so that a job killed
    after the checkpoint and resumed from it has no hole in its curves.
    """

    def __init__(
        self,
        path: Path,
        every: int,
        stage: int,
        stage_step_offset: int,
        wall_offset: float,
        clock: Any,
        stage_sizes: list[int] | None = None,
        final_stage: bool = False,
        before_save: Sequence[Callable[[pl.Trainer], None]] = (),
    ) -> None:
        self.path = path
        self.before_save = before_save  # records due at the checkpoint's step (snapshots): written before it
        self.final_stage = final_stage  # its last step is followed by the run's result, not by more steps
        self.stage_sizes = stage_sizes
        self.every = every
        self.stage = stage
        self.stage_step_offset = stage_step_offset
        self.wall_offset = wall_offset
        self.clock = clock  # () -> seconds since the run started

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: StylizeModule, *args: Any) -> None:
        if self.final_stage and trainer.global_step >= trainer.max_steps:
            # No periodic checkpoint at the run's very last step: a job killed while it evaluates and writes
            # its result then continues from the checkpoint before and does those steps again, where a
            # checkpoint with every step done would leave it nothing to run and no result.
            return
        if crossed(trainer.global_step, pl_module.iters_per_step, self.every):
            self.save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: StylizeModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, *STEP_BOUNDARY_STOPS)):  # Ctrl-C, or SIGTERM/USR2 at a step boundary
            self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: StylizeModule) -> None:
        for write in self.before_save:  # a kill after the checkpoint must not lose what is due at its step
            write(trainer)
        pl_module.drain_losses()
        optimizer = trainer.optimizers[0].state_dict() if trainer.optimizers else None
        save_state(
            self.path,
            ResumeState(
                stage=self.stage,
                stage_step=self.stage_step_offset + trainer.global_step,
                logged_step=pl_module.logged_step,
                wall_time_s=self.wall_offset + self.clock(),
                image=pl_module.image.detach().cpu(),
                optimizer=optimizer,
                ema=pl_module.ema_state(),
                stage_sizes=self.stage_sizes,
            ),
        )


def resumed_config(cfg: Any, overrides: list[str]) -> Any:
    """Continuing by hand: the resumed run's own config.yaml, with this command's ``key=value`` overrides on top."""
    from omegaconf import OmegaConf

    from nst_exp.config import Config

    src = Path(cfg.resume)
    check_resume_target(src)
    saved = src / CONFIG_FILE
    dotted = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0] and not o.startswith(("hydra.", "resume="))]
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved), OmegaConf.from_dotlist(dotted))
    merged.resume = str(src)
    return merged
