"""The notebook API: same schema and defaults as the CLI, paths or PIL images in, a PIL image out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nst_exp
from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.labels import image_label


def test_compose_matches_cli_defaults():
    cfg = compose_config()
    assert (image_label(cfg.content), image_label(cfg.style)) == ("chelsea", "starry_night")
    assert cfg.loss.content_layers == ["relu4_2"] and cfg.optimizer.name.value == "lbfgs"


@pytest.mark.slow
def test_stylize_never_shares_a_folder(tmp_path, monkeypatch, photo):
    """Three calls within one second: three folders, each named by its images and experiment."""
    monkeypatch.chdir(tmp_path)
    args = {"overrides": ["image.size=32", "trainer.max_steps=1", "logging.progress_bar=false", "experiment=plain"], "return_result": True}
    runs = [nst_exp.stylize(photo, **args).run_dir for _ in range(3)]
    assert len(set(runs)) == 3 and all(r.parent.parent == Path("outputs/api") for r in runs)
    assert all(r.name.endswith("_plain_photo_starry_night") for r in runs)
    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert (result["content"], result["style"], result["experiment"]) == ("photo", "starry_night", "plain")
    with pytest.raises(UserError, match="already holds a finished run; fix: another folder, or resume="):
        nst_exp.stylize(photo, output_dir=runs[0], **args)


@pytest.mark.slow
def test_stylize_with_pil_images(tmp_path, photo, painting):
    result = nst_exp.stylize(
        Image.open(photo),
        Image.open(painting),
        output_dir=tmp_path / "run",
        image={"size": 40},
        trainer={"max_steps": 3},
        logging={"progress_bar": False},
    )
    assert isinstance(result, Image.Image) and result.size == (40, 27)
    assert np.array_equal(np.asarray(result), np.asarray(Image.open(tmp_path / "run" / "final.png").convert("RGB")))
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == [0, 1, 2]  # every step logged
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (record["content"], record["style"]) == ("content_image", "style_image")  # labelled as in-memory images


def test_stylize_with_arrays_as_numpy_and_torchvision_hold_them(tmp_path, photo, painting):
    """A NumPy H x W x 3 uint8 photo and a torch 3 x H x W float painting give the run the PIL images'
    pixels: the same final image to the bit."""
    import torch

    settings = {"image": {"size": 40}, "trainer": {"max_steps": 2}, "logging": {"progress_bar": False}}
    as_pil = nst_exp.stylize(Image.open(photo), Image.open(painting), output_dir=tmp_path / "pil", **settings)
    painting_chw = torch.from_numpy(np.asarray(Image.open(painting).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    as_arrays = nst_exp.stylize(np.asarray(Image.open(photo).convert("RGB")), painting_chw, output_dir=tmp_path / "arrays", **settings)
    assert np.array_equal(np.asarray(as_pil), np.asarray(as_arrays))
    inputs = [json.loads((tmp_path / run / "result.json").read_text())["provenance"]["inputs"] for run in ("pil", "arrays")]
    assert inputs[0] == inputs[1] and len(inputs[0]["content"]) == 64  # the same pixels, the same fingerprints


def test_an_override_naming_a_path_beyond_ascii_is_read_as_typed(tmp_path, photo):
    """Hydra's grammar reads such a value only quoted: the overrides are quoted for it, in the API as on the
    command line (the run's label keeps the letters)."""
    path = photo.rename(photo.with_name("café ü 星夜.png"))
    overrides = [f"content.path={path}", "image.size=32", "trainer.max_steps=1", "logging.progress_bar=false"]
    nst_exp.stylize(overrides=overrides, output_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "result.json").read_text())["content"] == "café ü 星夜"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (5, "content must be a path, a PIL image or an image array, got int; fix:"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"the content array has shape \(2, 3, 8, 8\); fix: H x W x 3"),
        (np.zeros((8, 8, 3), np.complex64), "the content array holds complex64 values; fix:"),
    ],
)
def test_stylize_refuses_what_is_not_an_image_in_one_line(tmp_path, content, says):
    with pytest.raises(UserError, match=says) as err:
        nst_exp.stylize(content, output_dir=tmp_path / "run", image={"size": 32})
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stylize_with_paths_and_overrides(tmp_path, photo, painting):
    result = nst_exp.stylize(
        photo,
        str(painting),
        output_dir=tmp_path / "run",
        return_result=True,
        overrides=["image.size=32", "trainer.max_steps=2", "optimizer=adam", "logging.progress_bar=false"],
    )
    assert result.status == "completed" and result.image.size == (32, 22)
    assert result.metrics["result/steps"] == 2
    assert (tmp_path / "run" / "config.yaml").read_text().count("adam") == 1


def test_an_override_hydra_cannot_read_is_one_line_with_the_whole_value_quoted(tmp_path):
    with pytest.raises(UserError, match=r"fix: quote the value, e.g. content.path='/photos/a,café.jpg'$") as err:
        nst_exp.stylize(overrides=["content.path=/photos/a,café.jpg"], output_dir=tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
