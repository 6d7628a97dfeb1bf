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
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from PIL import Image

from nst_exp.config import ColorMode, flatten, to_container, validate
from nst_exp.errors import UserError
from nst_exp.files import WriteFailed
from nst_exp.evaluate import Evaluator
from nst_exp.images import fit_long_side, tensor_to_pil
from nst_exp.labels import labels_of
from nst_exp.model import color
from nst_exp.run import folder, provenance
from nst_exp.run.callbacks import ImageSnapshots, ScalarFlusher
from nst_exp.run.checkpoint import Checkpointer, check_stages, find_resume_state
from nst_exp.run.folder import FINAL_IMAGE, read_result, write_result
from nst_exp.run.precision import resolve_precision
from nst_exp.run.pruning import PruneCheck, Reporter
from nst_exp.run.logger import RunLogger, log_final_metrics, log_input_images, quiet_lightning, trim_logs
from nst_exp.run.loggers import check_available, make_loggers
from nst_exp.run.metrics import divergence_message, final_metrics, objective
from nst_exp.run.module import StylizeModule
from nst_exp.run.setup import (
    Inputs,
    StageLosses,
    evaluator_compatible,
    finish_image,
    history_pairs,
    initial_image,
    iters_per_step,
    pick_device,
    stage_plan,
    start_tile_group,
    style_size,
    upscale,
)
from nst_exp.run.stages import stages_of
from nst_exp.run.signals import STEP_BOUNDARY_STOPS, JobSignals, StopOnSignal
from nst_exp.run.trainer import Forever, make_trainer
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
    """
    validate(cfg)
    run_dir = Path(run_dir)
    folder.check_target(run_dir, cfg.resume)
    stages = stages_of(cfg)
    resume = find_resume_state(run_dir, cfg.resume, len(stages) - 1, sum(s.steps for s in stages[:-1]))
    check_stages(resume, [s.size for s in stages])
    if resume and resume.stage == len(stages) - 1 and cfg.trainer.max_steps <= resume.stage_step:
        raise UserError(f"resume: the run has done {resume.stage_step} steps at its final size and trainer.max_steps="
                        f"{cfg.trainer.max_steps} is the total; fix: trainer.max_steps={resume.stage_step + 100} "
                        f"(or any number above {resume.stage_step})")
    check_available(cfg.logging.loggers)
    quiet_lightning()
    inputs = Inputs(cfg, content, styles)
    labels = labels_of(cfg, experiment)
    cfg.content.name, cfg.style.name = labels["content"], labels["style"]  # config.yaml and HPARAMS name them too
    device = pick_device(cfg.trainer.accelerator, cfg.trainer.device_index)
    check_history_fits(history_pairs(cfg), math.prod(fit_long_side(inputs.content.size, cfg.image.size)), device)
    pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
    losses = StageLosses(cfg, inputs, device)

    def open_records() -> RunLogger:
        """The run is accepted (every check passed, the first stage's plan made): its folder and records begin."""
        folder.create(run_dir)
        if on_accept is not None:
            on_accept(run_dir)
        try:
            trim_logs(run_dir, resume.logged_step if resume else 0)  # steps from there on are written (again) below
            folder.write_config(run_dir, cfg)
            folder.write_provenance(run_dir, record)
            opened = RunLogger(run_dir, "tensorboard" in cfg.logging.loggers, make_loggers(cfg, run_dir, labels["experiment"]))
            opened.open()
        except WriteFailed as exc:
            raise _continue_hint(exc, run_dir) from None
        return opened

    logger: RunLogger | None = None  # None until the run is accepted: a refused run writes nothing
    record = provenance.collect(cfg, device)
    # The HPARAMS session is written once every auto is decided (the final stage's tile plan), or at the end.
    session = {**flatten(to_container(cfg)), "experiment": labels["experiment"] or "none"}
    session_written = False
    interruptions = list((read_result(run_dir) or {}).get("interruptions") or []) if resume and resume.optimizer else []
    clock_start = time.perf_counter()
    clock = lambda: time.perf_counter() - clock_start
    wall_offset = resume.wall_time_s if resume else 0.0
    step = resume.logged_step if resume else 0
    status, error, image = "completed", None, None
    stop: BaseException | None = None  # a signal's stop (or a foreign SystemExit): re-raised once the folder is saved
    module: StylizeModule | None = None
    signals = JobSignals()
    group = start_tile_group(cfg, device, content, styles)  # trainer.devices > 1: processes sharing the tiles
    bf16 = resolve_precision(cfg.trainer.precision, device).startswith("bf16")
    plans: list[tuple[int, TilePlan]] = []  # each stage's long side and plan, as run
    failure: WriteFailed | None = None  # the first write that failed (a full disk): the run stops, saving what it can
    try:
        signals.install()
        for index, stage in enumerate(stages):
            if resume and index < resume.stage:
                continue
            loss, content_t = losses.build(stage)
            steps, optimizer_state, stage_done, ema_state = stage.steps, None, 0, None
            if resume and index == resume.stage:
                # trainer.max_steps (and each stage's steps) is a total: do what is left of it
                optimizer_state, stage_done = resume.optimizer, resume.stage_step
                ema_state = resume.ema if resume.optimizer is not None else None
                steps = stage.steps - stage_done
            # whole, or tiles that fit (a refusal when nothing fits: before the run is accepted)
            plan = stage_plan(cfg, loss, content_t, bf16, group.world if group else 1) if steps > 0 else None
            if resume and index == resume.stage:
                init = upscale(resume.image.to(device), content_t)
                if cfg.image.color == ColorMode.luminance and resume.optimizer is None:
                    init = color.luminance(init)  # a finished run's final.png carries the content's chroma
            elif module is None:
                logger = logger or open_records()
                log_input_images(logger.experiment, {"source/content": inputs.content_at(stage.size), **{
                    f"source/style_{i}": inputs.style_at(i, style_size(cfg, stage)) for i in range(len(inputs.styles))}})
                init = initial_image(cfg, inputs, content_t, device)
            else:
                init = upscale(module.output_image.to(device), content_t)  # the average goes on, if any
            if plan is None:  # no steps left in this stage
                continue
            logger = logger or open_records()
            losses.for_steps(loss)  # after the plan: it measures the plain encoder
            plans.append((stage.size, plan))
            if index == len(stages) - 1:
                record = provenance.with_tile(record, plan.tile)
                folder.write_provenance(run_dir, record)
                logger.log_session_start({**session, **provenance.hparams(record)})
                session_written = True
            if plan.tile is not None:
                print(f"{_stage_name(index, stages)}: {plan.describe()}", flush=True)
            snapshots = ImageSnapshots(cfg.logging.image_every, run_dir / folder.SNAPSHOT_DIR if cfg.logging.save_snapshots else None)
            callbacks = [
                ScalarFlusher(cfg.logging.flush_every),
                snapshots,
                Checkpointer(run_dir / folder.CHECKPOINT, cfg.trainer.checkpoint_every, index, stage_done, wall_offset, clock,
                             [s.size for s in stages], final_stage=index == len(stages) - 1, before_save=[snapshots.write_pending]),
                *extra_callbacks,
                *([PruneCheck(trial)] if trial is not None else []),  # after the flusher: it reports what was flushed
                StopOnSignal(signals),  # last: the others have seen the batch when it stops training
            ]
            iters = iters_per_step(cfg, device)
            module = StylizeModule(
                init,
                group.loss_pass(index, loss, plan.tile, plan.keep, init.shape) if group else loss_pass(loss, plan.tile, plan.keep, init.shape),
                cfg.optimizer,
                history_rows=cfg.logging.flush_every + iters,
                step_offset=step,
                optimizer_state=optimizer_state,
                iters_per_step=iters,
                cuda_graph=cfg.trainer.cuda_graph,
                ema_decay=cfg.optimizer.ema_decay,
                ema_state=ema_state,
            )
            trainer = make_trainer(cfg, run_dir, logger, steps, callbacks, device, description=_stage_name(index, stages))
            try:
                trainer.fit(module, train_dataloaders=Forever())
            except STEP_BOUNDARY_STOPS as exc:  # SIGTERM/USR2, acted on at a step boundary (checkpoint written)
                status, stop = "interrupted", signals.as_interruption(exc)
                error = f"{stop} at step {module.logged_step}; last.ckpt continues it (a requeued job does so by itself)"
            except SystemExit as exc:
                status = "interrupted"
                if not isinstance(exc.__context__, KeyboardInterrupt):  # Lightning turns Ctrl-C into sys.exit(1)
                    stop = exc  # someone else's exit: not ours to swallow
            except KeyboardInterrupt:
                status = "interrupted"
            except WriteFailed as exc:
                status, failure = "failed", exc
            step += module.global_step
            if trainer.interrupted and status == "completed":
                status = "interrupted"
            if module.diverged_at is not None:
                status, error = "diverged", divergence_message(module.diverged_at)
                module.image.data.copy_(module.last_good)
                module.restart_average()
            pruned_at = next((c.pruned_at for c in callbacks if isinstance(c, PruneCheck)), None)
            if status == "completed" and pruned_at is not None:
                status, error = "pruned", f"pruned by the study's pruner at step {pruned_at}: its loss fell slower than the other trials'"
            if status != "completed":
                break
    except KeyboardInterrupt:
        status = "interrupted"
    except WriteFailed as exc:
        status, failure = "failed", exc
    finally:
        signals.restore()
        if module is not None:
            image = finish_image(cfg, module.output_image, inputs)
            try:
                folder.save_final(run_dir, image, tiff=cfg.logging.save_tiff)
            except WriteFailed as exc:
                status, failure = "failed", failure or exc
        if group is not None:
            group.close()
    if logger is None:  # the records never began: a failed first write, or a stop (Ctrl-C, a signal) before acceptance
        raise failure or stop or KeyboardInterrupt()
    metrics = final_metrics(module.latest_losses if module is not None else {}, wall_offset + clock(), step)
    saved = FINAL_IMAGE if image is not None and (run_dir / FINAL_IMAGE).is_file() else None
    tile_plans = [plan.record(size) for size, plan in plans]
    if not session_written and failure is None:  # stopped before the final stage: the session says what was decided
        try:
            logger.log_session_start({**session, **provenance.hparams(record)})
        except WriteFailed as exc:
            failure = exc
    if failure is not None:
        _record_write_failure(failure, run_dir, logger, saved, metrics, labels, interruptions, tile_plans)
    if stop is not None:
        # The job goes on elsewhere (requeued) or was cancelled: no final metrics, no evaluation (the
        # cluster's grace time is short); the folder says where it stopped, last.ckpt how to go on.
        interruptions.append({"signal": getattr(stop, "signal", type(stop).__name__), "step": step,
                              "wall_time_s": round(metrics["result/wall_time_s"], 1)})
        try:
            logger.close(status)  # no artifacts: the cluster's grace time is short
            write_result(run_dir, status, error, saved, metrics, interruptions=interruptions, labels=labels,
                         tile_plans=tile_plans, provenance=record)
        except WriteFailed as exc:
            _record_write_failure(exc, run_dir, logger, saved, metrics, labels, interruptions, tile_plans)
        raise stop
    # The evaluator runs VGG19 on the whole image at once: not for an image that needed tiles (its
    # result/eval_* and objective stay unset; compare such runs by eye or at a smaller size).
    if image is not None and plans and plans[-1][1].tile is None:
        metrics.update(Evaluator(device, losses.encoder if evaluator_compatible(cfg) else None).score(
            image, inputs.content_at(cfg.image.size), [inputs.style_at(i, cfg.image.size) for i in range(len(inputs.styles))],
            inputs.style_weights).as_metrics())
        metrics["result/objective"] = objective(cfg, metrics)
    try:
        if "result/objective" in metrics:
            logger.experiment.add_image("output/final", image[0].cpu(), step)
        log_final_metrics(logger.experiment, metrics, step)
        logger.log_session_end(completed=status == "completed")
        logger.log_artifacts([run_dir / FINAL_IMAGE, run_dir / folder.FINAL_TIFF, run_dir / folder.SNAPSHOT_DIR])
        logger.close(status)
        write_result(run_dir, status, error, saved, metrics, interruptions=interruptions, labels=labels,
                     tile_plans=tile_plans, provenance=record)
    except WriteFailed as exc:
        _record_write_failure(exc, run_dir, logger, saved, metrics, labels, interruptions, tile_plans)
    if status in folder.FINISHED:  # only once result.json says so: until then last.ckpt continues the run
        (run_dir / folder.CHECKPOINT).unlink(missing_ok=True)
    return RunResult(tensor_to_pil(image) if image is not None else None, status, run_dir, metrics, error)


def _continue_hint(failure: WriteFailed, run_dir: Path) -> WriteFailed:
    """The fix of a failed write: room, then ``resume=`` where the folder can continue, else a new run."""
    resumable = (run_dir / folder.CHECKPOINT).is_file() or (
        (run_dir / FINAL_IMAGE).is_file() and (run_dir / folder.CONFIG_FILE).is_file())
    then = f"resume={run_dir} continues the run" if resumable else "run the command again"
    failure.fix = f"{failure.room()}, then {then}"
    return failure


def _record_write_failure(failure: WriteFailed, run_dir: Path, logger: RunLogger, saved: str | None,
                          metrics: dict[str, float], labels: dict[str, Any], interruptions: list[dict[str, Any]],
                          tile_plans: list[dict[str, Any]]) -> None:
    """After a failed write: close the event file and record the run as failed where the disk still lets
    us (each file is whole, old or new), then raise the failure as one line."""
    _continue_hint(failure, run_dir)
    try:
        logger.close("failed")
    except WriteFailed:
        pass
    try:
        write_result(run_dir, "failed", str(failure), saved, metrics, interruptions=interruptions, labels=labels,
                     tile_plans=tile_plans)
    except WriteFailed:
        pass
    raise failure


def _stage_name(index: int, stages: list[Any]) -> str:
    """How the progress bar and the log name a stage: "stage 2/3, 2000 px", or "512 px" alone."""
    size = stages[index].size
    return f"stage {index + 1}/{len(stages)}, {size} px" if len(stages) > 1 else f"{size} px"
