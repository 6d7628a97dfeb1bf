"""The sliced Wasserstein style loss (loss.style_loss=swd): its maths against a direct computation,
directions that repeat with the seed, blends, masks, and tiles refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.images import load_tensor
from nst_exp.model.losses import SlicedWassersteinStyleLoss, build_style_transfer_loss
from nst_exp.model.vgg import build_encoder


def direct_swd(features: torch.Tensor, projections: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The squared sliced W2 written out: every position's projection against the target value of its rank."""
    b, c, h, w = features.shape
    x = features.reshape(c, h * w).T @ projections  # (N, K)
    ranks = x.argsort(dim=0).argsort(dim=0)  # the rank of each position along each direction
    matched = torch.gather(target[0].T, 0, ranks)  # (N, K): the target's value at that rank
    return (x - matched).pow(2).mean()


def test_swd_value_and_gradient_are_the_direct_sorted_computation():
    torch.manual_seed(0)
    f = torch.randn(1, 6, 5, 7, dtype=torch.float32)
    p = SlicedWassersteinStyleLoss.directions(6, 9, seed=3)
    target = torch.sort(torch.randn(1, 9, 35), dim=-1).values
    loss = SlicedWassersteinStyleLoss(target, p, normalize=False)
    loss.QUANTILES = 35
    x = f.clone().requires_grad_(True)
    ours = loss(x)
    ours.backward()
    y = f.clone().requires_grad_(True)
    direct = direct_swd(y, p, target)
    direct.backward()
    assert torch.allclose(ours, direct, rtol=1e-5)
    assert torch.allclose(x.grad, y.grad, rtol=1e-4, atol=1e-7)
    # and by hand: dL/df = 2/(N K) (x - t[rank]) P^T
    xs = f.reshape(6, 35).T @ p
    matched = torch.gather(target[0].T, 0, xs.argsort(0).argsort(0))
    by_hand = (2 / xs.numel() * (xs - matched) @ p.T).T.reshape(1, 6, 5, 7)
    assert torch.allclose(x.grad, by_hand, rtol=1e-4, atol=1e-7)


def test_swd_directions_are_unit_and_repeat_with_the_seed():
    p = SlicedWassersteinStyleLoss.directions(8, 20, seed=5)
    assert p.shape == (8, 20) and torch.allclose(p.norm(dim=0), torch.ones(20), atol=1e-5)
    assert torch.allclose(p[:, :8].T @ p[:, :8], torch.eye(8), atol=1e-5)  # each block is an orthonormal basis
    assert torch.equal(p, SlicedWassersteinStyleLoss.directions(8, 20, seed=5))
    assert not torch.allclose(p, SlicedWassersteinStyleLoss.directions(8, 20, seed=6))


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(["relu1_1", "relu2_1", "relu4_2"])


def _loss(encoder, seed=0, styles=None, weights=None, mask=None, **overrides):
    cfg = compose_config(
        [
            "loss.style_loss=swd",
            "loss.content_layers=[relu4_2]",
            "loss.style_layers=[relu1_1,relu2_1]",
            *[f"{k}={v}" for k, v in overrides.items()],
        ]
    )
    content = load_tensor("builtin:chelsea.png", 48)
    styles = styles or [load_tensor("builtin:starry_night.jpg", 48)]
    loss, _ = build_style_transfer_loss(cfg.loss, encoder, content, styles, weights or [1.0] * len(styles), mask, seed=seed)
    return loss, content


