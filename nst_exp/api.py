"""The notebook API: ``nst_exp.stylize(content, style, **overrides)`` with the CLI's schema and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import open_dict

from nst_exp.compose import compose_config
from nst_exp.errors import UserError, one_line_errors
from nst_exp.labels import labels_of, run_folder

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from nst_exp.run.runner import RunResult


API_ROOT = Path("outputs/api")


def new_run_dir(labels: dict[str, str | None]) -> Path:
    """A folder no other run has (``labels.run_folder`` under ``outputs/api``); the run makes it once
    accepted (a refused call leaves nothing behind)."""
    while True:
        path = run_folder(API_ROOT, labels["content"], labels["style"], labels["experiment"])
        if not path.exists():
            return path


def stylize(
    content: str | Path | Image.Image | np.ndarray | torch.Tensor | None = None,
    style: str | Path | Image.Image | np.ndarray | torch.Tensor | None = None,
    *,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    return_result: bool = False,
    **settings: Any,
) -> Image.Image | RunResult:
    """Style-transfer ``content`` in the manner of ``style`` (each a path, a PIL image or an image array:
    ``images.image_from_value``); returns the PIL image.

    ``content``/``style`` default to the CLI's defaults. ``overrides`` are CLI-style strings
    (``["loss.style_weight=1e5", "optimizer=adam"]``); keyword settings are nested dicts
    (``image={"size": 128}, trainer={"max_steps": 50}``). The run folder (final.png,
    TensorBoard events, config.yaml) is ``output_dir`` or a new ``outputs/api/<date>/<time>_<labels>``
    (never one an earlier call made: a finished run's folder is refused).
    """
    from nst_exp.images import image_from_value
    from nst_exp.run import runner

    cfg = compose_config(overrides, with_hydra=True, **settings)
    experiment = cfg.hydra.runtime.choices.get("experiment")
    with open_dict(cfg):
        del cfg["hydra"]
    images: dict[str, Any] = {}
    for key, value in (("content", content), ("style", style)):
        if value is None:
            continue
        if isinstance(value, (str, Path)):
            cfg[key].path, cfg[key].name = str(value), None  # labelled by its file stem
        else:
            images[key] = image_from_value(value, key)
            cfg[key].name = f"{key}_image"
    labels = labels_of(cfg, experiment)
    run_dir = Path(output_dir) if output_dir else new_run_dir(labels)
    with one_line_errors():  # the model's and optimiser's own errors, as one line
        result = runner.run(cfg, run_dir, images.get("content"), [images["style"]] if "style" in images else None, experiment=experiment)
    if result.image is None:
        raise UserError(f"the run produced no image ({result.status}): {result.error}")
    return result if return_result else result.image
