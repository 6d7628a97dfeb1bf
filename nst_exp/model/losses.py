"""A loss, whole: pure batch-safe maths, thin modules holding fixed targets, and the target building.

``build_style_transfer_loss`` is where targets come from (colour handling, blending several
style images, masks at each layer's resolution); ``relative_scale`` is the one place the
relative-error normalisation is written.

Every term is a function of a dict of named VGG activations (and the image for TV),
so the terms are called the same way and named the same way in TensorBoard,
summaries and HPARAMS: ``loss/content/relu4_2``, ``loss/style/relu1_1``, ...

Each term is written as a function of *sums over positions* (``stats``) and of how many
positions were summed (``from_stats``): the Gram matrix, the mean and covariance and the content
error are all such sums. So the loss of a large image can be computed tile by tile, exactly
(``tiling/exact.py``), with the same maths as the untiled ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_exp.model import color
from nst_exp.model.histogram import HistogramStyleLoss
from nst_exp.model.layers import map_size
from nst_exp.model.layout import channels_fastest
from nst_exp.model.quantiles import QuantileMatch

_EPS = 1e-8
Region = tuple[slice, slice]  # rows and columns of a layer's map (the positions a tile owns)


def positions_by_channels(features: Tensor) -> Tensor:
    """(B, C, H, W) -> a (B, H*W, C) view, for NCHW and NHWC (channels-last) activations alike.

    Flattening NHWC activations to (B, C, H*W) would copy them, and its backward hands the
    convolutions an NCHW gradient that cuDNN converts back at every layer.
    """
    b, c, h, w = features.shape
    if channels_fastest(features):  # NHWC, or a window of it: copied NHWC, not transposed
        return features.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return features.reshape(b, c, h * w).transpose(1, 2)


class _OuterSum(torch.autograd.Function):
    """sum_p f_p f_p^T, whose backward is one product, (dG + dG^T) f, in the features' own layout.

    Autograd's bmm backward takes two products (one per operand) and returns their sum with one of
    them transposed: an NCHW gradient with NHWC strides, which the ReLU backward and the gradient
    additions then walk element by element (on the CPU much slower than in the features' layout;
    the figures are in docs/performance.md)."""

    @staticmethod
    def forward(ctx: Any, features: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(features)  # the ReLU keeps this very tensor already: no new memory
        flat = positions_by_channels(features)
        return torch.bmm(flat.transpose(1, 2), flat)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (features,) = ctx.saved_tensors
        b, c, h, w = features.shape
        sym = (grad + grad.transpose(1, 2)).to(features.dtype)
        if channels_fastest(features):  # (B, HW, C) rows f_p^T: d = flat @ sym, laid out NHWC
            return torch.bmm(positions_by_channels(features), sym).view(b, h, w, c).permute(0, 3, 1, 2)
        return torch.bmm(sym, features.reshape(b, c, h * w)).view(b, c, h, w)


def outer_sum(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, C): the sum over positions of f f^T."""
    if not features.requires_grad:
        flat = positions_by_channels(features)
        return torch.bmm(flat.transpose(1, 2), flat)
    return _OuterSum.apply(features)


def gram_matrix(features: Tensor) -> Tensor:
    """Normalised Gram matrix: (B, C, H, W) -> (B, C, C), the mean over positions of f f^T."""
    return outer_sum(features) / (features.shape[-2] * features.shape[-1])


