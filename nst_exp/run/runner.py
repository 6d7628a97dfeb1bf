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
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from PIL import Image

from nst_exp.config import ColorMode, flatten, to_container, validate
from nst_exp.errors import UserError
from nst_exp.evaluate import Evaluator
from nst_exp.images import fit_long_side, tensor_to_pil
from nst_exp.labels import labels_of
from nst_exp.model import color
from nst_exp.run import folder, tile_group
from nst_exp.run.callbacks import ImageSnapshots, ScalarFlusher
from nst_exp.run.checkpoint import Checkpointer, check_stages, find_resume_state
from nst_exp.model.tiled import evaluate_tiled
from nst_exp.run.folder import FINAL_IMAGE, read_result, write_result
from nst_exp.run.memory_fit import check_history_fits
from nst_exp.run.precision import resolve_precision
from nst_exp.run.tile_plan import TilePlan, stage_plan
from nst_exp.run.logger import RunLogger, log_final_metrics, log_input_images, quiet_lightning
from nst_exp.run.metrics import divergence_message, final_metrics, objective
from nst_exp.run.module import StylizeModule
from nst_exp.run.setup import (
    Inputs,
    build_loss,
    build_network,
    evaluator_compatible,
    finish_image,
    initial_image,
    iters_per_step,
    pick_device,
    style_size,
    upscale,
)
from nst_exp.run.stages import stages_of
from nst_exp.run.signals import STEP_BOUNDARY_STOPS, JobSignals, StopOnSignal
from nst_exp.run.tb_hparams import write_session_end, write_session_start
from nst_exp.run.trainer import Forever, make_trainer


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
) -> RunResult:
    """Run one style transfer into ``run_dir``. Raises UserError for bad input (before any work).

    ``extra_callbacks`` join every stage's Trainer (the benchmark times steps with one);
    ``experiment`` labels the run (default: the Hydra job's ``experiment=`` choice).
    A SIGTERM (or submitit's SIGUSR2) stops the run at the next step boundary: the folder is
    saved (last.ckpt, final.png, result.json "interrupted") and ``JobInterrupted`` is raised.
    """
    validate(cfg)
    run_dir = folder.prepare(Path(run_dir), cfg.resume)
    stages = stages_of(cfg)
    resume = find_resume_state(run_dir, cfg.resume, len(stages) - 1, sum(s.steps for s in stages[:-1]))
    check_stages(resume, [s.size for s in stages])
    if resume and resume.stage == len(stages) - 1 and cfg.trainer.max_steps <= resume.stage_step:
        raise UserError(f"resume: the run has done {resume.stage_step} steps at its final size and trainer.max_steps="
                        f"{cfg.trainer.max_steps} is the total; fix: trainer.max_steps={resume.stage_step + 100} "
                        f"(or any number above {resume.stage_step})")
    quiet_lightning()
    inputs = Inputs(cfg, content, styles)
    labels = labels_of(cfg, experiment)
    cfg.content.name, cfg.style.name = labels["content"], labels["style"]  # config.yaml and HPARAMS name them too
    device = pick_device(cfg.trainer.accelerator, cfg.trainer.device_index)
    check_history_fits(cfg, math.prod(fit_long_side(inputs.content.size, cfg.image.size)), device)
    pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
    encoder, step_encoder = build_network(cfg, device)
    folder.write_config(run_dir, cfg)

    logger = RunLogger(run_dir)
    write_session_start(logger.experiment, {**flatten(to_container(cfg)), "experiment": labels["experiment"] or "none"})
    interruptions = list((read_result(run_dir) or {}).get("interruptions") or []) if resume and resume.optimizer else []
    clock_start = time.perf_counter()
    clock = lambda: time.perf_counter() - clock_start  # noqa: E731
    wall_offset = resume.wall_time_s if resume else 0.0
    step = resume.logged_step if resume else 0
    status, error, image = "completed", None, None
    stop: BaseException | None = None  # a signal's stop (or a foreign SystemExit): re-raised once the folder is saved
    module: StylizeModule | None = None
    signals = JobSignals()
    group = tile_group.start(cfg, device, content, styles)  # trainer.devices > 1: processes sharing the tiles
    bf16 = resolve_precision(cfg.trainer.precision, device).startswith("bf16")
    plans: list[tuple[int, TilePlan]] = []  # each stage's long side and plan, as run
    try:
        signals.install()
        for index, stage in enumerate(stages):
            if resume and index < resume.stage:
                continue
            encoder.to(device)  # Lightning's teardown moved the previous stage's module (and encoder) to the CPU
            loss, content_t = build_loss(cfg, encoder, inputs, stage, device)
            steps, optimizer_state, stage_done, ema_state = stage.steps, None, 0, None
            if resume and index == resume.stage:
                init = upscale(resume.image.to(device), content_t)
                if cfg.image.color == ColorMode.luminance and resume.optimizer is None:
                    init = color.luminance(init)  # a finished run's final.png carries the content's chroma
                # trainer.max_steps (and each stage's steps) is a total: do what is left of it
                optimizer_state, stage_done = resume.optimizer, resume.stage_step
                ema_state = resume.ema if resume.optimizer is not None else None
                steps = stage.steps - stage_done
            elif module is None:
                log_input_images(logger.experiment, {"input/content": inputs.content_at(stage.size), **{
                    f"input/style_{i}": inputs.style_at(i, style_size(cfg, stage)) for i in range(len(inputs.styles))}})
                init = initial_image(cfg, inputs, content_t, device)
            else:
                init = upscale(module.output_image.to(device), content_t)  # the average goes on, if any
            if steps <= 0:
                continue
            plan = stage_plan(cfg, loss, content_t, bf16, group.world if group else 1)  # whole, or tiles that fit
            loss.encoder = step_encoder  # after the plan: it measures the plain encoder
            plans.append((stage.size, plan))
            if plan.tile is not None:
                print(f"{_stage_name(index, stages)}: {plan.describe()}", flush=True)
            callbacks = [
                ScalarFlusher(cfg.logging.flush_every),
                ImageSnapshots(cfg.logging.image_every, run_dir / folder.SNAPSHOT_DIR if cfg.logging.save_snapshots else None),
                Checkpointer(run_dir / folder.CHECKPOINT, cfg.trainer.checkpoint_every, index, stage_done, wall_offset, clock,
                             [s.size for s in stages]),
                *extra_callbacks,
                StopOnSignal(signals),  # last: the others have seen the batch when it stops training
            ]
            iters = iters_per_step(cfg, device)
            module = StylizeModule(
                init, loss, cfg.optimizer,
                history_rows=cfg.logging.flush_every + iters,
                step_offset=step,
                optimizer_state=optimizer_state,
                iters_per_step=iters,
                cuda_graph=cfg.trainer.cuda_graph,
                tile=plan.tile,
                tile_keep=plan.keep,
                evaluate_tiles=group.evaluator(index) if group else evaluate_tiled,
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
            step += module.global_step
            if trainer.interrupted and status == "completed":
                status = "interrupted"
            if module.diverged_at is not None:
                status, error = "diverged", divergence_message(module.diverged_at)
                module.image.data.copy_(module.last_good)
                module.restart_average()
            if status != "completed":
                break
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        signals.restore()
        if module is not None:
            image = finish_image(cfg, module.output_image, inputs)
            folder.save_final(run_dir, image, tiff=cfg.logging.save_tiff)
        if group is not None:
            group.close()
    if status == "completed":
        (run_dir / folder.CHECKPOINT).unlink(missing_ok=True)
    metrics = final_metrics(module.latest_losses if module is not None else {}, wall_offset + clock(), step)
    saved = FINAL_IMAGE if image is not None else None
    tile_plans = [plan.record(size) for size, plan in plans]
    if stop is not None:
        # The job goes on elsewhere (requeued) or was cancelled: no final metrics, no evaluation (the
        # cluster's grace time is short); the folder says where it stopped, last.ckpt how to go on.
        interruptions.append({"signal": getattr(stop, "signal", type(stop).__name__), "step": step,
                              "wall_time_s": round(metrics["hp/wall_time_s"], 1)})
        logger.close(status)
        write_result(run_dir, status, error, saved, metrics, interruptions=interruptions, labels=labels,
                     tile_plans=tile_plans)
        raise stop
    # The evaluator runs VGG19 on the whole image at once: not for an image that needed tiles (its
    # hp/eval_* and objective stay unset; compare such runs by eye or at a smaller size).
    if image is not None and plans and plans[-1][1].tile is None:
        metrics.update(Evaluator(device, encoder if evaluator_compatible(cfg) else None).score(
            image, inputs.content_at(cfg.image.size), [inputs.style_at(i, cfg.image.size) for i in range(len(inputs.styles))],
            inputs.style_weights).as_metrics())
        metrics["hp/objective"] = objective(cfg, metrics)
        logger.experiment.add_image("image/final", image[0].cpu(), step)
    log_final_metrics(logger.experiment, metrics, step)
    write_session_end(logger.experiment, completed=status == "completed")
    logger.close("success" if status == "completed" else status)
    write_result(run_dir, status, error, saved, metrics, interruptions=interruptions, labels=labels,
                 tile_plans=tile_plans)
    return RunResult(tensor_to_pil(image) if image is not None else None, status, run_dir, metrics, error)


def _stage_name(index: int, stages: list[Any]) -> str:
    """How the progress bar and the log name a stage: "stage 2/3, 2000 px", or "512 px" alone."""
    size = stages[index].size
    return f"stage {index + 1}/{len(stages)}, {size} px" if len(stages) > 1 else f"{size} px"
