"""The CLI end to end at tiny size: a real subprocess run, its PNG, its TensorBoard events, its errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, run_cli, run_dirs

from nst_exp.model.layers import GATYS_STYLE_LAYERS as STYLE_LAYERS


def load_events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_cli(["run", "style=starry_night", *TINY], cwd)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(cwd / "outputs")
    return run_dir, proc


def test_run_writes_png_config_and_result(default_run):
    run_dir, proc = default_run
    image = Image.open(run_dir / "final.png")
    assert image.mode == "RGB" and max(image.size) == 48
    assert image.size == (48, 32)  # chelsea is 451x300
    assert (run_dir / "config.yaml").read_text().count("starry_night") >= 1
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["hp/steps"] == 8
    assert f"tensorboard --logdir {run_dir}" in proc.stdout
    assert str(run_dir / "final.png") in proc.stdout


def test_nothing_written_outside_run_folder(default_run):
    run_dir, _ = default_run
    cwd = run_dir.parents[3]
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    assert not list(cwd.rglob("lightning_logs")) and not list(cwd.rglob("checkpoints"))


def test_event_file_tags_and_loss_fell(default_run):
    run_dir, _ = default_run
    acc = load_events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/content", "loss/style", "loss/tv", "loss/content/relu4_2"}
    expected |= {f"loss/style/{layer}" for layer in STYLE_LAYERS}
    assert expected <= scalars
    total = acc.Scalars("loss/total")
    assert [e.step for e in total] == list(range(8))  # every step, once
    assert total[-1].value < total[0].value
    images = set(acc.Tags()["images"])
    assert {"input/content", "input/style_0", "image/generated", "image/final"} <= images
    assert [e.step for e in acc.Images("image/generated")] == [4, 8]


def test_hparams_logged_with_final_metrics(default_run):
    run_dir, _ = default_run
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = load_events(run_dir)
    content = acc.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = data.session_start_info.hparams
    assert hparams["loss.style_weight"].number_value > 0
    assert hparams["style.name"].string_value == "starry_night"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"hp/loss_total", "hp/loss_style", "hp/eval_style", "hp/wall_time_s", "hp/steps"} <= metric_tags
    final = acc.Scalars("hp/loss_total")  # a NaN placeholder at step 0, then the final value
    assert final[-1].step == 8 and math.isfinite(final[-1].value)


def test_user_images(tmp_path, photo, painting):
    proc = run_cli(["run", f"content.path={photo}", f"style.path={painting}", *TINY, "trainer.max_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert Image.open(run_dir / "final.png").size == (48, 32)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("content.path=/no/such/photo.jpg", ["content image not found", "/no/such/photo.jpg", "fix:"]),
        ("style=nope", ["unknown style preset 'nope'", "starry_night", "fix:"]),
        ("loss.style_layers=[relu1_1,relu9_1]", ["unknown style layer 'relu9_1'", "relu1_1 ", "pool5"]),
        ("image.size=0", ["image.size must be a positive number", "fix:"]),
        ("trainer.max_steps=-3", ["trainer.max_steps must be a positive number"]),
        ("image.size=large", ["bad value in 'image.size=large'", "Integer", "fix:"]),
        ("model.padding=mirror", ["bad value in 'model.padding=mirror'", "reflect", "fix:"]),
    ],
)
def test_bad_input_one_line(tmp_path, override, needles):
    proc = run_cli(["run", *TINY, override], tmp_path)
    _assert_one_line_error(proc, *needles)


def test_not_an_image_file(tmp_path):
    bad = tmp_path / "painting.jpg"
    bad.write_text("this is not a jpeg")
    proc = run_cli(["run", f"style.path={bad}", *TINY], tmp_path)
    _assert_one_line_error(proc, "style file is not an image", str(bad))


def test_unknown_key_fails_at_start(tmp_path):
    proc = run_cli(["run", "loss.stlye_weight=3", *TINY], tmp_path)
    _assert_one_line_error(proc, "unknown config key 'loss.stlye_weight'", "fix: did you mean loss.style_weight?")
    assert not (tmp_path / "outputs").exists() or not run_dirs(tmp_path / "outputs")


def test_bad_sweep_value_fails_before_any_job(tmp_path):
    proc = run_cli(["run", "-m", "image.size=32,big", *TINY], tmp_path)
    _assert_one_line_error(proc, "bad value in 'image.size=big'", "fix:")
    assert not (tmp_path / "multirun").exists() or not run_dirs(tmp_path / "multirun")


def test_help_lists_groups(tmp_path):
    proc = run_cli(["run", "--help"], tmp_path)
    assert proc.returncode == 0
    for group in ("content", "style", "model", "loss", "optimizer", "trainer", "logging"):
        assert f"{group}:" in proc.stdout


def test_ctrl_c_saves_latest_image(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["run", "image.size=48", "trainer.max_steps=100000", "logging.progress_bar=false", "logging.flush_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "nst_exp", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    events: list[Path] = []
    while time.time() < deadline and not events:  # wait until steps are being logged
        time.sleep(0.5)
        events = [p for p in tmp_path.rglob("events.out.tfevents*") if p.stat().st_size > 20000]
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    assert Image.open(run_dir / "final.png").size == (48, 32)
    assert f"latest image is saved at {run_dir / 'final.png'}" in err


def test_interrupt_loses_no_snapshot(tmp_path):
    """Snapshots reach the host a batch late (the copy never waits): Ctrl-C still writes the last one staged."""
    import pytorch_lightning as pl

    from nst_exp.run import runner
    from nst_exp.api import compose_config

    class CtrlCAtStep5(pl.Callback):  # joins after the run's own callbacks, so step 5's snapshot is staged
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 5:
                raise KeyboardInterrupt

    cfg = compose_config(["image.size=32", "trainer.max_steps=50", "logging.image_every=1", "logging.save_snapshots=true",
                          "logging.progress_bar=false", "trainer.accelerator=cpu"])
    result = runner.run(cfg, tmp_path / "run", extra_callbacks=(CtrlCAtStep5(),))
    assert result.status == "interrupted" and result.metrics["hp/steps"] == 5
    pngs = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "run" / "snapshots").glob("step_*.png"))
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    acc.Reload()
    assert pngs == [e.step for e in acc.Images("image/generated")] == [1, 2, 3, 4, 5]


def test_nan_loss_stops_and_keeps_last_good_image(tmp_path):
    # Adam with an absurd learning rate on a huge style weight overflows to inf/NaN quickly.
    proc = run_cli(["run", *TINY, "optimizer=adam", "optimizer.lr=1e30", "loss.style_weight=1e30",
                    "trainer.max_steps=50", "logging.flush_every=1"], tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "NaN/inf" in proc.stderr and "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "diverged"
    assert Image.open(run_dir / "final.png").size == (48, 32)


def test_cfg_prints_the_composed_config_and_hydra_judges_its_overrides(tmp_path):
    """``run --cfg job`` goes to Hydra untouched by the override checks: it prints the config with
    the overrides applied, and a wrong key still fails (Hydra's own error) instead of printing."""
    proc = run_cli(["run", "--cfg", "job", "image.size=64", "optimizer=adam"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    import yaml

    printed = yaml.safe_load(proc.stdout)
    assert printed["image"]["size"] == 64 and printed["optimizer"]["name"] == "adam"
    assert {"content", "style", "model", "loss", "optimizer", "trainer", "logging", "objective"} <= set(printed)
    assert not (tmp_path / "outputs").exists()  # printing the config runs nothing
    bad = run_cli(["run", "--cfg", "job", "no.such=key"], tmp_path)
    assert bad.returncode != 0 and "no.such" in bad.stderr
