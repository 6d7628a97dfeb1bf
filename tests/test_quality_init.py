"""init=content_recolored: the run starts from the content image in the style's colours (mean and
covariance), a head start on the style's colour distribution that keeps the content's layout."""

from __future__ import annotations

import torch

import nst_exp
from nst_exp.api import compose_config
from nst_exp.run.setup import Inputs, initial_image

SIZE = 48


def _start(*overrides: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = compose_config(
        ["init=content_recolored", "content.path=builtin:astronaut.png", "style.path=builtin:hubble_deep_field.jpg", *overrides]
    )
    inputs = Inputs(cfg)
    content = inputs.content_at(SIZE)
    return initial_image(cfg, inputs, content, torch.device("cpu")), content, inputs.style_at(0, SIZE)


def test_recolored_start_has_the_style_colours_and_the_content_layout():
    start, content, style = _start()
    assert start.shape == content.shape
    mean = lambda t: t.mean(dim=(2, 3))
    assert (mean(start) - mean(style)).abs().max() < 0.03 < (mean(content) - mean(style)).abs().max()
    corr = torch.corrcoef(torch.stack([start.mean(1).flatten(), content.mean(1).flatten()]))[0, 1]
    assert corr > 0.9  # the same picture, darker: the astronaut's layout kept


def test_recolored_start_in_luminance_mode_is_grey_with_the_style_luminance():
    from nst_exp.model.color import luminance

    cfg = compose_config(
        [
            "init=content_recolored",
            "content.path=builtin:astronaut.png",
            "style.path=builtin:hubble_deep_field.jpg",
            "image.color=luminance",
        ]
    )
    inputs = Inputs(cfg)
    grey = luminance(inputs.content_at(SIZE))  # the content as luminance mode's targets see it
    start = initial_image(cfg, inputs, grey, torch.device("cpu"))
    assert torch.equal(start[:, 0], start[:, 1]) and torch.equal(start[:, 1], start[:, 2])  # still grey
    assert abs(start.mean().item() - luminance(inputs.style_at(0, SIZE)).mean().item()) < 0.03


def test_recolored_start_runs(tmp_path):
    result = nst_exp.stylize(
        output_dir=tmp_path / "r",
        return_result=True,
        overrides=["init=content_recolored", "image.size=32", "trainer.max_steps=2", "logging.progress_bar=false", "logging.image_every=0"],
    )
    assert result.status == "completed", result.error
