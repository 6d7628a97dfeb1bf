"""The notebook API: same schema and defaults as the CLI, paths or PIL images in, a PIL image out."""

from __future__ import annotations

import pytest
from PIL import Image

import nst_exp
from nst_exp.api import compose_config
from nst_exp.errors import UserError


def test_compose_matches_cli_defaults():
    cfg = compose_config()
    assert cfg.style.name == "starry_night" and cfg.content.name == "chelsea"
    assert cfg.loss.content_layers == ["relu4_2"] and cfg.optimizer.name.value == "lbfgs"


def test_settings_are_type_checked():
    with pytest.raises(Exception, match="size"):
        compose_config(image={"size": "big"})
    with pytest.raises(Exception, match="nonsense"):
        compose_config(loss={"nonsense": 1})


def test_stylize_with_pil_images(tmp_path, photo, painting):
    result = nst_exp.stylize(
        Image.open(photo), Image.open(painting), output_dir=tmp_path / "run",
        image={"size": 40}, trainer={"max_steps": 3}, logging={"progress_bar": False},
    )
    assert isinstance(result, Image.Image) and result.size == (40, 27)
    assert (tmp_path / "run" / "final.png").is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents*"))


def test_stylize_with_paths_and_overrides(tmp_path, photo, painting):
    result = nst_exp.stylize(
        photo, str(painting), output_dir=tmp_path / "run", return_result=True,
        overrides=["image.size=32", "trainer.max_steps=2", "optimizer=adam", "logging.progress_bar=false"],
    )
    assert result.status == "completed" and result.image.size == (32, 22)
    assert result.metrics["hp/steps"] == 2
    assert (tmp_path / "run" / "config.yaml").read_text().count("adam") == 1


def test_stylize_bad_input(tmp_path):
    with pytest.raises(UserError, match="content image not found"):
        nst_exp.stylize(tmp_path / "missing.jpg", output_dir=tmp_path / "run")
