"""Image loading: every common mode and EXIF rotation just works (bad files: tests/test_bad_input.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nst_exp.errors import UserError
from nst_exp.images import (
    bundled_images,
    load_tensor,
    open_image,
    pil_to_tensor,
    resolve_path,
    save_png,
    tensor_to_pil,
)


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


def test_builtin_paths():
    """``builtin:NAME`` with or without the extension; the error lists images only (no __init__.py, NOTICE.md)."""
    assert resolve_path("builtin:starry_night.jpg", "style") == resolve_path("builtin:starry_night", "style")
    assert resolve_path("builtin:chelsea", "content").name == "chelsea.png"
    with pytest.raises(UserError, match="not a bundled image; fix: one of builtin:astronaut, .*builtin:starry_night") as err:
        resolve_path("builtin:nope.jpg", "style")
    assert "__init__" not in str(err.value) and "NOTICE" not in str(err.value)
    assert [p.suffix for p in bundled_images()] and all(p.suffix in (".png", ".jpg") for p in bundled_images())


def test_save_is_exact(tmp_path):
    t = torch.rand(1, 3, 9, 7)
    path = save_png(t, tmp_path / "x.png")
    back = pil_to_tensor(Image.open(path))
    assert torch.equal(back, torch.round(t * 255) / 255)
    assert tensor_to_pil(t).size == (7, 9)


def test_animated_gif_says_in_one_line_that_its_first_frame_is_used(tmp_path, capsys):
    path = tmp_path / "wave.gif"
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = open_image(path, "style")
    assert img.getpixel((5, 5))[0] > 200 and img.getpixel((5, 5))[2] < 50  # the first (red) frame
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: the style image {path} has 3 frames; the first one is used (save the frame you want as a PNG to use another)"]
    frames[0].save(tmp_path / "still.png")
    open_image(tmp_path / "still.png", "content")
    assert capsys.readouterr().err == ""  # a still image: nothing to say