def mean_and_covariance(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean (B, C) and covariance (B, C, C) over positions."""
    return mean_cov_from_sums(features.sum(dim=(2, 3)), outer_sum(features), features.shape[-2] * features.shape[-1])


def mean_cov_from_sums(sum_f: Tensor, sum_ff: Tensor, positions: int) -> tuple[Tensor, Tensor]:
    """Mean and covariance from the sums over ``positions`` of f and of f f^T: E[f f^T] - mean mean^T."""
    mean = sum_f / positions
    return mean, sum_ff / positions - mean.unsqueeze(2) * mean.unsqueeze(1)


def relative_scale(target: Tensor, normalize: bool = True) -> Tensor:
    """1 / the target's mean square: a squared error times it is a relative error, independent of the
    layer's activation scale and of the image size. 1 without ``normalize`` (the paper's raw MSE)."""
    scale = 1.0 / (target.float().pow(2).mean() + _EPS) if normalize else torch.tensor(1.0)
    return torch.as_tensor(scale, dtype=torch.float32)


def total_variation(image: Tensor) -> Tensor:
    """Mean squared difference between neighbouring pixels (both directions)."""
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    return dy.pow(2).mean() + dx.pow(2).mean()


_WHOLE: Region = (slice(None), slice(None))


class ContentLoss(nn.Module):
    """MSE between activations and fixed target activations.

    With ``normalize`` the MSE is divided by the target's mean square, so the term is a
    relative error: independent of the layer's activation scale and of the image size.
    """

    def __init__(self, target: Tensor, normalize: bool = True) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())
        self.register_buffer("scale", relative_scale(target, normalize))

    def stats(self, features: Tensor, region: Region = _WHOLE) -> tuple[Tensor, ...]:
        """The summed squared error of ``features``, the activations at ``region`` of the target's map."""
        return ((features.float() - self.target[..., region[0], region[1]]).pow(2).sum(),)

    def from_stats(self, stats: tuple[Tensor, ...], positions: int) -> Tensor:
        return stats[0] / (positions * self.target.shape[0] * self.target.shape[1]) * self.scale

    def forward(self, features: Tensor) -> Tensor:
        return self.from_stats(self.stats(features), features.shape[-2] * features.shape[-1])


class GramStyleLoss(nn.Module):
    """MSE between the Gram matrix of the activations and a fixed target Gram.

    The target is a weighted blend of one Gram per style image. With ``normalize``
    the MSE is divided by the target Gram's mean square (a relative error).
    """

    def __init__(self, target_gram: Tensor, normalize: bool = True) -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())
        self.register_buffer("scale", relative_scale(target_gram, normalize))

    @staticmethod
    def target_from_stats(stats: tuple[Tensor, ...], positions: int) -> Tensor:
        return stats[0] / positions

    @staticmethod
    def stats(features: Tensor, region: Region = _WHOLE) -> tuple[Tensor, ...]:
        """The sum over positions of f f^T (B, C, C)."""
        # No .float() before the product: under bf16 autocast bmm would cast it back (two copies of
        # the activations); it accumulates in fp32 either way.
        return (outer_sum(features).float(),)

    def from_stats(self, stats: tuple[Tensor, ...], positions: int) -> Tensor:
        return F.mse_loss(self.target_from_stats(stats, positions), self.target) * self.scale

    def forward(self, features: Tensor) -> Tensor:
        return self.from_stats(self.stats(features), features.shape[-2] * features.shape[-1])


class MeanCovStyleLoss(nn.Module):
    """Match per-channel means and covariances (crowsonkb's style loss, a stable W2 proxy).

    Gram MSE mixes mean and covariance and over-weights the mean for ReLU features;
    matching both separately gives cleaner textures with fewer colour blotches.
    """

    def __init__(self, target_mean: Tensor, target_cov: Tensor, normalize: bool = True) -> None:
        super().__init__()
        self.register_buffer("target_mean", target_mean.detach().float())
        self.register_buffer("target_cov", target_cov.detach().float())
        self.register_buffer("scale_mean", relative_scale(target_mean, normalize))
        self.register_buffer("scale_cov", relative_scale(target_cov, normalize))

    @staticmethod
    def target_from_stats(stats: tuple[Tensor, ...], positions: int) -> tuple[Tensor, Tensor]:
        return mean_cov_from_sums(stats[0], stats[1], positions)

    @staticmethod
    def stats(features: Tensor, region: Region = _WHOLE) -> tuple[Tensor, ...]:
        """The sums over positions of f (B, C) and of f f^T (B, C, C)."""
        features = features.float()
        return features.sum(dim=(2, 3)), outer_sum(features)

    def from_stats(self, stats: tuple[Tensor, ...], positions: int) -> Tensor:
        mean, cov = self.target_from_stats(stats, positions)
        return F.mse_loss(mean, self.target_mean) * self.scale_mean + F.mse_loss(cov, self.target_cov) * self.scale_cov

    def forward(self, features: Tensor) -> Tensor:
        return self.from_stats(self.stats(features), features.shape[-2] * features.shape[-1])


