"""loss.style_layer_losses: a style loss per style layer (e.g. swd on the shallow layers, mean_cov deeper).
Each layer's term is the one its kind gives alone, targets computed in tiles equal the whole ones, bad
values and sorting kinds with tiles are one-line errors, and a run goes through the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line_error, run_cli

from nst_exp.api import compose_config
from nst_exp.config import validate
from nst_exp.errors import UserError
from nst_exp.images import load_tensor
from nst_exp.model.losses import GramStyleLoss, MeanCovStyleLoss, SlicedWassersteinStyleLoss, build_style_transfer_loss
from nst_exp.model.vgg import build_encoder
from nst_exp.tiling.targets import TargetTiles

LAYERS = "loss.style_layers=[relu1_1,relu2_1]"


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(["relu1_1", "relu2_1", "relu4_2"])


def _loss(encoder, *overrides: str, tile: int | None = None):
    cfg = compose_config(["loss.content_layers=[relu4_2]", LAYERS, *overrides])
    validate(cfg)
    content = load_tensor("builtin:chelsea.png", 64)
    styles = [load_tensor("builtin:starry_night.jpg", 64)]
    tiles = TargetTiles(tile) if tile else None
    loss, _ = build_style_transfer_loss(cfg.loss, encoder, content, styles, [1.0], seed=3, tiles=tiles)
    return loss, content


def test_each_layer_has_its_kinds_term(encoder):
    mixed, content = _loss(encoder, "loss.style_layer_losses=[swd,gram]")
    swd, _ = _loss(encoder, "loss.style_loss=swd")
    gram, _ = _loss(encoder, "loss.style_loss=gram")
    assert isinstance(mixed.style_losses["relu1_1"], SlicedWassersteinStyleLoss)
    assert isinstance(mixed.style_losses["relu2_1"], GramStyleLoss)
    # the swd layer draws the directions it draws alone (same seed, same layer stream)
    assert torch.equal(mixed.style_losses["relu1_1"].projections, swd.style_losses["relu1_1"].projections)
    image = content * 0.8 + 0.1
    with torch.no_grad():
        terms, alone_swd, alone_gram = mixed(image), swd(image), gram(image)
    assert float(terms["loss/style/relu1_1"]) == pytest.approx(float(alone_swd["loss/style/relu1_1"]), rel=1e-6)
    assert float(terms["loss/style/relu2_1"]) == pytest.approx(float(alone_gram["loss/style/relu2_1"]), rel=1e-6)
    assert float(terms["loss/style/relu1_1"]) > 0 and float(terms["loss/style/relu2_1"]) > 0
    # [] is loss.style_loss on every layer
    same, _ = _loss(encoder, "loss.style_loss=gram", "loss.style_layer_losses=[]")
    assert all(isinstance(t, GramStyleLoss) for t in same.style_losses.values())
    x = content.clone().requires_grad_(True)
    mixed(x)["loss/total"].backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def test_targets_of_mixed_kinds_in_tiles_equal_the_whole(encoder):
    whole, content = _loss(encoder, "loss.style_layer_losses=[mean_cov,gram]")
    tiled, _ = _loss(encoder, "loss.style_layer_losses=[mean_cov,gram]", tile=24)
    assert isinstance(tiled.style_losses["relu1_1"], MeanCovStyleLoss) and isinstance(tiled.style_losses["relu2_1"], GramStyleLoss)
    image = content * 0.8 + 0.1
    with torch.no_grad():
        a, b = whole(image), tiled(image)
    for name in ("loss/style/relu1_1", "loss/style/relu2_1", "loss/content"):
        assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4, abs=1e-7), name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.style_layer_losses=[swd]"], r"loss.style_layer_losses has 1 values for 2 loss.style_layers"),
        (["loss.style_layer_losses=[gram,mean_cov]", "loss.swd_redraw_every=5"], r"redraws the directions of .*no style layer uses it"),
        (
            ["loss.style_layer_losses=[gram,histogram]", "image.tile=64", "image.size=128"],
            r"loss.style_layer_losses' histogram sorts every position",
        ),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message + ".*fix: "):
        validate(compose_config([LAYERS, *overrides]))


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.style_layer_losses=[gram,swd]", "loss.swd_redraw_every=5"],  # one swd layer is enough to redraw
        ["loss.style_layer_losses=[gram,mean_cov]", "image.tile=64", "image.size=128"],  # sums over positions: tiles are exact
    ],
)
def test_accepted_combinations(overrides):
    validate(compose_config([LAYERS, *overrides]))


def test_mixed_losses_run_through_the_cli(tmp_path):
    mixed = ["loss.style_layers=[relu1_1,relu2_1,relu3_1,relu4_1]", "loss.style_layer_losses=[swd,swd,swd,mean_cov]"]
    proc = run_cli(["run", *mixed, "image.size=48", "trainer.max_steps=3", "logging.progress_bar=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.rglob("final.png"))
    proc = run_cli(["run", "loss.style_layer_losses=[swd,sw]", "image.size=48", "trainer.max_steps=1"], tmp_path)
    line = one_line_error(proc)
    assert "loss.style_layer_losses" in line and "fix:" in line
    # a sorting kind on one layer, an image that needs tiles: refused before any step, naming that layer's setting
    proc = run_cli(
        ["run", "loss.style_layers=[relu1_1,relu2_1]", "loss.style_layer_losses=[gram,swd]", "image.size=64", "image.memory_mib=1"],
        tmp_path,
    )
    assert "loss.style_layer_losses' swd sorts every position" in one_line_error(proc)
