"""The histogram style loss (loss.style_loss=histogram, Risser et al. 2017): each channel's sorted values
against the style's quantiles, zero on the style's own distribution, falling under optimisation, nothing
random (runs repeat), masks, and tiles refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nst_exp
from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.images import load_tensor
from nst_exp.model.histogram import HistogramStyleLoss
from nst_exp.model.losses import build_style_transfer_loss
from nst_exp.model.vgg import build_encoder


def test_histogram_value_and_gradient_are_each_channel_against_its_remapped_self():
    """Risser's loss: || f - R(f) ||^2 with R the histogram remapping of each channel onto the target's;
    its gradient is 2 (f - R(f)) / (N C) (the remapped values held fixed)."""
    torch.manual_seed(0)
    f = torch.randn(1, 5, 6, 7)
    target = torch.sort(torch.randn(1, 5, 42) * 2 + 1, dim=-1).values
    loss = HistogramStyleLoss(target, normalize=False)
    x = f.clone().requires_grad_(True)
    value = loss(x)
    value.backward()
    flat = f.reshape(5, 42)
    remapped = torch.gather(target[0], 1, flat.argsort(1).argsort(1))  # each value -> the target's value at its rank
    assert torch.allclose(value, (flat - remapped).pow(2).mean(), rtol=1e-5)
    assert torch.allclose(x.grad.reshape(5, 42), 2 * (flat - remapped) / flat.numel(), rtol=1e-4, atol=1e-7)


def test_histogram_is_zero_on_any_rearrangement_of_the_style_features():
    torch.manual_seed(1)
    style = torch.rand(1, 4, 8, 8)
    loss = HistogramStyleLoss(HistogramStyleLoss.stats(style)[0])  # the style's sorted channels: its quantiles at 64 levels
    shuffled = style.flatten(2)[..., torch.randperm(64)].reshape(1, 4, 8, 8)  # same values per channel, other places
    assert loss(shuffled).item() == 0.0
    assert loss(style.flip(-1) * 1.1).item() > 1e-4


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(["relu1_1", "relu2_1", "relu4_2"])


def _loss(encoder, styles=None, mask=None, tile=None):
    cfg = compose_config(["loss.style_loss=histogram", "loss.content_layers=[relu4_2]", "loss.style_layers=[relu1_1,relu2_1]"])
    content = load_tensor("builtin:chelsea.png", 48)
    styles = styles or [load_tensor("builtin:starry_night.jpg", 48)]
    from nst_exp.tiling.targets import TargetTiles

    loss, _ = build_style_transfer_loss(
        cfg.loss, encoder, content, styles, [1.0] * len(styles), mask, tiles=TargetTiles(tile) if tile else None
    )
    return loss, content


def test_histogram_style_scores_near_zero_on_the_style_and_falls_under_optimisation(encoder):
    loss, content = _loss(encoder)
    style = load_tensor("builtin:starry_night.jpg", 48)
    feats = encoder(style, ["relu1_1"])["relu1_1"]
    assert loss.style_losses["relu1_1"](feats) < 1e-3 * loss.style_losses["relu1_1"](encoder(content, ["relu1_1"])["relu1_1"])
    image = content.clone().requires_grad_(True)
    opt = torch.optim.Adam([image], lr=0.02)
    first = None
    for _ in range(8):
        opt.zero_grad()
        style_loss = loss(image)["loss/style"]
        first = style_loss.item() if first is None else first
        style_loss.backward()
        opt.step()
    assert loss(image)["loss/style"].item() < 0.7 * first


def test_histogram_targets_repeat_and_masks_pick_positions(encoder):
    a, content = _loss(encoder)
    b, _ = _loss(encoder)
    for layer in ("relu1_1", "relu2_1"):
        assert torch.equal(a.style_losses[layer].target, b.style_losses[layer].target)
        assert torch.all(a.style_losses[layer].target.diff(dim=-1) >= 0)  # a quantile function per channel
    h, w = content.shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    mask[..., :, : w // 2] = 1.0
    masked, _ = _loss(encoder, mask=mask)
    image = content.clone()
    base = masked(image)["loss/style/relu1_1"]
    image[..., :, 30:] = torch.rand_like(image[..., :, 30:])  # outside the mask (beyond relu1_1's reach)
    assert torch.equal(masked(image)["loss/style/relu1_1"], base)


def test_histogram_refuses_tiles_in_one_line(encoder):
    from nst_exp.config import validate

    with pytest.raises(UserError, match=r"^loss.style_loss=histogram sorts every position.*image.tile=32 asks for tiles; fix: "):
        validate(compose_config(["loss.style_loss=histogram", "image.tile=32", "image.size=64"]))
    with pytest.raises(ValueError, match=r"^loss.style_loss=histogram sorts every position.*tiles of 32 px; fix: "):
        _loss(encoder, tile=32)  # model/ raises a plain exception; the entry points make it one line
    # image.tile=auto (the default) when the image does not fit the budget whole: the plan's refusal names the loss
    from nst_exp.model.losses import untileable_kind

    assert untileable_kind(_loss(encoder)[0]) == "histogram"
    layers = ["loss.content_layers=[relu4_2]", "loss.style_layers=[relu1_1,relu2_1]"]
    gram, _ = build_style_transfer_loss(
        compose_config(layers).loss,
        encoder,
        load_tensor("builtin:chelsea.png", 32),
        [load_tensor("builtin:starry_night.jpg", 32)],
        [1.0],
        None,
    )
    assert untileable_kind(gram) is None


def test_histogram_run_repeats_exactly(tmp_path):
    base = ["loss.style_loss=histogram", "image.size=32", "trainer.max_steps=3", "logging.progress_bar=false", "logging.image_every=0"]
    a = nst_exp.stylize(output_dir=tmp_path / "a", overrides=base, return_result=True)
    b = nst_exp.stylize(output_dir=tmp_path / "b", overrides=base, return_result=True)
    assert a.status == b.status == "completed"
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
