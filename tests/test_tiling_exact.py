"""The tiled loss pass (``image.tile``) is exact: the same loss terms and image gradient as the whole
image, up to float summation order, on the real VGG19, with several tiles including odd-sized
border ones, for each style loss, padding, pooling, with a mask and with colour modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nst_exp import stylize
from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.model.layers import reach
from nst_exp.run import setup
from nst_exp.settings import resolve
from nst_exp.tiling.exact import tiled_loss_and_grad
from nst_exp.tiling.geometry import spans

SHALLOW = ["loss.content_layers=[relu2_2]", "loss.style_layers=[relu1_1,relu2_1,relu3_1]"]  # halo 12 px: many real tiles


def _loss_and_image(overrides: list[str], size: int):
    cfg = compose_config([f"image.size={size}", "trainer.accelerator=cpu", "trainer.precision=32-true", *overrides])
    device = torch.device("cpu")
    inputs = setup.Inputs(cfg)
    settings = resolve(cfg, device)
    encoder, _ = setup.build_network(settings)
    loss, content = setup.build_loss(settings, encoder, inputs, setup.Stage(size, 1))
    noise = torch.rand(content.shape, generator=torch.Generator().manual_seed(0))
    return loss, (0.8 * content + 0.2 * noise).requires_grad_(True)


def _assert_tiled_equals_whole(overrides: list[str], size: int, tile: int) -> None:
    loss, image = _loss_and_image(overrides, size)
    whole = loss(image)
    whole["loss/total"].backward()
    expected_grad, image.grad = image.grad.clone(), None
    tiled = tiled_loss_and_grad(loss, image, tile)
    assert set(tiled) == set(whole)
    for name, value in whole.items():
        torch.testing.assert_close(tiled[name], value.detach(), rtol=2e-5, atol=1e-7, msg=name)
    # Elementwise, max pooling included: a crop pools the same windows as the whole image, so a gradient
    # routed to another maximum would show here as an error of the order of that pixel's gradient.
    # Measured with reflect padding and max pooling: within 6e-7 of the largest entry in fp32 (5e-9 in
    # fp64), at 240 px in 64 px tiles and at 150 px in 20 px tiles.
    scale = expected_grad.abs().max()
    torch.testing.assert_close(image.grad / scale, expected_grad / scale, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the defaults: gram, reflect, max pooling, relu1_1..relu5_1 + relu4_2 (halo 80 px)
        ["loss.style_loss=mean_cov", "model.padding=zeros", "model.pooling=avg", "loss.tv_weight=0.1"],
    ],
)
def test_default_layers_tiled_equal_whole(overrides):
    _assert_tiled_equals_whole(overrides, 240, 96)  # 240x160 in 96 px tiles: 3 x 2 tiles, the last ones 48 / 64 px


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.style_loss=gram", "model.padding=reflect", "model.pooling=max"],
        ["loss.style_loss=mean_cov", "model.padding=zeros", "model.pooling=max"],
        ["loss.style_loss=gram", "model.padding=zeros", "model.pooling=avg"],
        ["loss.style_loss=mean_cov", "model.padding=reflect", "model.pooling=avg", "loss.normalize=false"],
        ["image.color=luminance"],
        ["image.color=histogram", "style.extra_paths=[builtin:hubble_deep_field]", "style.blend_weights=[0.7,0.3]"],
    ],
)
def test_shallow_layers_many_tiles_equal_whole(overrides):
    _assert_tiled_equals_whole([*SHALLOW, *overrides], 150, 32)  # 150x100 (odd sizes after poolings) in 32 px tiles:
    # 5 x 4 tiles, the last ones 22 px wide and 4 px (one pooling-grid step) high


@pytest.mark.slow
def test_masked_style_tiled_equals_whole(tmp_path):
    mask = np.zeros((100, 150), dtype=np.uint8)
    mask[:, 40:] = 255
    mask[60:, 100:] = 90
    Image.fromarray(mask).save(tmp_path / "mask.png")
    _assert_tiled_equals_whole([*SHALLOW, f"style.mask_path={tmp_path / 'mask.png'}"], 150, 24)


def test_tiles_cover_the_image_once_with_crops_on_the_grid():
    grid, halo = reach(["relu5_1"])
    assert (grid, halo) == (16, 80)
    for side in (16, 97, 160, 333):
        for tile in (16, 48, 96):
            axis = spans(side, tile, grid, halo)
            assert axis[0].start == 0 and axis[-1].end == side
            assert all(a.end == b.start for a, b in zip(axis, axis[1:]))  # owned blocks tile the side
            for s in axis:
                assert s.crop_start % grid == 0 and s.crop_start <= max(0, s.start - halo) + grid
                assert s.crop_end == min(side, s.end + halo)


@pytest.mark.slow
def test_a_tiled_run_paints_the_same_image(tmp_path):
    settings = dict(
        image={"size": 64},
        trainer={"max_steps": 5, "accelerator": "cpu", "precision": "32-true"},
        logging={"progress_bar": False, "image_every": 0},
        overrides=SHALLOW,
    )
    whole = stylize(output_dir=tmp_path / "whole", return_result=True, **settings)
    tiled = stylize(output_dir=tmp_path / "tiled", return_result=True, **{**settings, "image": {"size": 64, "tile": 16}})
    assert whole.status == tiled.status == "completed"
    a = np.asarray(whole.image, dtype=np.int16)
    b = np.asarray(tiled.image, dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # 8-bit rounding of float-order differences
    assert tiled.metrics["result/loss_total"] == pytest.approx(whole.metrics["result/loss_total"], rel=1e-4)


def test_tile_off_the_pooling_grid_is_one_line_with_the_fix():
    from nst_exp.config import validate

    with pytest.raises(UserError, match=r"image.tile=40 must be a positive multiple of 16 px .*fix: image.tile=32"):
        validate(compose_config(["image.tile=40"]))
    validate(compose_config(["image.tile=48"]))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["loss.style_loss=mean_cov", "model.pooling=avg"]])
def test_targets_made_tile_by_tile_equal_whole(overrides, tmp_path):
    """Huge content and style images: the content target assembled from tiles and the style statistics
    summed over tiles are those of the whole image (and so are the mask's maps)."""
    mask = np.full((100, 150), 255, dtype=np.uint8)
    mask[:50] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    cfg = compose_config(["image.size=240", "trainer.accelerator=cpu", f"style.mask_path={tmp_path / 'mask.png'}", *overrides])
    device = torch.device("cpu")
    inputs = setup.Inputs(cfg)
    encoder, _ = setup.build_network(resolve(cfg, device))
    whole, _ = setup.build_loss(resolve(cfg, device), encoder, inputs, setup.Stage(240, 1))
    cfg.image.tile = 64
    tiled, _ = setup.build_loss(resolve(cfg, device), encoder, inputs, setup.Stage(240, 1))
    whole_state, tiled_state = whole.state_dict(keep_vars=True), tiled.state_dict(keep_vars=True)
    targets = [k for k in whole_state if "target" in k or k.startswith("mask_")]
    assert any("content_losses" in k for k in targets) and any("style_losses" in k for k in targets)
    for key in targets:
        expected = whole_state[key]
        scale = expected.abs().max().clamp_min(1e-12)  # covariances are differences of large sums
        error = ((tiled_state[key] - expected).abs().max() / scale).item()
        assert error < 1e-5, f"{key}: {error:.1e}"


@pytest.mark.slow
def test_final_tiff_on_request(tmp_path):
    result = stylize(
        output_dir=tmp_path / "run",
        return_result=True,
        image={"size": 48},
        trainer={"max_steps": 2, "accelerator": "cpu"},
        logging={"progress_bar": False, "save_tiff": True},
    )
    png, tif = Image.open(tmp_path / "run" / "final.png"), Image.open(tmp_path / "run" / "final.tif")
    assert tif.format == "TIFF" and tif.size == png.size == result.image.size
    assert np.array_equal(np.asarray(tif.convert("RGB")), np.asarray(png.convert("RGB")))
    assert not (tmp_path / "run" / "final.tif.tmp").exists()


def _pass_as_rank(rank: int, world: int, store: str, out: str) -> None:
    """One of ``world`` processes sharing the tiles over gloo: saves its terms and gradient."""
    from nst_exp.tiling.group import Collective

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        loss, image = _loss_and_image(SHALLOW, 150)
        terms = tiled_loss_and_grad(loss, image, 32, reduction=Collective())
        torch.save({"terms": terms, "grad": image.grad}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_processes_sharing_tiles_over_gloo_match_one(tmp_path, world):
    """torch.distributed on the CPU (gloo): the tiles are shared out, pass 1's sums and pass 2's gradient
    all-reduced; every process ends with the one-process terms and gradient (3 processes: uneven shares)."""
    loss, image = _loss_and_image(SHALLOW, 150)
    alone = tiled_loss_and_grad(loss, image, 32)  # 20 tiles: 3 processes take 7, 7 and 6
    torch.multiprocessing.spawn(_pass_as_rank, args=(world, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=world)
    for rank in range(world):
        shared = torch.load(tmp_path / f"out.{rank}")
        for name, value in alone.items():
            torch.testing.assert_close(shared["terms"][name], value, rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(shared["grad"], image.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_window_gradient_is_slicings_in_the_features_layout(fmt):
    """A tile's owned window of an activation hands back slicing's gradient, laid out as the activation
    (slicing's own backward gives NCHW zeros, which slowed every NHWC op after it)."""
    from nst_exp.tiling.geometry import window

    x = torch.randn(1, 4, 6, 5).contiguous(memory_format=fmt).requires_grad_(True)
    weight = torch.randn(1, 4, 3, 3)
    (window(x, slice(1, 4), slice(2, 5)) * weight).sum().backward()
    expected = torch.zeros(1, 4, 6, 5)
    expected[..., 1:4, 2:5] = weight
    assert torch.equal(x.grad, expected) and x.grad.is_contiguous(memory_format=fmt)