def test_swd_runs_repeat_with_the_seed_and_the_style_itself_scores_near_zero(encoder):
    a, content = _loss(encoder, seed=0)
    b, _ = _loss(encoder, seed=0)
    c, _ = _loss(encoder, seed=1)
    pa, pb, pc = (x.style_losses["relu1_1"].projections for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(a(content)["loss/style"], b(content)["loss/style"])
    style = load_tensor("builtin:starry_night.jpg", 48)
    on_style = a.style_losses["relu1_1"](encoder(style, ["relu1_1"])["relu1_1"])
    on_content = a.style_losses["relu1_1"](encoder(content, ["relu1_1"])["relu1_1"])
    assert on_style < 1e-3 * on_content  # only the resampling of the quantile function apart


def test_swd_blend_is_the_average_quantile_function(encoder):
    s1, s2 = load_tensor("builtin:starry_night.jpg", 48), load_tensor("builtin:hubble_deep_field.jpg", 48)
    one, _ = _loss(encoder, styles=[s1])
    two, _ = _loss(encoder, styles=[s2])
    both, _ = _loss(encoder, styles=[s1, s2], weights=[0.25, 0.75])
    for layer in ("relu1_1", "relu2_1"):
        expected = 0.25 * one.style_losses[layer].target + 0.75 * two.style_losses[layer].target
        assert torch.allclose(both.style_losses[layer].target, expected, atol=1e-5)
        assert torch.all(both.style_losses[layer].target.diff(dim=-1) >= 0)  # still a quantile function


def test_swd_with_a_mask_matches_the_masked_positions_only(encoder):
    h, w = load_tensor("builtin:chelsea.png", 48).shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    mask[..., :, : w // 2] = 1.0  # the left half
    loss, content = _loss(encoder, mask=mask)
    keep = loss.keep_relu1_1
    assert keep.numel() == h * w // 2 and bool((keep % w < w // 2).all())
    image = content.clone()
    base = loss(image)["loss/style/relu1_1"]
    image[..., :, 30:] = torch.rand_like(image[..., :, 30:])  # outside the mask (beyond relu1_1's 1-px reach)
    assert torch.equal(loss(image)["loss/style/relu1_1"], base)
    image[..., :, :10] = torch.rand_like(image[..., :, :10])  # inside it
    assert not torch.equal(loss(image)["loss/style/relu1_1"], base)


def test_swd_refuses_a_tile_in_one_line(tmp_path):
    with pytest.raises(UserError, match="swd sorts every position.*fix: "):
        from nst_exp.config import validate

        validate(compose_config(["loss.style_loss=swd", "image.tile=64", "image.size=128"]))
    proc = run_cli(
        ["run", "loss.style_loss=swd", "image.size=64", "image.memory_mib=1", "trainer.max_steps=2", "logging.progress_bar=false"], tmp_path
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "loss.style_loss=swd" in lines[0] and "fix:" in lines[0], proc.stderr


def test_swd_layer_projections_set_each_layers_direction_count(encoder):
    """loss.swd_layer_projections: directions per channel for each style layer (relu1_1: 64 channels, relu2_1: 128)."""
    loss, content = _loss(encoder, **{"loss.swd_layer_projections": "[0.25,2]"})
    assert loss.style_losses["relu1_1"].projections.shape == (64, 16)
    assert loss.style_losses["relu2_1"].projections.shape == (128, 256)
    assert loss.style_losses["relu2_1"].target.shape[1] == 256  # the style's quantiles along every direction
    same, _ = _loss(encoder, **{"loss.swd_layer_projections": "[1,1]"})
    default, _ = _loss(encoder)  # [] = loss.swd_projections (1.0) on every layer
    for layer in ("relu1_1", "relu2_1"):
        assert torch.equal(same.style_losses[layer].projections, default.style_losses[layer].projections)
    image = content.clone().requires_grad_(True)
    loss(image)["loss/total"].backward()
    assert image.grad is not None and bool(torch.isfinite(image.grad).all()) and float(image.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "value, message",
    [
        ("[1]", "loss.swd_layer_projections has 1 values for 2 loss.style_layers; fix: "),
        ("[1,0]", "loss.swd_layer_projections must be a positive"),
    ],
)
def test_swd_layer_projections_bad_values_are_one_line_errors(value, message):
    from nst_exp.config import validate

    cfg = compose_config(["loss.style_loss=swd", "loss.style_layers=[relu1_1,relu2_1]", f"loss.swd_layer_projections={value}"])
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        validate(cfg)


def test_swd_layer_projections_run_through_the_cli(tmp_path):
    proc = run_cli(
        [
            "run",
            "loss.style_loss=swd",
            "loss.style_layers=[relu1_1,relu2_1,relu3_1,relu4_1]",
            "loss.swd_layer_projections=[0.5,1,1,2]",
            "image.size=48",
            "trainer.max_steps=3",
            "logging.progress_bar=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.rglob("final.png"))
    proc = run_cli(["run", "loss.style_loss=swd", "loss.swd_layer_projections=[1,2]", "image.size=48", "trainer.max_steps=1"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "loss.swd_layer_projections has 2 values for 5" in lines[0], proc.stderr
