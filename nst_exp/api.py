"""The notebook API: ``nst_exp.stylize(content, style, **overrides)`` with the CLI's schema and defaults."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from nst_exp.run.runner import RunResult


def compose_config(overrides: list[str] | None = None, **settings: Any) -> Any:
    """The CLI's composed config; see ``nst_exp.config.compose_config`` (here for notebooks, importing Hydra lazily)."""
    from nst_exp.config import compose_config as compose

    return compose(overrides, **settings)


def stylize(
    content: str | Path | Image.Image | None = None,
    style: str | Path | Image.Image | None = None,
    *,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    return_result: bool = False,
    **settings: Any,
) -> Image.Image | RunResult:
    """Style-transfer ``content`` (path or PIL image) in the manner of ``style``; returns the PIL image.

    ``content``/``style`` default to the CLI's defaults. ``overrides`` are CLI-style strings
    (``["loss.style_weight=1e5", "optimizer=adam"]``); keyword settings are nested dicts
    (``image={"size": 128}, trainer={"max_steps": 50}``). The run folder (final.png,
    TensorBoard events, config.yaml) is ``output_dir`` or ``outputs/api/<timestamp>``.
    """
    from nst_exp.run import runner
    from nst_exp.errors import UserError

    cfg = compose_config(overrides, **settings)
    images: dict[str, Any] = {}
    for key, value in (("content", content), ("style", style)):
        if value is None:
            continue
        if isinstance(value, (str, Path)):
            cfg[key].path = str(value)
            cfg[key].name = Path(value).stem
        else:
            images[key] = value
            cfg[key].name = f"{key}_image"
    run_dir = Path(output_dir) if output_dir else Path("outputs/api") / time.strftime("%Y-%m-%d/%H-%M-%S")
    result = runner.run(cfg, run_dir, images.get("content"), [images["style"]] if "style" in images else None)
    if result.image is None:
        raise UserError(f"the run produced no image ({result.status}): {result.error}")
    return result if return_result else result.image
