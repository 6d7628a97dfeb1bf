"""Sweeps for real: Hydra multirun via the CLI, folder names, TensorBoard HPARAMS, contact sheet,
summaries, a failing job among good ones, compare, Optuna, the joblib/submitit launchers, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli, run_dirs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from nst_exp.run.metrics import HPARAM_METRICS
from nst_exp.sweep.naming import MAX_LEN, job_dirname
from nst_exp.sweep.summary import TILE, collect_jobs, grid_layout, swept_keys

FAST = ["image.size=32", "trainer.max_steps=3", "logging.progress_bar=false", "logging.image_every=2", "logging.flush_every=2"]


def sweep_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / "multirun").glob("*/*") if p.is_dir())


def hparams_of(run_dir: Path) -> tuple[dict, set[str], dict[str, float]]:
    """A run's HPARAMS session (its hyperparameters), the tags of the experiment it is in, and every
    ``result/*`` scalar of the run (the table's metric values) as (step, value) lists."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" not in content  # per-run experiments would hide what the sweep varied
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    metrics = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("result/")}
    return dict(start.hparams), set(content), metrics


def sweep_experiment(sweep: Path) -> api_pb2.Experiment:
    acc = EventAccumulator(str(sweep / "_summary"), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    return plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment


def test_job_dirname_is_safe_and_short():
    assert job_dirname(["style=hubble", "loss.style_weight=1e4"]) == "style=hubble_deep_field,style_weight=1e4"  # the image used
    assert job_dirname(["content.path=/home/me/My Photos/cat.jpg"]) == "content=cat"
    assert job_dirname(["style.path=builtin\\:starry_night.jpg", "loss.style_layers=[relu1_1,relu2_1]"]) == (
        "style=starry_night,style_layers=-relu1_1,relu2_1"
    )
    name = job_dirname([f"loss.w{i}=12345.6789" for i in range(40)])
    assert len(name) <= MAX_LEN and "/" not in name
    assert job_dirname([f"loss.w{i}=1" for i in range(40)]) != job_dirname([f"loss.w{i}=2" for i in range(40)])
    assert job_dirname(["logging.image_every=5"]) == "default"
    for seed in ("${hydra:job.num}", "$\\{hydra\\:job.num\\}"):  # as typed, and as Hydra hands it to the folder's resolver
        assert job_dirname([f"seed={seed}", "loss.style_weight=10"]) == "seed=job.num,style_weight=10"  # was "seed=-"


def test_folder_names_keep_letters_of_any_script_and_drop_what_is_unsafe():
    from nst_exp.labels import MAX_PART, run_label, safe_part

    assert job_dirname(["content.path=/home/me/Été/plage à Nice.jpg"]) == "content=plage-à-Nice"
    assert run_label("crème brûlée", "Mondrian", "café") == "café_crème-brûlée_Mondrian"
    assert safe_part("cafe\u0301") == "café"  # decomposed é (macOS file names): one letter again
    assert safe_part('a/b\\c\x00d\ne:f*g?"h') == "a-b-c-d-e-f-g-h"  # separators, control characters, Windows' reserved
    assert len(safe_part("é" * 100).encode()) <= MAX_PART  # a file name's limit is in bytes
    long = job_dirname([f"loss.w{i}=é" for i in range(40)])
    assert len(long.encode()) <= MAX_LEN and long.endswith(tuple("0123456789abcdef"))


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["run", "-m", "style=starry_night,hubble", "loss.style_weight=5,50", *FAST], cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = sweep_dirs(cwd)
    return sweep, proc


@pytest.mark.slow
def test_multirun_one_folder_named_jobs(grid_sweep):
    sweep, proc = grid_sweep
    names = sorted(p.name for p in run_dirs(sweep))
    assert names == [
        "0_style=starry_night,style_weight=5,size=32,max_steps=3",
        "1_style=starry_night,style_weight=50,size=32,max_steps=3",
        "2_style=hubble_deep_field,style_weight=5,size=32,max_steps=3",
        "3_style=hubble_deep_field,style_weight=50,size=32,max_steps=3",
    ]
    assert (
        "sweep:       4 jobs, 4 completed\n" in proc.stdout and f"tensorboard --logdir {sweep.relative_to(sweep.parents[3])}" in proc.stdout
    )


@pytest.mark.slow
def test_hparams_complete_for_every_run(grid_sweep):
    """Every run: the same hyperparameter keys, labels of the images really used, and each final metric
    once, at the last step (no NaN placeholder at step 0 in the SCALARS charts)."""
    sweep, _ = grid_sweep
    seen_keys, styles = None, set()
    for run in run_dirs(sweep):
        hparams, _, metrics = hparams_of(run)
        seen_keys = seen_keys or set(hparams)
        assert set(hparams) == seen_keys  # same keys in every run
        styles.add((hparams["style.name"].string_value, hparams["loss.style_weight"].number_value))
        assert hparams["content.name"].string_value == "chelsea" and hparams["experiment"].string_value == "none"
        assert set(metrics) == set(HPARAM_METRICS)
        for tag, points in metrics.items():
            assert len(points) == 1 and points[0][0] == 3 and math.isfinite(points[0][1]), tag
        assert metrics["result/steps"][0][1] == 3
    assert styles == {("starry_night", 5.0), ("starry_night", 50.0), ("hubble_deep_field", 5.0), ("hubble_deep_field", 50.0)}


@pytest.mark.slow
def test_sweep_experiment_lists_swept_keys_first_and_final_metrics(grid_sweep):
    sweep, _ = grid_sweep
    experiment = sweep_experiment(sweep)
    names = [h.name for h in experiment.hparam_infos]
    # only what the sweep varied: TensorBoard ticks the first five columns, so constant keys are left out
    assert names == ["loss.style_weight", "style.name", "style.path"] and all(h.differs for h in experiment.hparam_infos)
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    assert list(HPARAM_METRICS)[:3] == ["result/objective", "result/eval_style", "result/eval_content"]


def test_tensorboard_opens_on_the_loss_curves(grid_sweep):
    """TensorBoard groups tags by the part before the first "/" and lists (and, in TIME SERIES, opens
    the first two of) those groups in name order: a job's loss curves come first, then its images,
    and its one-point final metrics (``result/*``) after the curves."""
    sweep, _ = grid_sweep
    acc = EventAccumulator(str(run_dirs(sweep)[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalar_groups = sorted({tag.split("/", 1)[0] for tag in acc.Tags()["scalars"]})
    image_groups = sorted({tag.split("/", 1)[0] for tag in acc.Tags()["images"]})
    assert scalar_groups == ["loss", "perf", "result"]
    assert sorted(scalar_groups + image_groups)[:2] == ["loss", "output"]
    assert set(HPARAM_METRICS) <= set(acc.Tags()["scalars"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_hparams_show_swept_first_and_every_job(grid_sweep):
    """A real TensorBoard on loopback, through the HTTP API its HPARAMS tab uses: the swept parameters are
    the table's columns (the tab ticks the first five), the objective and the evaluator's distances its
    first metric columns, one row per job."""
    sweep, _ = grid_sweep
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/hparams"
    try:
        deadline, experiment = time.time() + 90, None
        while time.time() < deadline and experiment is None:
            try:
                experiment = _post(f"{base}/experiment", {"experimentName": ""})
            except OSError:
                time.sleep(0.5)
        assert experiment is not None, "TensorBoard did not answer"
        names = [h["name"] for h in experiment["hparamInfos"]]
        assert names == ["loss.style_weight", "style.name", "style.path"]  # what the sweep varied, and nothing else
        assert [m["name"]["tag"] for m in experiment["metricInfos"]][:3] == ["result/objective", "result/eval_style", "result/eval_content"]
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == list(HPARAM_METRICS)
        groups = _post(
            f"{base}/session_groups",
            {
                "experimentName": "",
                "startIndex": 0,
                "sliceSize": 100,
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                "colParams": [],
            },
        )["sessionGroups"]
        assert len(groups) == 4
        for group in groups:
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert set(values) == set(HPARAM_METRICS) and all(math.isfinite(v) for v in values.values())
        rows = {(g["hparams"]["style.name"], g["hparams"]["loss.style_weight"]) for g in groups}
        assert rows == {("starry_night", 5.0), ("starry_night", 50.0), ("hubble_deep_field", 5.0), ("hubble_deep_field", 50.0)}
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_contact_sheet_and_summary(grid_sweep):
    sweep, _ = grid_sweep
    jobs = collect_jobs([sweep])
    assert swept_keys(jobs) == ["style", "loss.style_weight"]
    grid, rows, cols = grid_layout(jobs, swept_keys(jobs))
    assert (len(grid), len(grid[0])) == (2, 2) and rows == ["style=starry_night", "style=hubble_deep_field"]
    sheet = Image.open(sweep / "contact_sheet.png")
    assert sheet.width >= 2 * TILE and sheet.height >= 2 * TILE + TILE // 2  # inputs row + 2x2 tiles
    with (sweep / "summary.csv").open() as fh:
        rows_csv = list(csv.DictReader(fh))
    assert len(rows_csv) == 4 and {r["status"] for r in rows_csv} == {"completed"}
    assert all(float(r["result/eval_style"]) > 0 and (sweep / r["image"]).is_file() for r in rows_csv)
    assert (sweep / "summary.md").read_text().count("| completed |") == 4
    acc = EventAccumulator(str(sweep / "_summary"))
    acc.Reload()
    assert "sweep/contact_sheet" in acc.Tags()["images"]


@pytest.mark.slow
def test_failed_job_does_not_stop_sweep(tmp_path):
    """A file whose header reads but whose pixels do not (a cut-off JPEG) fails in its job only."""
    cut = tmp_path / "cut_painting.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # the header and half the pixels
    proc = run_cli(["run", "-m", f"style.path=builtin:starry_night.jpg,{cut}", *FAST], tmp_path, timeout=600)
    assert proc.returncode == 1  # the sweep finished, but says a job failed
    assert "sweep:       2 jobs, 1 completed, 1 failed" in proc.stdout
    (sweep,) = sweep_dirs(tmp_path)
    with (sweep / "summary.csv").open() as fh:
        rows = {r["job"]: r for r in csv.DictReader(fh)}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "cannot read style image" in failed[0]["error"]
    assert failed[0]["style"] == "cut_painting" and failed[0]["job"] == "1_style=cut_painting,size=32,max_steps=3"
    assert [r["status"] for r in rows.values()].count("completed") == 1


@pytest.mark.slow
def test_compare_any_runs(tmp_path, grid_sweep, capsys):
    from nst_exp.__main__ import main

    sweep, _ = grid_sweep
    runs = run_dirs(sweep)[:3]
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0  # in-process, as the command runs it
    assert "runs:          3 (0 failed)" in capsys.readouterr().out
    with (out / "summary.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert Image.open(out / "contact_sheet.png").width >= 2 * TILE


def test_compare_writes_into_a_sweep_folder_and_never_into_a_folder_of_the_user_s(tmp_path, grid_sweep, monkeypatch, capsys):
    """Without --out, a sweep's summary goes into its folder; a folder of the user's holding runs (with a
    summary.csv of their own) is only read: the summary goes to outputs/compare/<time> in the cwd."""
    from nst_exp.__main__ import main

    sweep, _ = grid_sweep
    mine = tmp_path / "my_picks"
    for run in run_dirs(sweep)[:2]:
        shutil.copytree(run, mine / run.name)
    (mine / "summary.csv").write_text("my own notes\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(mine)]) == 0
    assert (mine / "summary.csv").read_text() == "my own notes\n"
    assert sorted(p.name for p in mine.iterdir()) == sorted(["summary.csv", *(r.name for r in run_dirs(sweep)[:2])])
    written = list((tmp_path / "outputs" / "compare").rglob("summary.csv"))
    assert len(written) == 1 and "runs:          2 (0 failed)" in capsys.readouterr().out
    assert main(["compare", str(sweep)]) == 0 and (sweep / "summary.csv").is_file()


@pytest.mark.slow
def test_local_launchers_run_side_by_side_and_two_sweeps_in_the_same_second_do_not_share_a_folder(tmp_path):
    """joblib's and submitit's local launchers each run their jobs to the end; started at the same moment
    from the same folder, the two sweeps get a folder each."""
    for plugin in ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"):
        pytest.importorskip(plugin)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "nst_exp", "run", "-m", "loss.style_weight=5,50", *FAST]
    procs = {
        launcher: subprocess.Popen(
            [*cmd, f"launcher={launcher}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for launcher in ("parallel", "submitit_local")
    }
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    sweeps = sweep_dirs(tmp_path)
    assert len(sweeps) == 2
    launchers = set()
    for sweep in sweeps:
        launchers.add(
            next(
                o for o in yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["overrides"]["task"] if o.startswith("launcher=")
            )
        )
        jobs = collect_jobs([sweep])
        assert [j.status for j in jobs] == ["completed", "completed"]
        assert [j.path.name for j in jobs] == ["0_style_weight=5,size=32,max_steps=3", "1_style_weight=50,size=32,max_steps=3"]
        assert [j.metrics["result/steps"] for j in jobs] == [3, 3]
        with (sweep / "summary.csv").open() as fh:
            assert [r["status"] for r in csv.DictReader(fh)] == ["completed", "completed"]
        assert Image.open(sweep / "contact_sheet.png").width >= 2 * TILE  # both jobs' tiles
    assert launchers == {"launcher=parallel", "launcher=submitit_local"}


def _steps(run_dir: Path) -> list[int]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("loss/total")]


@pytest.mark.slow
def test_resume_by_hand_continues_the_curve(tmp_path):
    proc = run_cli(["run", *FAST, "trainer.max_steps=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path / "outputs")  # resume= with nothing left to do: tests/test_records.py
    proc = run_cli(["run", f"resume={run}", "trainer.max_steps=7"], tmp_path)  # the total, as for a checkpoint
    assert proc.returncode == 0, proc.stderr
    assert run_dirs(tmp_path / "outputs") == [run]  # continued in its own folder
    assert _steps(run) == list(range(7))
    assert json.loads((run / "result.json").read_text())["metrics"]["result/steps"] == 7


@pytest.mark.slow
def test_every_checkpoint_has_its_steps_on_disk(tmp_path):
    """A kill right after a checkpoint loses no scalars: the event file already holds every step it covers."""
    import pytorch_lightning as pl
    import torch

    from nst_exp.api import compose_config
    from nst_exp.run import runner

    seen: list[tuple[int, list[int]]] = []

    class AfterCheckpoint(pl.Callback):  # runs after the Checkpointer in the same batch-end hook
        def on_train_batch_end(self, *args) -> None:
            ckpt = tmp_path / "run" / "last.ckpt"
            if ckpt.is_file():
                done = torch.load(ckpt, weights_only=True)["stage_step"]
                if not seen or seen[-1][0] != done:
                    seen.append((done, _steps(tmp_path / "run")))

    cfg = compose_config(
        [
            "image.size=32",
            "trainer.max_steps=10",
            "trainer.checkpoint_every=3",
            "logging.flush_every=2",
            "logging.progress_bar=false",
            "trainer.accelerator=cpu",
        ]
    )
    runner.run(cfg, tmp_path / "run", extra_callbacks=(AfterCheckpoint(),))
    assert [done for done, _ in seen] == [3, 6, 9]
    for done, steps in seen:
        assert steps == list(range(done))


@pytest.mark.slow
def test_killed_job_rerun_in_its_folder_resumes_from_checkpoint(tmp_path):
    """What a requeued (pre-empted) cluster job does: the same command, the same folder, a last.ckpt."""
    run = tmp_path / "outputs" / "job"
    args = [
        "run",
        f"hydra.run.dir={run}",
        "image.size=32",
        "trainer.max_steps=400",
        "trainer.checkpoint_every=3",
        "logging.progress_bar=false",
        "logging.flush_every=1",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nst_exp", *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "last.ckpt").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)  # pre-emption: no chance to clean up
    proc.wait()
    assert (run / "last.ckpt").is_file() and not (run / "result.json").is_file()
    import torch

    done = torch.load(run / "last.ckpt", weights_only=True)["stage_step"]
    assert done >= 3 and done % 3 == 0
    proc = run_cli(args[:3] + ["trainer.max_steps=" + str(done + 4)] + args[4:], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["result/steps"] == done + 4
    steps = _steps(run)
    assert steps == list(range(done + 4))  # one continuous curve: the steps logged after the checkpoint were cut back
    assert not (run / "last.ckpt").exists()


def test_captions_name_files_by_stem_and_never_cut_mid_word(tmp_path):
    from nst_exp.sweep.summary import CAPTION_WIDTH, Job, _caption

    long_path = "/home/me/photos/holiday/an_extremely_long_photo_file_name_from_my_camera_2026_11_25.png"
    job = Job(
        tmp_path,
        "completed",
        None,
        {"result/eval_style": 0.2, "result/eval_content": 0.9, "result/loss_total": 3.0, "result/wall_time_s": 10.0},
        overrides=[f"content.path={long_path}", "loss.style_weight=20", "style=hubble"],
    )
    lines = _caption(job, ["content.path", "loss.style_weight", "style"])
    assert all(len(line) <= CAPTION_WIDTH for line in lines)
    assert lines[0].startswith("content=an_extremely_long_photo") and lines[0].endswith("…")  # one word: shortened, not split
    assert lines[1] == "style_weight=20 …"  # whole words; the rest (style=...) does not fit two lines
    assert _caption(job, ["style"])[0] == "style=hubble_deep_field"
