"""The CLI end to end at tiny size: a real subprocess run, its PNG, its TensorBoard events, its errors."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, run_cli, run_dirs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


@pytest.mark.slow
def test_run_writes_png_config_and_result(default_run):
    run_dir, proc = default_run
    image = Image.open(run_dir / "final.png")
    assert image.mode == "RGB" and max(image.size) == 48
    assert image.size == (48, 32)  # chelsea is 451x300
    assert (run_dir / "config.yaml").read_text().count("starry_night") >= 1
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["result/steps"] == 8
    assert f"tensorboard --logdir {run_dir}" in proc.stdout
    assert str(run_dir / "final.png") in proc.stdout


@pytest.mark.slow
def test_nothing_written_outside_run_folder(default_run):
    run_dir, _ = default_run
    cwd = run_dir.parents[3]
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    assert not list(cwd.rglob("lightning_logs")) and not list(cwd.rglob("checkpoints"))


@pytest.mark.slow
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
    assert {"source/content", "source/style_0", "output/generated", "output/final"} <= images
    assert [e.step for e in acc.Images("output/generated")] == [4, 8]


@pytest.mark.slow
def test_hparams_logged_with_final_metrics(default_run):
    """A session with the labels of the images used; the final metrics once, at the last step (no NaN
    placeholder at step 0); no per-run experiment (TensorBoard builds one from all runs)."""
    run_dir, _ = default_run
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = load_events(run_dir)
    content = acc.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = data.session_start_info.hparams
    assert hparams["loss.style_weight"].number_value > 0
    assert hparams["style.name"].string_value == "starry_night" and hparams["content.name"].string_value == "chelsea"
    assert "_hparams_/experiment" not in content and "_hparams_/session_end_info" in content
    for tag in ("result/loss_total", "result/loss_style", "result/eval_style", "result/wall_time_s", "result/steps"):
        assert [(e.step, math.isfinite(e.value)) for e in acc.Scalars(tag)] == [(8, True)]


@pytest.mark.slow
def test_console_is_clean(default_run):
    """Steps, not Lightning's epochs; no SLURM hint outside a SLURM job; no empty log file in the run folder."""
    run_dir, proc = default_run
    console = proc.stdout + proc.stderr
    for noise in ("Training:", "Epoch", "srun", "Traceback", "LOCAL_RANK"):
        assert noise not in console
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        "config.yaml",
        next(run_dir.glob("events*")).name,
        "final.png",
        "provenance.yaml",
        "result.json",
    ]


