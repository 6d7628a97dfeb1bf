"""One style-transfer run, the stage loop: config -> images -> targets -> Lightning stages -> run folder.

Used by the CLI (``cli/run.py``) and the notebook API (``api.py``) alike. The pieces live beside
it: ``setup`` (inputs, device, network, loss, first image), ``module`` (the optimised image and
its loss history), ``callbacks`` and ``checkpoint``, ``trainer``, ``logger``, ``metrics`` (final
metrics, objective) and ``folder`` (the run folder's files). Whatever happens (finished, Ctrl-C,
NaN, an error), the latest image is saved and ``result.json`` says how the run ended.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from nst_exp.config import ColorMode, flatten, to_container, validate
from nst_exp.errors import UserError
from nst_exp.evaluate import Evaluator
from nst_exp.files import WriteFailed
from nst_exp.images import fit_long_side, tensor_to_pil
from nst_exp.model import color
from nst_exp.run import folder, provenance
from nst_exp.run.callbacks import ImageSnapshots, ScalarFlusher
from nst_exp.run.checkpoint import Checkpointer, ResumeState, check_stages, find_resume_state
from nst_exp.run.folder import FINAL_IMAGE, read_result, write_result
from nst_exp.run.heap import freed_memory_kept
from nst_exp.run.logger import RunLogger, log_final_metrics, log_input_images, quiet_lightning, trim_logs
from nst_exp.run.loggers import check_available, make_loggers
from nst_exp.run.metrics import divergence_message, final_metrics, objective
from nst_exp.run.module import StylizeModule
from nst_exp.run.pruning import PruneCheck, Reporter
from nst_exp.run.setup import (
    Inputs,
    StageLosses,
    evaluator_compatible,
    finish_image,
    history_pairs,
    initial_image,
    pick_device,
    stage_plan,
    start_tile_group,
    style_size,
    upscale,
)
from nst_exp.run.signals import STEP_BOUNDARY_STOPS, JobSignals, StopOnSignal
from nst_exp.run.stages import Stage, stages_of
from nst_exp.run.trainer import Forever, make_trainer
from nst_exp.settings import Settings, resolve
from nst_exp.tiling.exact import loss_pass
from nst_exp.tiling.memory import check_history_fits
from nst_exp.tiling.plan import TilePlan


@dataclass
class RunResult:
    image: Image.Image | None
    status: str  # one of run.folder.STATUSES
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def run(
    cfg: DictConfig,
    run_dir: Path,
    content: Any = None,
    styles: list[Any] | None = None,
    extra_callbacks: tuple[pl.Callback, ...] = (),
    experiment: str | None = None,
    trial: Reporter | None = None,
    on_accept: Callable[[Path], None] | None = None,
) -> RunResult:
    """Run one style transfer into ``run_dir``. Raises UserError for bad input (before any work).

    ``extra_callbacks`` join every stage's Trainer (the benchmark times steps with one);
    ``experiment`` labels the run (default: the Hydra job's ``experiment=`` choice); ``trial`` (an
    Optuna trial's reporter) gets the loss at every flush and may stop the run, which ends "pruned".
    A SIGTERM (or submitit's SIGUSR2) stops the run at the next step boundary: the folder is
    saved (last.ckpt, final.png, result.json "interrupted") and ``JobInterrupted`` is raised.

    A run refused (bad input, a finished run's folder, nothing left to do) writes nothing: every check
    comes before the folder is made, then ``on_accept(run_dir)`` (the CLI moves Hydra's files in).
    A write that fails (a full disk) saves what it can, records the run as failed and raises
    ``WriteFailed``: one line naming the file, and how to continue once there is room.

    The phases: ``check`` (the config, the folder, what a resume continues), ``prepare`` (inputs, device,
    the settings resolved once, the network), then ``_Run``: ``stages`` (each: loss, plan, module, fit)
    and ``finish`` (the final image's evaluation, the records).
    """
    run_dir = Path(run_dir)
    checked = check(cfg, run_dir)
    prepared = prepare(cfg, content, styles, experiment)
    job = _Run(prepared, checked, run_dir, content, styles, extra_callbacks, trial, on_accept)
    job.stages()
    return job.finish()


@dataclass(frozen=True)
class Checked:
    """What ``check`` found: the stages, and the state a resumed run continues from (None: from the start)."""

    stages: list[Stage]
    resume: ResumeState | None


def check(cfg: DictConfig, run_dir: Path) -> Checked:
    """Every check that needs no image: the config's values, the folder, what ``resume=`` continues."""
    validate(cfg)
    folder.check_target(run_dir, cfg.resume)
    stages = stages_of(cfg)
    resume = find_resume_state(run_dir, cfg.resume, len(stages) - 1, sum(s.steps for s in stages[:-1]))
    check_stages(resume, [s.size for s in stages])
    if resume and resume.stage == len(stages) - 1 and cfg.trainer.max_steps <= resume.stage_step:
        raise UserError(
            f"resume: the run has done {resume.stage_step} steps at its final size and trainer.max_steps="
            f"{cfg.trainer.max_steps} is the total; fix: trainer.max_steps={resume.stage_step + 100} "
            f"(or any number above {resume.stage_step})"
        )
    check_available(cfg.logging.loggers)
    return Checked(stages, resume)


@dataclass(frozen=True)
class Prepared:
    """What every stage shares: the settings (resolved once), the opened inputs, and the frozen network
    each stage's loss is built on."""

    settings: Settings
    inputs: Inputs
    losses: StageLosses


def prepare(cfg: DictConfig, content: Any, styles: list[Any] | None, experiment: str | None) -> Prepared:
    """The inputs opened and checked, the device picked, the settings resolved, the memory checked, the network built."""
    quiet_lightning()
    inputs = Inputs(cfg, content, styles)
    device = pick_device(cfg.trainer.accelerator, cfg.trainer.device_index)
    settings = resolve(cfg, device, experiment)
    check_history_fits(history_pairs(cfg), math.prod(fit_long_side(inputs.content.size, cfg.image.size)), device)
    pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
    return Prepared(settings, inputs, StageLosses(settings, inputs))


class _Run:
    """One accepted (or about to be accepted) run's state across its stages and its end.

    The records begin (``open_records``) once the first stage is planned: a refusal before that writes
    nothing. ``status`` is "completed" until a stage ends otherwise; ``stop`` is a signal's (or a foreign
    SystemExit), re-raised once the folder is saved; ``failure`` the first write that failed.
    """

    def __init__(
        self,
        prepared: Prepared,
        checked: Checked,
        run_dir: Path,
        content: Any,
        styles: list[Any] | None,
        extra_callbacks: tuple[pl.Callback, ...],
        trial: Reporter | None,
        on_accept: Callable[[Path], None] | None,
    ) -> None:
        self.settings, self.inputs = prepared.settings, prepared.inputs
        self.losses = prepared.losses
        self.cfg, self.device = self.settings.cfg, self.settings.device
        self.labels = self.settings.labels.as_dict()
        self.stages_, self.resume = checked.stages, checked.resume
        self.run_dir, self.extra_callbacks, self.trial, self.on_accept = run_dir, extra_callbacks, trial, on_accept
        self.logger: RunLogger | None = None  # None until the run is accepted: a refused run writes nothing
        self.record = {**provenance.collect(self.settings), "inputs": self.inputs.fingerprints()}
        if self.resume:
            check_same_inputs(run_dir, self.record["inputs"])
        # The HPARAMS session is written once every auto is decided (the final stage's tile plan), or at the end.
        # It names the images by their labels (config.yaml keeps what was asked: null means the file stem).
        self.session = {
            **flatten(to_container(self.cfg)),
            "content.name": self.labels["content"] or "none",
            "style.name": self.labels["style"] or "none",
            "experiment": self.labels["experiment"] or "none",
        }
        self.session_written = False
        resume = self.resume
        self.interruptions = list((read_result(run_dir) or {}).get("interruptions") or []) if resume and resume.optimizer else []
        clock_start = time.perf_counter()
        self.clock = lambda: time.perf_counter() - clock_start
        self.wall_offset = resume.wall_time_s if resume else 0.0
        self.step = resume.logged_step if resume else 0
        self.status, self.error, self.image = "completed", None, None
        self.stop: BaseException | None = None
        self.module: StylizeModule | None = None
        self.signals = JobSignals()
        self.group = start_tile_group(self.settings, content, styles)  # trainer.devices > 1: processes sharing the tiles
        self.plans: list[tuple[int, TilePlan]] = []  # each stage's long side and plan, as run
        self.failure: WriteFailed | None = None  # the first write that failed (a full disk): the run stops, saving what it can

    def open_records(self) -> RunLogger:
        """The run is accepted (every check passed, the first stage's plan made): its folder and records begin."""
        folder.create(self.run_dir)
        if self.on_accept is not None:
            self.on_accept(self.run_dir)
        try:
            trim_logs(self.run_dir, self.resume.logged_step if self.resume else 0)  # steps from there on are written (again) below
            folder.write_config(self.run_dir, self.cfg)
            folder.write_provenance(self.run_dir, self.record)
            opened = RunLogger(
                self.run_dir, "tensorboard" in self.cfg.logging.loggers, make_loggers(self.cfg, self.run_dir, self.labels["experiment"])
            )
            opened.open()
        except WriteFailed as exc:
            raise _continue_hint(exc, self.run_dir) from None
        return opened

    def stages(self) -> None:
        """Each stage in turn until one does not complete; the latest image is saved whatever happens."""
        try:
            self.signals.install()
            for index, stage in enumerate(self.stages_):
                if self.resume and index < self.resume.stage:
                    continue
                if not self.stage(index, stage):
                    break
        except KeyboardInterrupt:
            self.status = "interrupted"
        except WriteFailed as exc:
            self.status, self.failure = "failed", exc
        finally:
            self.signals.restore()
            if self.module is not None:
                self.image = finish_image(self.cfg, self.module.output_image, self.inputs)
                try:
                    folder.save_final(self.run_dir, self.image, tiff=self.cfg.logging.save_tiff)
                except WriteFailed as exc:
                    self.status, self.failure = "failed", self.failure or exc
            if self.group is not None:
                self.group.close()

    def stage(self, index: int, stage: Stage) -> bool:
        """One stage: its loss, its plan, its module, its fit. False when the run stops here."""
        cfg, device, resume, stages = self.cfg, self.device, self.resume, self.stages_
        loss, content_t = self.losses.build(stage)
        steps, optimizer_state, stage_done, ema_state = stage.steps, None, 0, None
        if resume and index == resume.stage:
            # trainer.max_steps (and each stage's steps) is a total: do what is left of it
            optimizer_state, stage_done = resume.optimizer, resume.stage_step
            ema_state = resume.ema if resume.optimizer is not None else None
            steps = stage.steps - stage_done
        # whole, or tiles that fit (a refusal when nothing fits: before the run is accepted)
        plan = stage_plan(self.settings, loss, content_t, self.group.world if self.group else 1) if steps > 0 else None
        if resume and index == resume.stage:
            init = upscale(resume.image.to(device), content_t)
            if cfg.image.color == ColorMode.luminance and resume.optimizer is None:
                init = color.luminance(init)  # a finished run's final.png carries the content's chroma
        elif self.module is None:
            self.logger = self.logger or self.open_records()
            log_input_images(
                self.logger.experiment,
                {
                    "source/content": self.inputs.content_at(stage.size),
                    **{f"source/style_{i}": self.inputs.style_at(i, style_size(cfg, stage)) for i in range(len(self.inputs.styles))},
                },
            )
            init = initial_image(cfg, self.inputs, content_t, device)
        else:
            init = upscale(self.module.output_image.to(device), content_t)  # the average goes on, if any
        if plan is None:  # no steps left in this stage
            return True
        self.logger = self.logger or self.open_records()
        self.losses.for_steps(loss)  # after the plan: it measures the plain encoder
        self.plans.append((stage.size, plan))
        final_stage = index == len(stages) - 1
        if final_stage:
            self.record = provenance.with_tile(self.record, plan.tile)
            folder.write_provenance(self.run_dir, self.record)
            self.write_session()
        if plan.tile is not None:
            print(f"{_stage_name(index, stages)}: {plan.describe()}", flush=True)
        if self.settings.resolved.keep_freed_memory and not plan.kept_heap:
            print(
                f"{_stage_name(index, stages)}: trainer.keep_freed_memory is off for these steps: the heap it keeps would not "
                "fit the memory budget",
                flush=True,
            )
        snapshots = ImageSnapshots(cfg.logging.image_every, self.run_dir / folder.SNAPSHOT_DIR if cfg.logging.save_snapshots else None)
        callbacks = [
            ScalarFlusher(cfg.logging.flush_every),
            snapshots,
            Checkpointer(
                self.run_dir / folder.CHECKPOINT,
                cfg.trainer.checkpoint_every,
                index,
                stage_done,
                self.wall_offset,
                self.clock,
                [s.size for s in stages],
                final_stage=final_stage,
                before_save=[snapshots.write_pending],
            ),
            *self.extra_callbacks,
            *([PruneCheck(self.trial)] if self.trial is not None else []),  # after the flusher: it reports what was flushed
            StopOnSignal(self.signals),  # last: the others have seen the batch when it stops training
        ]
        resolved = self.settings.resolved
        self.module = module = StylizeModule(
            init,
            self.group.loss_pass(index, loss, plan.tile, plan.keep, init.shape)
            if self.group
            else loss_pass(loss, plan.tile, plan.keep, init.shape),
            resolved.optimizer,
            history_rows=cfg.logging.flush_every + resolved.iters_per_step,
            step_offset=self.step,
            optimizer_state=optimizer_state,
            iters_per_step=resolved.iters_per_step,
            cuda_graph=resolved.cuda_graph,
            ema_decay=cfg.optimizer.ema_decay,
            ema_state=ema_state,
            redraw_every=int(cfg.loss.swd_redraw_every),  # validate: only with loss.style_loss=swd
            stage_done=stage_done,
        )
        trainer = make_trainer(
            cfg, self.run_dir, self.logger, steps, callbacks, device, resolved.precision, description=_stage_name(index, stages)
        )
        self.fit(trainer, module, plan.kept_heap)
        pruned_at = next((c.pruned_at for c in callbacks if isinstance(c, PruneCheck)), None)
        if self.status == "completed" and pruned_at is not None:
            self.status, self.error = (
                "pruned",
                f"pruned by the study's pruner at step {pruned_at}: its loss fell slower than the other trials'",
            )
        return self.status == "completed"

    def fit(self, trainer: pl.Trainer, module: StylizeModule, kept_heap: bool) -> None:
        """The stage's steps (with ``trainer.keep_freed_memory``'s heap where ``kept_heap``); how they ended (a
        signal, Ctrl-C, a failed write, NaN) becomes the run's status."""
        try:
            with freed_memory_kept(kept_heap):
                trainer.fit(module, train_dataloaders=Forever())
        except STEP_BOUNDARY_STOPS as exc:  # SIGTERM/USR2, acted on at a step boundary (checkpoint written)
            self.status, self.stop = "interrupted", self.signals.as_interruption(exc)
            self.error = f"{self.stop} at step {module.logged_step}; last.ckpt continues it (a requeued job does so by itself)"
        except SystemExit as exc:
            self.status = "interrupted"
            if not isinstance(exc.__context__, KeyboardInterrupt):  # Lightning turns Ctrl-C into sys.exit(1)
                self.stop = exc  # someone else's exit: not ours to swallow
        except KeyboardInterrupt:
            self.status = "interrupted"
        except WriteFailed as exc:
            self.status, self.failure = "failed", exc
        self.step += module.global_step
        if trainer.interrupted and self.status == "completed":
            self.status = "interrupted"
        if module.diverged_at is not None:
            self.status, self.error = "diverged", divergence_message(module.diverged_at)
            module.image.data.copy_(module.last_good)
            module.restart_average()

    def write_session(self) -> None:
        assert self.logger is not None
        self.logger.log_session_start({**self.session, **provenance.hparams(self.record)})
        self.session_written = True

    def finish(self) -> RunResult:
        """After the stages: the records say how the run ended; a signal's stop or a failed write is raised."""
        logger, run_dir, image, status = self.logger, self.run_dir, self.image, self.status
        if logger is None:  # the records never began: a failed first write, or a stop (Ctrl-C, a signal) before acceptance
            raise self.failure or self.stop or KeyboardInterrupt()
        module = self.module
        metrics = final_metrics(module.latest_losses if module is not None else {}, self.wall_offset + self.clock(), self.step)
        saved = FINAL_IMAGE if image is not None and (run_dir / FINAL_IMAGE).is_file() else None
        tile_plans = [plan.record(size) for size, plan in self.plans]
        records = (logger, saved, metrics, tile_plans)
        if not self.session_written and self.failure is None:  # stopped before the final stage: the session says what was decided
            try:
                self.write_session()
            except WriteFailed as exc:
                self.failure = exc
        if self.failure is not None:
            self.record_write_failure(self.failure, *records)
        if self.stop is not None:
            # The job goes on elsewhere (requeued) or was cancelled: no final metrics, no evaluation (the
            # cluster's grace time is short); the folder says where it stopped, last.ckpt how to go on.
            self.interruptions.append(
                {
                    "signal": getattr(self.stop, "signal", type(self.stop).__name__),
                    "step": self.step,
                    "wall_time_s": round(metrics["result/wall_time_s"], 1),
                }
            )
            try:
                logger.close(status)  # no artifacts: the cluster's grace time is short
                self.write_result(saved, metrics, tile_plans)
            except WriteFailed as exc:
                self.record_write_failure(exc, *records)
            raise self.stop
        if image is not None and self.plans and self.plans[-1][1].tile is None:
            metrics.update(self.evaluate(image))
        try:
            if "result/objective" in metrics:
                logger.experiment.add_image("output/final", image[0].cpu(), self.step)
            log_final_metrics(logger.experiment, metrics, self.step)
            logger.log_session_end(completed=status == "completed")
            logger.log_artifacts([run_dir / FINAL_IMAGE, run_dir / folder.FINAL_TIFF, run_dir / folder.SNAPSHOT_DIR])
            logger.close(status)
            self.write_result(saved, metrics, tile_plans)
        except WriteFailed as exc:
            self.record_write_failure(exc, *records)
        if status in folder.FINISHED:  # only once result.json says so: until then last.ckpt continues the run
            (run_dir / folder.CHECKPOINT).unlink(missing_ok=True)
        return RunResult(tensor_to_pil(image) if image is not None else None, status, run_dir, metrics, self.error)

    def write_result(self, saved: str | None, metrics: dict[str, float], tile_plans: list[dict[str, Any]]) -> None:
        """``result.json``: how the run ended, its metrics, labels, interruptions, tile plans and provenance."""
        write_result(
            self.run_dir,
            self.status,
            self.error,
            saved,
            metrics,
            interruptions=self.interruptions,
            labels=self.labels,
            tile_plans=tile_plans,
            provenance=self.record,
        )

    def record_write_failure(
        self, failure: WriteFailed, logger: RunLogger, saved: str | None, metrics: dict[str, float], tile_plans: list[dict[str, Any]]
    ) -> None:
        """After a failed write: close the event file and record the run as failed where the disk still lets
        us (each file is whole, old or new, and result.json as complete as a finished run's), then raise the
        failure as one line."""
        _continue_hint(failure, self.run_dir)
        try:
            logger.close("failed")
        except WriteFailed:
            pass
        self.status, self.error = "failed", str(failure)
        try:
            self.write_result(saved, metrics, tile_plans)
        except WriteFailed:
            pass
        raise failure

    def evaluate(self, image: Tensor) -> dict[str, float]:
        """The fixed evaluator's distances and the sweep objective. It runs VGG19 on the whole image at once:
        not for an image that needed tiles (its result/eval_* and objective stay unset; compare such runs
        by eye or at a smaller size)."""
        cfg, inputs = self.cfg, self.inputs
        scores = (
            Evaluator(self.device, self.losses.encoder if evaluator_compatible(cfg) else None)
            .score(
                image,
                inputs.content_at(cfg.image.size),
                [inputs.style_at(i, cfg.image.size) for i in range(len(inputs.styles))],
                inputs.style_weights,
            )
            .as_metrics()
        )
        return {**scores, "result/objective": objective(cfg, scores)}


def _continue_hint(failure: WriteFailed, run_dir: Path) -> WriteFailed:
    """The fix of a failed write: room, then ``resume=`` where the folder can continue, else a new run."""
    resumable = (run_dir / folder.CHECKPOINT).is_file() or ((run_dir / FINAL_IMAGE).is_file() and (run_dir / folder.CONFIG_FILE).is_file())
    then = f"resume={run_dir} continues the run" if resumable else "run the command again"
    failure.fix = f"{failure.room()}, then {then}"
    return failure


def check_same_inputs(run_dir: Path, now: dict[str, Any]) -> None:
    """A resumed run goes on from the images it began with: a content, style, mask or init image whose pixels
    changed since (``provenance.yaml``'s ``inputs``) is one line, before anything is written. A folder from a
    version that kept no fingerprints is not checked."""
    before = (folder.read_provenance(run_dir) or {}).get("inputs")
    if not isinstance(before, dict):
        return
    changed = [key for key in ("content", "styles", "mask", "init") if key in before and before[key] != now.get(key)]
    if changed:
        what = {"content": "content image", "styles": "style image(s)", "mask": "style mask", "init": "init image"}[changed[0]]
        raise UserError(
            f"resume: the {what} is not the one this run began with (its pixels changed: provenance.yaml's inputs); "
            "fix: restore that file, or start a new run (drop resume=) to use the new one"
        )


def _stage_name(index: int, stages: list[Any]) -> str:
    """How the progress bar and the log name a stage: "stage 2/3, 2000 px", or "512 px" alone."""
    size = stages[index].size
    return f"stage {index + 1}/{len(stages)}, {size} px" if len(stages) > 1 else f"{size} px"
