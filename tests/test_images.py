"""Image loading: every common mode and EXIF rotation just works; bad files give one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst_exp.errors import UserError
from nst_exp.images import load_tensor, open_image, pil_to_tensor, resolve_path, save_png, tensor_to_pil


def _check_rgb(t: torch.Tensor, long_side: int):
    assert t.dim() == 4 and t.shape[:2] == (1, 3)
    assert max(t.shape[-2:]) == long_side
    assert 0.0 <= t.min() and t.max() <= 1.0


def test_grayscale(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((20, 30), 128, np.uint8), "L").save(p)
    t = load_tensor(p, 30)
    _check_rgb(t, 30)
    assert torch.allclose(t[0, 0], t[0, 1]) and torch.allclose(t, torch.full_like(t, 128 / 255))


def test_rgba_composited_on_white(tmp_path):
    p = tmp_path / "a.png"
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[..., 0] = 255  # red, fully transparent
    Image.fromarray(arr, "RGBA").save(p)
    t = load_tensor(p, 10)
    assert torch.allclose(t, torch.ones_like(t))


def test_palette(tmp_path):
    p = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).convert("P").save(p)
    _check_rgb(load_tensor(p, 16), 16)


def test_sixteen_bit(tmp_path):
    p = tmp_path / "16.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    t = load_tensor(p, 8)
    assert torch.allclose(t, torch.ones_like(t))  # white stays white, not clipped garbage


def test_exif_rotation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(p, exif=exif)
    assert open_image(p).size == (20, 40)


def test_missing_file_message(tmp_path):
    with pytest.raises(UserError, match=r"content image not found: .*nope.jpg; fix: check content.path"):
        open_image(tmp_path / "nope.jpg", "content")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello")
    with pytest.raises(UserError, match="style file is not an image"):
        open_image(p, "style")


def test_truncated_image(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(UserError):
        open_image(p, "content")


def test_builtin_paths():
    assert resolve_path("builtin:starry_night.jpg", "style").is_file()
    with pytest.raises(UserError, match="bundled images are: .*starry_night.jpg"):
        resolve_path("builtin:nope.jpg", "style")


def test_save_is_exact(tmp_path):
    t = torch.rand(1, 3, 9, 7)
    path = save_png(t, tmp_path / "x.png")
    back = pil_to_tensor(Image.open(path))
    assert torch.equal(back, torch.round(t * 255) / 255)
    assert tensor_to_pil(t).size == (7, 9)