@pytest.mark.slow
def test_user_images_are_used_and_labelled_by_their_file_names(tmp_path, photo, noise_image):
    """content.path=/x/photo.png, style.path=/x/noise.png: the run reads those files (TensorBoard's source
    images are them, at the first stage's size) and is labelled 'photo' and 'noise' (not the presets' cat and
    Van Gogh) in the folder, result.json and HPARAMS; experiment=fast is named too. config.yaml keeps what
    was asked (no label written back into it)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    from nst_exp.images import load_tensor, tensor_to_pil

    proc = run_cli(
        [
            "run",
            f"content.path={photo}",
            f"style.path={noise_image}",
            "experiment=fast",
            "image.multiscale_sizes=[32,40]",
            "image.multiscale_steps=[1,1]",
            *TINY,
            "trainer.max_steps=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert run_dir.name.endswith("_fast_photo_noise")
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["content"], result["style"], result["experiment"]) == ("photo", "noise", "fast")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["content"]["name"] is None and config["style"]["name"] is None
    assert config["content"]["path"] == str(photo) and config["style"]["path"] == str(noise_image)
    acc = load_events(run_dir)
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert (hparams["content.name"].string_value, hparams["style.name"].string_value) == ("photo", "noise")
    for tag, path in (("source/content", photo), ("source/style_0", noise_image)):
        logged = np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB"), dtype=int)
        expected = np.asarray(tensor_to_pil(load_tensor(path, 32)), dtype=int)  # logged at the first stage's size
        assert logged.shape == expected.shape and np.abs(logged - expected).max() <= 1, tag
    assert Image.open(run_dir / "final.png").size == (48, 32)


def test_help_lists_groups(tmp_path):
    proc = run_cli(["run", "--help"], tmp_path)
    assert proc.returncode == 0
    for group in ("content", "style", "model", "loss", "optimizer", "trainer", "logging"):
        assert f"{group}:" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_saves_latest_image(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["run", "image.size=48", "trainer.max_steps=100000", "logging.progress_bar=false", "logging.flush_every=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nst_exp", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
    assert any(line.startswith("interrupted: the latest image") for line in err.splitlines())  # on its own line


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_the_rerun_has_every_step_once(tmp_path):
    """SIGTERM (a cluster's cancel or time limit) stops at the next step: last.ckpt there, exit 143, and the
    same command in the same folder (what a requeued job runs) continues with no step twice or missing."""
    run = tmp_path / "outputs" / "job"
    args = [
        "run",
        f"hydra.run.dir={run}",
        "image.size=32",
        "trainer.max_steps=100000",
        "logging.progress_bar=false",
        "logging.flush_every=5",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nst_exp", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in run.glob("events*") if p.stat().st_size > 20000]:
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interruptions"][0]["signal"] == "SIGTERM"
    import torch

    stopped = torch.load(run / "last.ckpt", weights_only=True)["stage_step"]
    assert stopped == result["interruptions"][0]["step"] and stopped > 0
    assert [e.step for e in load_events(run).Scalars("loss/total")] == list(range(stopped))  # flushed, not every 5th
    proc = run_cli(args[:3] + [f"trainer.max_steps={stopped + 3}"] + args[4:], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [e.step for e in load_events(run).Scalars("loss/total")] == list(range(stopped + 3))
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and len(result["interruptions"]) == 1


@pytest.mark.slow
def test_sigterm_after_our_check_is_still_a_checkpointed_sigterm_stop(tmp_path, monkeypatch):
    """A SIGTERM landing after ``StopOnSignal`` looked at a batch is seen first by Lightning's own check
    (SIGTERMException, a SystemExit with code 0): it must still be the same stop, with last.ckpt, the
    result recorded as SIGTERM and JobInterrupted raised (exit 143), not a silent exit 0 without a
    checkpoint. The module's hook runs after the callbacks', so a real signal sent there hits that window."""
    import torch

    from nst_exp.api import compose_config
    from nst_exp.run import runner
    from nst_exp.run.module import StylizeModule
    from nst_exp.run.signals import JobInterrupted

    def sigterm_at_step_3(self, *args) -> None:
        if self.trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(StylizeModule, "on_train_batch_end", sigterm_at_step_3, raising=False)
    cfg = compose_config(["image.size=32", "trainer.max_steps=50", "logging.progress_bar=false", "trainer.accelerator=cpu"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobInterrupted) as stop:
        runner.run(cfg, tmp_path / "run")
    assert stop.value.signal == "SIGTERM" and signal.getsignal(signal.SIGTERM) == before
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interruptions"][0]["signal"] == "SIGTERM"
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["stage_step"] == 3
    assert (tmp_path / "run" / "final.png").is_file()


@pytest.mark.slow
def test_interrupt_loses_no_snapshot(tmp_path):
    """Snapshots reach the host a batch late (the copy never waits): Ctrl-C still writes the last one staged."""
    import pytorch_lightning as pl

    from nst_exp.api import compose_config
    from nst_exp.run import runner

    class CtrlCAtStep5(pl.Callback):  # joins after the run's own callbacks, so step 5's snapshot is staged
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 5:
                raise KeyboardInterrupt

    cfg = compose_config(
        [
            "image.size=32",
            "trainer.max_steps=50",
            "logging.image_every=1",
            "logging.save_snapshots=true",
            "logging.progress_bar=false",
            "trainer.accelerator=cpu",
        ]
    )
    result = runner.run(cfg, tmp_path / "run", extra_callbacks=(CtrlCAtStep5(),))
    assert result.status == "interrupted" and result.metrics["result/steps"] == 5
    pngs = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "run" / "snapshots").glob("step_*.png"))
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    acc.Reload()
    assert pngs == [e.step for e in acc.Images("output/generated")] == [1, 2, 3, 4, 5]


def test_a_checkpoint_follows_the_records_due_at_its_step(tmp_path):
    """A job SIGKILLed right after a periodic checkpoint continues from it and never writes that step's
    snapshot again: the PNG and the TensorBoard image of the checkpoint's step are on disk before last.ckpt."""
    import pytorch_lightning as pl

    from nst_exp.api import compose_config
    from nst_exp.run import runner

    seen: dict[int, tuple[bool, list[int]]] = {}

    class LookWhenCheckpointed(pl.Callback):  # joins after the checkpointer: last.ckpt of this step is written
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if trainer.global_step in (4, 8):
                run = tmp_path / "run"
                acc = EventAccumulator(str(run), size_guidance={"images": 0})
                acc.Reload()
                png = (run / "snapshots" / f"step_{trainer.global_step:06d}.png").is_file()
                seen[trainer.global_step] = (png, [e.step for e in acc.Images("output/generated")])

    cfg = compose_config(
        [
            "image.size=32",
            "trainer.max_steps=10",
            "logging.image_every=4",
            "trainer.checkpoint_every=4",
            "logging.save_snapshots=true",
            "logging.progress_bar=false",
            "trainer.accelerator=cpu",
        ]
    )
    result = runner.run(cfg, tmp_path / "run", extra_callbacks=(LookWhenCheckpointed(),))
    assert result.status == "completed"
    assert seen == {4: (True, [4]), 8: (True, [4, 8])}


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_image(tmp_path):
    # Adam with an absurd learning rate on a huge style weight overflows to inf/NaN quickly.
    proc = run_cli(
        [
            "run",
            *TINY,
            "optimizer=adam",
            "optimizer.lr=1e30",
            "loss.style_weight=1e30",
            "trainer.max_steps=50",
            "logging.flush_every=1",
            "logging.image_every=1",
            "logging.save_snapshots=true",
        ],
        tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    assert "NaN/inf" in proc.stderr and "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "diverged" and "at step 1;" in result["error"]
    # The first step's update already overflows: the last good image is the start, the content image itself.
    from nst_exp.images import load_tensor, tensor_to_pil

    final = np.asarray(Image.open(run_dir / "final.png"), dtype=int)
    assert np.abs(final - np.asarray(tensor_to_pil(load_tensor("builtin:chelsea.png", 48)), dtype=int)).max() <= 1
    # No snapshot of a NaN image (it would be a flat PNG): the diverged step 1 has none, in the folder or in TensorBoard.
    assert sorted((run_dir / "snapshots").glob("step_*.png")) == []
    assert "output/generated" not in load_events(run_dir).Tags()["images"]


@pytest.mark.slow
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


def test_paths_beyond_ascii_on_the_command_line_run_and_resume(tmp_path, photo):
    """A photo and a run folder named with letters Hydra's grammar reads only quoted (café, 星夜), typed
    unquoted as a user would: the run reads them, and resume= continues it in its folder."""
    path = photo.rename(photo.with_name("café 星夜.png"))
    folder = tmp_path / "runs" / "essai_été"
    args = ["run", f"content.path={path}", "image.size=32", "logging.progress_bar=false", "trainer.checkpoint_every=1"]
    first = run_cli([*args, "trainer.max_steps=2", f"hydra.run.dir={folder}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(["run", f"resume={folder}", "trainer.max_steps=3", "logging.progress_bar=false"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["result/steps"] == 3 and result["content"] == "café 星夜"
