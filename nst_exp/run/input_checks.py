"""Checks of a run's input images that need only their headers: present, readable, not too big, and
large enough at every size the run uses for VGG19's poolings.

The runner applies ``check_image_sizes`` to the images it loaded; the CLI applies ``check_inputs``
to every value of a sweep before any job starts, so a bad file or size fails the command at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError

from nst_exp.config import Init
from nst_exp.errors import UserError
from nst_exp.images import check_pixels, fit_long_side, pixel_limit, resolve_path
from nst_exp.run.stages import stages_of, style_long_side

_EXIF_ORIENTATION = 0x0112


def header_size(path: Any, what: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as the run will see it (EXIF rotation applied), from the header alone."""
    resolved = resolve_path(path, what)
    with pixel_limit(max_pixels) as limit:
        try:
            with Image.open(resolved) as img:
                w, h = img.size
                if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                    w, h = h, w
        except UnidentifiedImageError:
            raise UserError(f"{what} file is not an image PIL can read: {resolved}; fix: use a PNG, JPEG, WebP, TIFF or BMP file") from None
        except OSError as exc:
            raise UserError(f"cannot read {what} image {resolved}: {exc}; fix: check the file is a complete, readable image") from None
    check_pixels((w, h), what, resolved, limit)
    return w, h


def check_image_sizes(cfg: Any, content_wh: tuple[int, int], styles_wh: Sequence[tuple[int, int]]) -> None:
    """Every size the run resizes an image to keeps its short side at VGG19's minimum for the loss layers.

    A panorama resized to ``image.size`` on its long side can end with a short side of a few pixels,
    which VGG19's poolings cannot take; say which image, which size, and the fix.
    """
    from nst_exp.model.layers import deepest_layer, min_input_side

    layers = [*cfg.loss.content_layers, *cfg.loss.style_layers]
    need = min_input_side(layers)
    for size in (stage.size for stage in stages_of(cfg)):
        where = (
            "image.size"
            if size == cfg.image.size
            else "a stage of image.multiscale_sizes"
            if cfg.image.multiscale_sizes
            else "a stage of image.scale_from"
        )
        _check_side("content", content_wh, size, need, f"{where}={size}", deepest_layer(layers))
        for i, wh in enumerate(styles_wh):
            name = "style" if i == 0 else f"style.extra_paths[{i - 1}]"
            _check_side(
                name,
                wh,
                style_long_side(cfg, size),
                need,
                f"{where}={size} (style at {style_long_side(cfg, size)} px)",
                deepest_layer(layers),
            )


def _check_side(what: str, wh: tuple[int, int], long_side: int, need: int, where: str, layer: str) -> None:
    w, h = fit_long_side(wh, long_side)
    if min(w, h) >= need:
        return
    enough = math.ceil(need * max(wh) / min(wh))
    raise UserError(
        f"the {what} image ({wh[0]}x{wh[1]}) becomes {w}x{h} px at {where}: its short side is below the {need} px "
        f"VGG19 needs up to {layer}; fix: a long side of at least {enough} px there, a less elongated (cropped) "
        "image, or shallower loss layers"
    )


def check_inputs(cfg: Any) -> None:
    """Before a run or sweep starts: each input file exists, reads as an image, is within the pixel limit,
    and keeps a large enough short side at every size the run uses."""
    limit = cfg.image.get("max_input_pixels")
    content = header_size(cfg.content.path, "content", limit)
    styles = [header_size(cfg.style.path, "style", limit)]
    styles += [header_size(p, f"style.extra_paths[{i}]", limit) for i, p in enumerate(cfg.style.extra_paths)]
    if cfg.style.mask_path:
        header_size(cfg.style.mask_path, "style mask", limit)
    if cfg.init == Init.image and cfg.image.init_path:
        header_size(cfg.image.init_path, "init", limit)
    check_image_sizes(cfg, content, styles)
