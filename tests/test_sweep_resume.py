"""Resumable sweeps, for real: a sweep's driver (and its workers) SIGKILLed mid-sweep, then
``resume=<sweep folder>``: finished jobs are kept, interrupted ones continue from last.ckpt, failed
ones run again, and every job's steps are in its logs exactly once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ASSETS, run_cli
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from nst_exp.errors import UserError
from nst_exp.sweep.resume import sweep_command
from nst_exp.sweep.summary import collect_jobs

STEPS = (6, 80, 80)  # the short first job finishes while the others still run (for a while: fp32 steps at 32 px are quick)
SWEEP = [
    "image.size=32",
    f"trainer.max_steps={','.join(map(str, STEPS))}",
    "trainer.checkpoint_every=2",
    "logging.progress_bar=false",
    "logging.flush_every=1",
    "logging.image_every=5",
    "logging.save_snapshots=true",
]


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (loky workers, submitit's job processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def kill_tree(proc: subprocess.Popen, driver_first: bool = False) -> None:
    """SIGKILL the driver and all its workers: nobody gets to clean up. ``driver_first``: the driver
    alone, then check that resuming is refused while its workers (submitit's jobs) still run. Every
    process is frozen (SIGSTOP) first, so no job gets to finish while the check runs on a busy machine."""
    pids = tree(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    if driver_first:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        sweep = Path(next(a.split("=", 1)[1] for a in proc.args if str(a).startswith("hydra.sweep.dir=")))
        with pytest.raises(UserError, match=r"jobs of this sweep still run \(\d+"):
            sweep_command([f"resume={sweep}"])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids[1:]):
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def raw_steps(run_dir: Path, tag: str = "loss/total") -> list[int]:
    """Every step at which ``tag`` was written, over all of the run's event files as stored (no reader's purging)."""
    steps = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def summary_sheets(sweep: Path) -> int:
    """Contact sheets in the sweep's ``_summary`` TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sweep / "_summary"), size_guidance={"images": 0})
    acc.Reload()
    return len(acc.Images("sweep/contact_sheet"))


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()), key=lambda p: int(p.name.split("_")[0]))


def kill_mid_sweep(cwd: Path, sweep: Path, args: list[str], driver_first: bool = False) -> tuple[Path, int]:
    """Start the sweep, SIGKILL it (workers too) once a job has finished while another is between
    checkpoints; returns that interrupted job's folder and its checkpoint's step."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nst_exp", "run", "-m", *args, f"hydra.sweep.dir={sweep}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 400
    interrupted = None
    try:
        while time.time() < deadline and proc.poll() is None:
            jobs = job_dirs(sweep) if sweep.is_dir() else []
            done = [j for j in jobs if (j / "result.json").is_file()]
            going = [j for j in jobs if (j / "last.ckpt").is_file() and not (j / "result.json").is_file()]
            if done and going:
                interrupted = going[0]
                time.sleep(0.5)  # a few steps past the checkpoint: the logs hold steps the resumed job writes again
                break
            time.sleep(0.1)
    finally:
        kill_tree(proc, driver_first and interrupted is not None)
    assert interrupted is not None, f"the sweep never had a finished and a running job: {proc.stderr.read()[-2000:]}"
    assert not (interrupted / "result.json").is_file(), "the job finished before the kill"
    return interrupted, torch.load(interrupted / "last.ckpt", weights_only=True)["logged_step"]


def check_whole_sweep(sweep: Path, kept: dict[Path, str], resumed: Path, ckpt_step: int) -> None:
    jobs = collect_jobs([sweep])
    assert [j.status for j in jobs] == ["completed"] * len(STEPS)
    for job, steps in zip(jobs, STEPS):
        assert job.metrics["result/steps"] == steps
        assert raw_steps(job.path) == list(range(steps)), job.path.name  # every step exactly once, as stored
        assert raw_steps(job.path, "result/loss_total") == [steps]  # one final metric (not one per attempt)
        snapshots = sorted(int(p.stem[5:]) for p in (job.path / "snapshots").glob("step_*.png"))
        assert snapshots == list(range(5, steps + 1, 5)), job.path.name
        assert not (job.path / "last.ckpt").exists()
    for path, text in kept.items():
        assert (path / "result.json").read_text() == text  # kept, not run again
    files = sorted(resumed.glob("events.out.tfevents.*"))
    assert len(files) == 2  # the first attempt's, trimmed to the checkpoint, and the continuation's
    first_resumed = next(e.step for e in EventFileLoader(str(files[1])).Load() if any(v.tag == "loss/total" for v in e.summary.value))
    assert first_resumed == ckpt_step  # continued from last.ckpt, not started over
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["completed"] * len(STEPS)
    assert Image.open(sweep / "contact_sheet.png").width > 0
    assert summary_sheets(sweep) == 1  # one contact sheet in TensorBoard, of all jobs


@pytest.mark.parametrize("launcher", ["basic", "parallel", "submitit_local"])
def test_killed_sweep_resumes_every_job_once(tmp_path, launcher):
    """The driver (and, for joblib and submitit, its workers) SIGKILLed mid-sweep; ``resume=`` runs the rest."""
    plugin = {"parallel": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher"}
    if launcher in plugin:
        pytest.importorskip(plugin[launcher])
    extra = [] if launcher == "basic" else [f"launcher={launcher}"]
    loggers = ["logging.loggers=[tensorboard,csv]"] if launcher == "basic" else []
    sweep = tmp_path / "sweep"
    # submitit's local jobs outlive their driver: resuming is refused until they are gone too
    interrupted, ckpt_step = kill_mid_sweep(tmp_path, sweep, [*SWEEP, *extra, *loggers], driver_first=launcher == "submitit_local")
    kept = {j: (j / "result.json").read_text() for j in job_dirs(sweep) if (j / "result.json").is_file()}
    proc = run_cli(["run", f"resume={sweep}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sweep:       {len(STEPS)} jobs, {len(STEPS)} completed" in proc.stdout
    if launcher != "submitit_local":  # submitit's jobs print into their own log files
        assert all(f"done already: {j}" in proc.stdout for j in kept)
    check_whole_sweep(sweep, kept, interrupted, ckpt_step)
    if loggers:
        rows = list(csv.DictReader((interrupted / "csv" / "metrics.csv").open()))
        counts = Counter(int(r["step"]) for r in rows if r["loss/total"])
        assert sorted(counts) == list(range(STEPS[1])) and set(counts.values()) == {1}


def test_failed_job_runs_again_on_resume(tmp_path):
    """A job that failed (a cut-off style image) runs again once the file is mended; the good one is kept."""
    cut = tmp_path / "late.jpg"
    Image.open(ASSETS / "starry_night.jpg").convert("RGB").resize((64, 51)).save(cut, quality=95)
    good = cut.read_bytes()
    cut.write_bytes(good[: len(good) // 2])
    sweep = tmp_path / "sweep"
    args = [
        "run",
        "-m",
        f"style.path=builtin:starry_night.jpg,{cut}",
        "image.size=32",
        "trainer.max_steps=3",
        "logging.progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1 and "2 jobs, 1 completed, 1 failed" in proc.stdout
    cut.write_bytes(good)
    first = job_dirs(sweep)[0]
    kept = (first / "result.json").read_text()
    proc = run_cli(["run", f"resume={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sweep:       2 jobs, 2 completed" in proc.stdout and f"done already: {first}" in proc.stdout
    assert (first / "result.json").read_text() == kept
    assert [j.status for j in collect_jobs([sweep])] == ["completed", "completed"]
    assert summary_sheets(sweep) == 1  # the new summary replaced the first
