"""loss.style_from_start: the style term divided by its value on the run's start image, so one style
weight adapts to each content x style pair (a start far from its style gets a smaller effective weight)."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line_error, run_cli
from run_callbacks import Final, StopAt

import nst_exp
from nst_exp.api import compose_config
from nst_exp.config import validate
from nst_exp.errors import UserError
from nst_exp.run import setup
from nst_exp.settings import resolve

SIZE = 48
BASE = ["init=content_recolored", "loss.style_loss=swd", "loss.style_layers=[relu1_1,relu2_1]", "trainer.accelerator=cpu"]


def _built(*overrides: str):
    cfg = compose_config([*BASE, f"image.size={SIZE}", *overrides])
    settings = resolve(cfg, torch.device("cpu"))
    encoder, _ = setup.build_network(settings)
    inputs = setup.Inputs(cfg)
    loss, content = setup.build_loss(settings, encoder, inputs, setup.Stage(SIZE, 1))
    return cfg, inputs, loss, content


def test_style_from_start_makes_the_style_term_on_the_start_image_equal_the_style_weight():
    cfg, inputs, loss, content = _built("loss.style_from_start=true", "loss.style_weight=7")
    start = setup.initial_image(cfg, inputs, content, torch.device("cpu"))
    with torch.no_grad():
        terms = loss(start)
    assert loss.style_weight * float(terms["loss/style"]) == pytest.approx(7.0, rel=1e-5)
    _, _, fixed, _ = _built("loss.style_weight=7")
    assert fixed.style_weight == 7.0  # off by default: the weight as given


def test_style_from_start_gives_each_pair_its_own_weight():
    """The same beta, two styles: the start that is farther from its style gets the smaller weight."""
    weights = {}
    for style in ("starry_night.jpg", "hubble_deep_field.jpg"):
        cfg, inputs, loss, content = _built("loss.style_from_start=true", "loss.style_weight=10", f"style.path=builtin:{style}")
        start = setup.initial_image(cfg, inputs, content, torch.device("cpu"))
        with torch.no_grad():
            far = float(loss(start)["loss/style"])
        weights[style] = (loss.style_weight, far)
    (w1, d1), (w2, d2) = weights.values()
    assert d1 != d2 and (w1 < w2) == (d1 > d2)


def test_style_from_start_runs_and_refuses_tiles_in_one_line(tmp_path):
    result = nst_exp.stylize(
        output_dir=tmp_path / "r",
        return_result=True,
        overrides=[*BASE, "loss.style_from_start=true", "image.size=32", "trainer.max_steps=3", "logging.progress_bar=false"],
    )
    assert result.status == "completed", result.error
    assert (tmp_path / "r" / "final.png").exists()
    with pytest.raises(UserError, match=r"loss.style_from_start=true .* image.tile=64 asks for tiles; fix: "):
        validate(compose_config(["loss.style_from_start=true", "image.tile=64", "image.size=128"]))
    proc = run_cli(["run", "loss.style_from_start=true", "image.tile=32", "image.size=64", "trainer.max_steps=1"], tmp_path)
    line = one_line_error(proc)
    assert "loss.style_from_start=true" in line and "fix:" in line


def test_style_from_start_refuses_a_start_that_already_has_the_style():
    """A start at the style would make the weight explode: init=style is refused when the config is read, and a
    start whose style term is (about) zero when it is measured, in one line each."""
    with pytest.raises(UserError, match=r"loss.style_from_start=true .* init=style starts at the style itself.*; fix: "):
        validate(compose_config(["loss.style_from_start=true", "init=style"]))
    cfg, inputs, _, content = _built("loss.style_from_start=true", "init=content")
    from nst_exp.model.losses import build_style_transfer_loss

    encoder, _ = setup.build_network(resolve(cfg, torch.device("cpu")))
    # the loss whose style is the start image itself: its style term there is zero
    own, _ = build_style_transfer_loss(cfg.loss, encoder, content, [content], [1.0])
    with pytest.raises(
        UserError, match=r"style term of the start image \(init=content\), which is [0-9.e+-]+ here: the start already has the style; fix: "
    ):
        setup.style_at_start(cfg, inputs, own, content, torch.device("cpu"))


def test_style_from_start_resumed_run_ends_on_the_uninterrupted_image(tmp_path):
    """The weight comes from the start rule's image at each stage's size, not from the stage's actual first
    image, so a run cut in its last stage and resumed ends on the very image of an uninterrupted run."""

    from nst_exp.run import runner

    overrides = [
        *BASE,
        "loss.style_from_start=true",
        "loss.style_weight=10",
        "image.size=64",
        "image.scale_from=32",
        "image.scale_ratio=2",
        "image.scale_steps=4",
        "trainer.max_steps=5",
        "trainer.precision=32-true",
        "logging.progress_bar=false",
        "logging.image_every=0",
    ]
    whole = Final()
    assert runner.run(compose_config(overrides), tmp_path / "whole", extra_callbacks=(whole,)).status == "completed"
    assert runner.run(compose_config(overrides), tmp_path / "cut", extra_callbacks=(StopAt(6),)).status == "interrupted"
    resumed = Final()
    result = runner.run(compose_config(overrides), tmp_path / "cut", extra_callbacks=(resumed,))
    assert result.status == "completed" and result.metrics["result/steps"] == 9
    assert torch.equal(resumed.image, whole.image)
