"""The sliced Wasserstein style loss (loss.style_loss=swd): its maths against a direct computation,
directions that repeat with the seed, blends, masks, and tiles refused in one line."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import one_line_error, run_cli
from run_callbacks import StopAt

from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.images import load_tensor
from nst_exp.model.losses import SlicedWassersteinStyleLoss, build_style_transfer_loss
from nst_exp.model.vgg import build_encoder
from nst_exp.run import runner


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
    line = one_line_error(proc)
    assert "loss.style_loss=swd" in line and "fix:" in line


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
    assert "loss.swd_layer_projections has 2 values for 5" in one_line_error(proc)


def test_swd_redraw_is_the_targets_along_new_directions_and_draw_zero_is_the_fixed_loss(encoder):
    """loss.swd_redraw_every: draw k's directions and targets are what a loss built with them would hold; draw 0 is
    the fixed-direction loss, to the bit, and going back to it restores it."""
    fixed, content = _loss(encoder, seed=2)
    redrawn, _ = _loss(encoder, seed=2, **{"loss.swd_redraw_every": 3})
    term = redrawn.style_losses["relu1_1"]
    first_p, first_t = term.projections.clone(), term.target.clone()
    assert torch.equal(first_p, fixed.style_losses["relu1_1"].projections) and torch.equal(first_t, fixed.style_losses["relu1_1"].target)
    base = redrawn(content)["loss/style"]
    redrawn.redraw(1)
    p1 = term.projections.clone()
    assert not torch.allclose(p1, first_p, atol=1e-3) and torch.allclose(p1.T @ p1, torch.eye(64), atol=1e-5)
    style = load_tensor("builtin:starry_night.jpg", 48)
    flat = encoder(style, ["relu1_1"])["relu1_1"].float()
    expected = SlicedWassersteinStyleLoss.quantiles(
        SlicedWassersteinStyleLoss.project_sorted(flat, p1), SlicedWassersteinStyleLoss.QUANTILES
    )
    assert torch.allclose(term.target, expected, atol=1e-6)
    assert not torch.equal(redrawn(content)["loss/style"], base)
    redrawn.redraw(0)
    assert torch.equal(term.projections, first_p) and torch.equal(term.target, first_t)
    assert torch.equal(redrawn(content)["loss/style"], base)


def test_swd_redraw_of_a_blend_is_the_blend_of_the_redrawn_targets(encoder):
    s1, s2 = load_tensor("builtin:starry_night.jpg", 48), load_tensor("builtin:hubble_deep_field.jpg", 48)
    redraw = {"loss.swd_redraw_every": 1}
    one, _ = _loss(encoder, styles=[s1], **redraw)
    two, _ = _loss(encoder, styles=[s2], **redraw)
    both, _ = _loss(encoder, styles=[s1, s2], weights=[0.25, 0.75], **redraw)
    for loss in (one, two, both):
        loss.redraw(2)
    for layer in ("relu1_1", "relu2_1"):
        expected = 0.25 * one.style_losses[layer].target + 0.75 * two.style_losses[layer].target
        assert torch.allclose(both.style_losses[layer].target, expected, atol=1e-5)


class Draws(pl.Callback):
    """relu1_1's directions at each step (before it) and the final image."""

    def __init__(self) -> None:
        self.directions: list[torch.Tensor] = []
        self.image: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.directions.append(pl_module.loss_fn.style_losses["relu1_1"].projections.clone())

    def on_train_end(self, trainer, pl_module) -> None:
        self.image = pl_module.output_image.clone()


REDRAW_RUN = [
    "trainer.accelerator=cpu",
    "logging.progress_bar=false",
    "logging.image_every=0",
    "trainer.precision=32-true",
    "image.size=32",
    "trainer.max_steps=7",
    "loss.style_loss=swd",
    "loss.style_layers=[relu1_1,relu2_1]",
    "loss.swd_redraw_every=3",
]


def test_swd_redraw_changes_the_directions_at_each_redraw_step_and_runs_repeat(tmp_path):
    one, two = Draws(), Draws()
    assert runner.run(compose_config(REDRAW_RUN), tmp_path / "one", extra_callbacks=(one,)).status == "completed"
    assert runner.run(compose_config(REDRAW_RUN), tmp_path / "two", extra_callbacks=(two,)).status == "completed"
    d = one.directions  # used by steps 0..6: draws 0,0,0,1,1,1,2
    assert len(d) == 7
    assert torch.equal(d[0], d[2]) and torch.equal(d[3], d[5])
    assert not torch.allclose(d[2], d[3], atol=1e-3) and not torch.allclose(d[5], d[6], atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(one.directions, two.directions))
    assert torch.equal(one.image, two.image)
    fixed = Draws()
    runner.run(compose_config([*REDRAW_RUN, "loss.swd_redraw_every=0"]), tmp_path / "fixed", extra_callbacks=(fixed,))
    assert all(torch.equal(a, d[0]) for a in fixed.directions) and not torch.equal(fixed.image, one.image)


def test_swd_redraw_resumed_run_draws_the_same_directions_and_ends_on_the_same_image(tmp_path):
    whole = Draws()
    assert runner.run(compose_config(REDRAW_RUN), tmp_path / "whole", extra_callbacks=(whole,)).status == "completed"
    cut = runner.run(compose_config(REDRAW_RUN), tmp_path / "cut", extra_callbacks=(StopAt(4),))  # inside draw 1
    assert cut.status == "interrupted" and (tmp_path / "cut" / "last.ckpt").is_file()
    resumed = Draws()
    assert runner.run(compose_config(REDRAW_RUN), tmp_path / "cut", extra_callbacks=(resumed,)).status == "completed"
    assert all(torch.equal(a, b) for a, b in zip(resumed.directions, whole.directions[-len(resumed.directions) :]))
    assert torch.equal(resumed.image, whole.image)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.style_loss=swd", "loss.swd_redraw_every=-1"], "loss.swd_redraw_every must be >= 0"),
        (["loss.style_loss=gram", "loss.swd_redraw_every=5"], "loss.swd_redraw_every=5 redraws the directions of loss.style_loss=swd"),
    ],
)
def test_swd_redraw_bad_values_are_one_line_errors(overrides, message):
    from nst_exp.config import validate

    with pytest.raises(UserError, match=message + ".*fix: "):
        validate(compose_config(overrides))