class SlicedWassersteinStyleLoss(QuantileMatch):
    """Match whole feature distributions along fixed random directions (Heitz et al. 2021, sliced Wasserstein).

    The features (N positions of C channels) are projected on K unit directions, each projection is
    sorted, and the sorted values are compared with the style's quantiles at the same levels: the
    squared 1-D Wasserstein-2 distance per direction. The directions are drawn from ``seed`` so that
    runs repeat: fixed for a run (L-BFGS sees one objective), or redrawn every few steps
    (``loss.swd_redraw_every``, ``redraw``), which approaches the sliced distance over all directions
    instead of along the first draw's only. Targets are quantile functions, so a blend of several
    styles is their weighted average: the 1-D Wasserstein barycenter.

    Sorting is not a sum over positions: this loss cannot be evaluated tile by tile (``tileable``).
    """

    tileable = False
    selects_positions = True  # a mask picks the positions whose distribution is matched

    def __init__(self, target_quantiles: Tensor, projections: Tensor, normalize: bool = True) -> None:
        super().__init__()
        self.register_buffer("target", target_quantiles.detach().float())  # (B, K, Q), ascending
        self.register_buffer("projections", projections.detach().float())  # (C, K), unit columns
        self.register_buffer("scale", relative_scale(target_quantiles, normalize))
        self.seed = 0  # the stream of draw 0 (the directions above); later draws derive theirs from it
        self.draw = 0  # which draw the projections and target are
        self.blend_weights: list[float] = []  # one per kept style image (buffers style_features_<i>), for redraws

    def keep_styles(self, features: Sequence[Tensor], weights: Sequence[float], seed: int) -> None:
        """Keep the style images' features at this layer (B, N, C) and their blend weights, so that ``redraw``
        can compute the targets along new directions; ``seed`` is the stream the projections were drawn from."""
        self.seed = int(seed)
        self.blend_weights = [float(w) for w in weights]
        for i, f in enumerate(features):  # buffers: they move with the module; not in a checkpoint
            self.register_buffer(f"style_features_{i}", positions_by_channels(f).float().contiguous(), persistent=False)

    @staticmethod
    def draw_seed(seed: int, index: int) -> int:
        """The stream of draw ``index`` (0: ``seed`` itself): one per (layer stream, draw), no global RNG."""
        return int(seed) if index == 0 else (int(seed) * 1_000_003 + int(index)) % (1 << 63)

    @torch.no_grad()
    def redraw(self, index: int) -> None:
        """Directions of draw ``index`` and the style's quantiles along them, written in place (a replayed CUDA
        graph reads the same buffers). The scale stays the first draw's: for a whole orthonormal basis the
        projections' mean square does not depend on the basis. Drawn on the CPU (the same on every device)."""
        if index == self.draw:
            return
        if not self.blend_weights:
            raise RuntimeError("redraw needs the style features: call keep_styles when the targets are built")
        channels, count = self.projections.shape
        fresh = self.directions(channels, count, self.draw_seed(self.seed, index))
        if self.projections.is_cuda:
            fresh = fresh.pin_memory()  # an asynchronous copy: the host does not wait for the device
        self.projections.copy_(fresh, non_blocking=True)
        styles = [getattr(self, f"style_features_{i}") for i in range(len(self.blend_weights))]
        target = blend([self.quantiles(self.sort_projected(f, self.projections), self.QUANTILES) for f in styles], self.blend_weights)
        self.target.copy_(target)
        for levels, resampled in self._resampled.items():
            resampled.copy_(self.quantiles(self.target, levels))
        self.draw = index

    @staticmethod
    def directions(channels: int, count: int, seed: int) -> Tensor:
        """``count`` unit directions in R^channels from ``seed``: blocks of random orthonormal bases (a
        block of C directions covers every axis once; more blocks add oblique ones)."""
        gen = torch.Generator().manual_seed(int(seed))
        blocks = []
        for _ in range(-(-count // channels)):
            q, r = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
            blocks.append(q * torch.sign(torch.diagonal(r)))  # a uniformly random rotation
        return torch.cat(blocks, dim=1)[:, :count].float()

    @staticmethod
    def project_sorted(features: Tensor, projections: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, K, N): each direction's projections of the (kept) positions, ascending."""
        flat = positions_by_channels(features).float()  # (B, HW, C)
        if keep is not None:
            flat = flat.index_select(1, keep)
        return SlicedWassersteinStyleLoss.sort_projected(flat, projections)

    @staticmethod
    def sort_projected(flat: Tensor, projections: Tensor) -> Tensor:
        """(B, N, C) positions -> (B, K, N): their projections on each direction, ascending. The product is
        written (B, K, N) contiguous: sorting the rows of a transposed (B, N, K) product is much slower on a CPU."""
        return torch.sort(torch.matmul(projections.T, flat.transpose(1, 2)), dim=-1).values

    def stats(self, features: Tensor, region: Region = _WHOLE, keep: Tensor | None = None) -> tuple[Tensor, ...]:
        """The sorted projections (B, K, N) of the features (not a sum: see ``tileable``)."""
        return (self.project_sorted(features, self.projections, keep),)


STYLE_LOSSES = {"gram": GramStyleLoss, "mean_cov": MeanCovStyleLoss, "swd": SlicedWassersteinStyleLoss, "histogram": HistogramStyleLoss}


def untileable_kind(loss: nn.Module) -> str | None:
    """The ``loss.style_loss`` whose terms are not sums over positions (``tiling/exact.py`` computes only
    those exactly in tiles), or None where every term is."""
    names = {cls: name for name, cls in STYLE_LOSSES.items()}
    terms = getattr(loss, "style_losses", {}).values()
    kinds = sorted({names.get(type(term), type(term).__name__) for term in terms if not getattr(term, "tileable", True)})
    return ",".join(kinds) or None


def not_tileable_error(what: str, kind: str, per_layer: bool = False) -> str:
    """``per_layer``: the kind is one layer's of ``loss.style_layer_losses``, not ``loss.style_loss``'s."""
    setting, other = (
        ("loss.style_layer_losses' " + kind, f"mean_cov in place of {kind}")
        if per_layer
        else (f"loss.style_loss={kind}", "loss.style_loss=mean_cov")
    )
    return (
        f"{setting} sorts every position of a map at once, which tiles cannot do exactly, and {what}; "
        f"fix: a smaller image.size, a larger image.memory_mib, image.tile=null, or {other}"
    )


def mixes_kinds(loss: nn.Module) -> bool:
    """Whether the style layers have losses of more than one kind (``loss.style_layer_losses``)."""
    return len({type(term) for term in getattr(loss, "style_losses", {}).values()}) > 1


def blend(targets: Sequence[Any], weights: Sequence[float]) -> Any:
    """The weighted sum of several style images' targets (tensors, or tuples of tensors)."""
    if isinstance(targets[0], tuple):
        return tuple(sum(w * t[i] for t, w in zip(targets, weights)) for i in range(len(targets[0])))
    return sum(w * t for t, w in zip(targets, weights))


def layer_weights(layers: Sequence[str], weights: Sequence[float] | None, what: str) -> list[float]:
    """Per-layer weights from config; ``None`` or empty means equal weights summing to 1."""
    if not weights:
        return [1.0 / len(layers)] * len(layers) if layers else []
    if len(weights) != len(layers):
        raise ValueError(
            f"loss.{what}_layer_weights has {len(weights)} values for {len(layers)} loss.{what}_layers; "
            f"give one weight per layer or leave it empty for equal weights"
        )
    return [float(w) for w in weights]


class StyleTransferLoss(nn.Module):
    """alpha * content + beta * style + tv_weight * TV, as a dict of named, detachable terms."""

    def __init__(
        self,
        encoder: nn.Module,
        content_losses: Mapping[str, nn.Module],
        style_losses: Mapping[str, nn.Module],
        content_layer_weights: Sequence[float],
        style_layer_weights: Sequence[float],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
        style_masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.masked_layers = tuple(style_masks or ())
        for name, mask in (style_masks or {}).items():
            self.register_buffer(f"mask_{name}", mask, persistent=False)
            if getattr(style_losses[name], "selects_positions", False):
                # A distribution is matched over the masked positions: those at least half as masked as the most.
                keep = torch.nonzero(mask.flatten() >= 0.5 * mask.max()).flatten()
                self.register_buffer(f"keep_{name}", keep, persistent=False)
        self.content_losses = nn.ModuleDict(content_losses)
        self.style_losses = nn.ModuleDict(style_losses)
        self.content_layer_weights = dict(zip(content_losses, content_layer_weights))
        self.style_layer_weights = dict(zip(style_losses, style_layer_weights))
        self.content_weight = content_weight
        self.style_weight = style_weight
        self.tv_weight = tv_weight

    def redraw(self, index: int) -> None:
        """Draw ``index`` of every style term with random directions (``loss.swd_redraw_every``); the others
        have none. Host-side work and in-place writes only: no wait for the device."""
        for loss in self.style_losses.values():
            if hasattr(loss, "redraw"):
                loss.redraw(index)

    def term_names(self) -> list[str]:
        """The names ``forward`` returns, in a fixed order (used to size the history buffer)."""
        return (
            ["loss/total", "loss/content", "loss/style", "loss/tv"]
            + [f"loss/content/{k}" for k in self.content_losses]
            + [f"loss/style/{k}" for k in self.style_losses]
        )

    def layers(self) -> list[str]:
        """The encoder layers the terms read."""
        return list(dict.fromkeys([*self.content_losses, *self.style_losses]))

    def stats(self, features: Mapping[str, Tensor], regions: Mapping[str, Region] | None = None) -> dict[str, tuple[Tensor, ...]]:
        """Each term's sums over the positions of ``features`` (keyed ``content/<layer>``, ``style/<layer>``).
        ``regions``: where in each layer's whole map these activations lie (default: they are the whole map)."""
        out: dict[str, tuple[Tensor, ...]] = {}
        for name, loss in self.content_losses.items():
            out[f"content/{name}"] = loss.stats(features[name], regions[name] if regions else _WHOLE)
        for name, loss in self.style_losses.items():
            feats = features[name]
            if name in self.masked_layers and getattr(loss, "selects_positions", False):
                out[f"style/{name}"] = loss.stats(feats, keep=getattr(self, f"keep_{name}"))
                continue
            if name in self.masked_layers:
                # Gram over masked positions only (see masks_at: m / rms(m) turns the mean into a masked mean).
                region = regions[name] if regions else _WHOLE
                feats = feats * getattr(self, f"mask_{name}")[..., region[0], region[1]]
            out[f"style/{name}"] = loss.stats(feats)
        return out

    def terms(self, stats: Mapping[str, tuple[Tensor, ...]], positions: Mapping[str, int], image: Tensor) -> dict[str, Tensor]:
        """The named terms from the summed statistics (``positions``: how many positions each layer's
        sums cover) and the image (for TV)."""
        terms: dict[str, Tensor] = {}
        zero = image.new_zeros((), dtype=torch.float32)
        content = zero
        for name, loss in self.content_losses.items():
            term = self.content_layer_weights[name] * loss.from_stats(stats[f"content/{name}"], positions[name])
            terms[f"loss/content/{name}"] = term
            content = content + term
        style = zero
        for name, loss in self.style_losses.items():
            term = self.style_layer_weights[name] * loss.from_stats(stats[f"style/{name}"], positions[name])
            terms[f"loss/style/{name}"] = term
            style = style + term
        tv = total_variation(image.float()) if self.tv_weight else zero
        total = self.content_weight * content + self.style_weight * style + self.tv_weight * tv
        return {"loss/total": total, "loss/content": content, "loss/style": style, "loss/tv": tv, **terms}

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        features = self.encoder(image)
        positions = {name: f.shape[-2] * f.shape[-1] for name, f in features.items()}
        return self.terms(self.stats(features), positions, image)


def _as_tuple(value: Any) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def masks_at(mask: Tensor, shapes: Mapping[str, tuple[int, int]]) -> dict[str, Tensor]:
    """The style mask (1, 1, H, W) at each layer's map size, divided by its root mean square: a Gram
    of features times it is then the mean over the masked positions."""
    scaled = {}
    for name, shape in shapes.items():
        m = F.interpolate(mask, size=shape, mode="area")
        scaled[name] = m / m.pow(2).mean().sqrt().clamp_min(_EPS)
    return scaled


def color_targets(content: Tensor, styles: Sequence[Tensor], mode: str) -> tuple[Tensor, list[Tensor]]:
    """Colour preservation on the targets: ``histogram`` recolours the styles to the content's colours;
    ``luminance`` matches on grey (the content becomes its luminance). ``none`` changes nothing."""
    if mode == "histogram":
        return content, [color.match_color_histogram(s, content) for s in styles]
    if mode == "luminance":
        grey = color.luminance(content)
        return grey, [color.match_luminance(color.luminance(s), grey) for s in styles]
    return content, list(styles)


class TileFeatures(Protocol):
    """Target features computed tile by tile (``tiling/targets.TargetTiles``), for inputs of any size."""

    tile: int

    def whole_maps(self, encoder: Any, image: Tensor, layers: Sequence[str]) -> dict[str, Tensor]: ...

    def summed_stats(
        self, encoder: Any, image: Tensor, layers: Sequence[str], stats: Mapping[str, Callable[[Tensor], tuple[Tensor, ...]]]
    ) -> dict[str, tuple[tuple[Tensor, ...], int]]: ...


def style_layer_kinds(loss_cfg: Any) -> dict[str, str]:
    """Each style layer's loss: ``loss.style_layer_losses`` (one per layer) or ``loss.style_loss`` everywhere."""
    per_layer = list(getattr(loss_cfg, "style_layer_losses", None) or [loss_cfg.style_loss] * len(loss_cfg.style_layers))
    return {layer: str(getattr(k, "value", k)) for layer, k in zip(loss_cfg.style_layers, per_layer)}


def build_style_transfer_loss(
    loss_cfg: Any,
    encoder: nn.Module,
    content: Tensor,
    styles: Sequence[Tensor],
    style_weights: Sequence[float],
    mask: Tensor | None = None,
    color_mode: str = "none",
    tiles: TileFeatures | None = None,
    seed: int = 0,
) -> tuple[StyleTransferLoss, Tensor]:
    """The loss of ``loss_cfg`` (the config's ``loss`` node) with its targets, computed once (no grad):
    content activations, the weighted blend of the style images' statistics, the mask at each style
    layer. Returns the loss and the content image as the targets saw it (grey in luminance mode).
    ``seed`` draws the sliced Wasserstein loss's directions (the same for every stage of a run); with
    ``loss.swd_redraw_every`` its terms keep the style features to draw new ones (``StyleTransferLoss.redraw``).
    With ``tiles`` the images run through the encoder tile by tile (``tiling/targets.py``): only the
    content layers' maps are ever whole, the style statistics are summed over the tiles."""
    content, styles = color_targets(content, styles, color_mode)
    normalize = loss_cfg.normalize
    content_layers, style_layers = list(loss_cfg.content_layers), list(loss_cfg.style_layers)
    kinds = style_layer_kinds(loss_cfg)
    classes = {layer: STYLE_LOSSES[kinds[layer]] for layer in style_layers}
    extra: dict[str, tuple[Tensor, ...]] = {}  # per layer, the style loss's fixed arguments after its target
    streams: dict[str, int] = {}  # per layer, the seed of swd's directions
    stats_of: dict[str, Any] = {layer: classes[layer].stats for layer in style_layers}
    untileable = [kinds[layer] for layer in style_layers if not getattr(classes[layer], "tileable", True)]
    if tiles and untileable:
        what = f"the style targets would be computed in tiles of {tiles.tile} px"
        raise ValueError(not_tileable_error(what, untileable[0], per_layer=len(set(kinds.values())) > 1))
    if SlicedWassersteinStyleLoss in classes.values():
        from nst_exp.model.layers import LAYER_INDEX, out_channels

        per_layer = list(getattr(loss_cfg, "swd_layer_projections", None) or [loss_cfg.swd_projections] * len(style_layers))
        for layer, per_channel in zip(style_layers, per_layer):
            if classes[layer] is not SlicedWassersteinStyleLoss:
                continue
            channels = out_channels(layer)
            count = max(1, round(float(per_channel) * channels))
            # One stream per (seed, layer): the same directions in every stage and every repeat of the run.
            streams[layer] = seed * len(LAYER_INDEX) + LAYER_INDEX[layer]
            directions = SlicedWassersteinStyleLoss.directions(channels, count, streams[layer])
            extra[layer] = (directions.to(content.device),)
            stats_of[layer] = lambda f, p=extra[layer][0]: SlicedWassersteinStyleLoss.project_sorted(f, p)
    redraws = bool(streams) and int(getattr(loss_cfg, "swd_redraw_every", 0) or 0) > 0
    with torch.no_grad():
        kept: list[dict[str, Tensor]] = []  # the style features, kept where directions are redrawn
        if tiles:
            content_feats = tiles.whole_maps(encoder, content, content_layers) if content_layers else {}
            style_stats = [tiles.summed_stats(encoder, s, style_layers, stats_of) for s in styles]
        else:
            content_feats = encoder(content, content_layers) if content_layers else {}
            style_stats = []
            for s in styles:
                feats = encoder(s, style_layers)
                style_stats.append({k: (_as_tuple(stats_of[k](f.float())), f.shape[-2] * f.shape[-1]) for k, f in feats.items()})
                kept.append(feats if redraws else {})
        content_losses = {k: ContentLoss(content_feats[k], normalize) for k in content_layers}
        style_losses = {}
        for layer in style_layers:
            target = blend([classes[layer].target_from_stats(*stats[layer]) for stats in style_stats], style_weights)
            args = (*_as_tuple(target), *extra.get(layer, ()))
            style_losses[layer] = classes[layer](*args, normalize)
            if redraws:
                style_losses[layer].keep_styles([feats[layer] for feats in kept], style_weights, streams[layer])
        # The mask applies to the generated image's maps, which have the content image's size.
        masks = (
            masks_at(mask, {k: (map_size(content.shape[-2], k), map_size(content.shape[-1], k)) for k in style_layers})
            if mask is not None
            else {}
        )
    loss = StyleTransferLoss(
        encoder,
        content_losses,
        style_losses,
        layer_weights(loss_cfg.content_layers, loss_cfg.content_layer_weights, "content"),
        layer_weights(loss_cfg.style_layers, loss_cfg.style_layer_weights, "style"),
        loss_cfg.content_weight,
        loss_cfg.style_weight,
        loss_cfg.tv_weight,
        masks,
    )
    return loss, content
