"""Image I/O: any common file (EXIF rotation, grayscale, RGBA, palette, 16-bit) <-> RGB tensors in [0, 1]."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from nst_exp.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")

# Pillow refuses files above twice its MAX_IMAGE_PIXELS as possible decompression bombs.
PILLOW_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[int | None]:
    """Within: Pillow's bomb guard off (the caller checks ``max_pixels`` itself, with a better message)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield PILLOW_PIXEL_LIMIT if max_pixels is None else (max_pixels or None)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_pixels(size_wh: tuple[int, int], what: str, where: Any, limit: int | None) -> None:
    """One line for an image above the limit (``image.max_input_pixels``), and how to allow it."""
    pixels = size_wh[0] * size_wh[1]
    if limit and pixels > limit:
        raise UserError(
            f"{what} image {where} is {size_wh[0]}x{size_wh[1]} ({pixels / 1e6:.3g} Mpx), above the "
            f"{limit / 1e6:.3g} Mpx limit that guards against decompression bombs; fix: if you trust the file, "
            "image.max_input_pixels=0 (no limit) or a larger number of pixels"
        )


def bundled_images() -> list[Path]:
    """The images shipped in ``nst_exp/assets`` (``builtin:NAME``)."""
    return sorted(p for p in ASSETS_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_path(path: str | Path, what: str) -> Path:
    """A user path (``~`` expanded, relative to the cwd) or ``builtin:NAME`` for a bundled image."""
    text = str(path)
    if not text or text == "???":
        raise UserError(f"{what}.path is not set; fix: pass {what}.path=/path/to/image.jpg or pick a preset with {what}=NAME")
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        bundled = bundled_images()
        for image in bundled:
            if name in (image.name, image.stem):  # builtin:chelsea or builtin:chelsea.png
                return image
        listing = ", ".join(BUILTIN_PREFIX + p.stem for p in bundled)
        raise UserError(f"{what}.path={text} is not a bundled image; fix: one of {listing}, or a path to your own file")
    resolved = Path(text).expanduser()
    if not resolved.exists():
        raise UserError(f"{what} image not found: {resolved}; fix: check {what}.path (relative paths start from {Path.cwd()})")
    if not resolved.is_file():
        raise UserError(f"{what} image path is not a file: {resolved}; fix: point {what}.path at an image file")
    return resolved


def _to_8bit(values: np.ndarray, sixteen_bit: bool = False) -> np.ndarray:
    """Integers (16-bit when ``sixteen_bit`` or above 255) or floats (in [0, 1], else [0, 255]) as 8-bit."""
    arr = np.nan_to_num(np.asarray(values, dtype=np.float64))
    if np.issubdtype(values.dtype, np.floating) or values.dtype == bool:
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
    else:
        peak = 65535.0 if sixteen_bit or arr.max(initial=0) > 255 else 255.0
    return np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Normalise mode: 16-bit and float to 8-bit, transparency composited on white, anything else to RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = Image.fromarray(_to_8bit(np.asarray(img), sixteen_bit=img.mode.startswith("I;16")), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_from_value(value: Any, what: str) -> Image.Image:
    """An in-memory image as the Python API takes it: a PIL image, or an array (NumPy, or a torch tensor) of
    H x W (grey) or H x W x 3/4 (RGB, RGBA; a tensor also 3 x H x W or 1 x 3 x H x W, as torchvision
    holds images), 8-bit, 16-bit or floats in [0, 1] (above 1: in [0, 255]). Anything else is one line."""
    if isinstance(value, Image.Image):
        return value
    shape = tuple(getattr(value, "shape", ()))
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (3, 4):
            t = t.permute(1, 2, 0)
        value = (t.float() if t.is_floating_point() else t).numpy()
    if not isinstance(value, np.ndarray):
        raise UserError(
            f"{what} must be a path, a PIL image or an image array, got {type(value).__name__}; "
            "fix: e.g. stylize('photo.jpg', 'painting.png')"
        )
    arr = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.size == 0:
        raise UserError(f"the {what} array has shape {shape}; fix: H x W x 3 (RGB), H x W (grey), or a PIL image")
    if arr.dtype != np.uint8:
        if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise UserError(f"the {what} array holds {arr.dtype} values; fix: 8-bit integers or floats in [0, 1]")
        arr = _to_8bit(arr)
    return Image.fromarray(np.ascontiguousarray(arr))


def open_image(source: str | Path | Image.Image, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open a path (or take a PIL image) as an upright RGB PIL image, or raise a one-line UserError.

    ``max_pixels``: the largest file accepted (``image.max_input_pixels``); None = Pillow's
    decompression-bomb limit, 0 = no limit.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        path = resolve_path(source, what)
        try:
            with pixel_limit(max_pixels) as limit, Image.open(path) as opened:
                check_pixels(opened.size, what, path, limit)
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:  # an animated GIF, WebP or a multi-page TIFF: Pillow opens the first frame
                    print(
                        f"note: the {what} image {path} has {frames} frames; the first one is used "
                        "(save the frame you want as a PNG to use another)",
                        file=sys.stderr,
                    )
                img = ImageOps.exif_transpose(opened)  # an upright copy, info (transparency) kept
                img.load()
        except UnidentifiedImageError:
            raise UserError(f"{what} file is not an image PIL can read: {path}; fix: use a PNG, JPEG, WebP, TIFF or BMP file") from None
        except OSError as exc:
            raise UserError(f"cannot read {what} image {path}: {exc}; fix: check the file is a complete, readable image") from None
    return _to_rgb(img)


def fit_long_side(size_wh: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``long_side``, aspect kept, each side >= 1."""
    w, h = size_wh
    scale = long_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    target = fit_long_side(img.size, long_side)
    return img if target == img.size else img.resize(target, Image.Resampling.LANCZOS)


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float tensor (1, 3, H, W) in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(image: Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> 8-bit RGB PIL image (values rounded, clamped)."""
    x = image.detach().float()
    if x.dim() == 4:
        x = x[0]
    arr = x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def load_tensor(source: str | Path | Image.Image, long_side: int, what: str = "image") -> Tensor:
    return pil_to_tensor(resize_long_side(open_image(source, what), long_side))


_SAVE_FORMATS = {".png": ("PNG", {}), ".tif": ("TIFF", {"compression": "tiff_lzw"}), ".tiff": ("TIFF", {"compression": "tiff_lzw"})}


def save_png(image: Tensor | Image.Image, path: Path, what: str | None = None) -> Path:
    """Write an image atomically (tmp file then rename), so an interrupted save never leaves a broken
    file: PNG, or lossless LZW TIFF for a ``.tif``/``.tiff`` path. A failed write is ``WriteFailed``
    naming ``what`` (default "image"), and the previous file stays."""
    from nst_exp.files import atomic_write

    pil = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    fmt, options = _SAVE_FORMATS[path.suffix.lower()]
    return atomic_write(path, lambda tmp: pil.save(tmp, format=fmt, **options), what or "image")
