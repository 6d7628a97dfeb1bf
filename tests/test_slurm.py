"""The slurm launcher on a real SLURM cluster: pre-emption, time limits and cancellation.

Needs a running cluster with the partitions of ``tools/test_cluster.sh`` (``debug``, and
``urgent`` that pre-empts it; docs/clusters-testing.md). Start one on this machine (root) and run:

    sudo bash tools/test_cluster.sh start && python -m pytest -q tests/test_slurm.py
    sudo bash tools/test_cluster.sh stop

Without a cluster these tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client here"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    parts = {line.split()[0].rstrip("*") for line in out.stdout.splitlines() if line.split()[1:] and line.split()[1] in ("idle", "mix")}
    if out.returncode != 0 or not {"debug", "urgent"} <= parts:
        return f"no idle debug+urgent partitions (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


PROBLEM = _cluster_problem()
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(
        PROBLEM is not None,
        reason=f"no SLURM cluster ({PROBLEM}): start one with `sudo bash tools/test_cluster.sh start` (docs/clusters-testing.md)",
    ),
]

SLURM = [
    "launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.array_parallelism=1",
    "image.size=32",
    "logging.progress_bar=false",
    "logging.flush_every=1",
    "trainer.checkpoint_every=1000",
]


def _steps(run_dir: Path) -> list[int]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("loss/total")]


def _squeue() -> list[tuple[str, str, str]]:
    """(job id, state, reason) of this user's jobs."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %t %r"], capture_output=True, text=True).stdout
    return [tuple(line.split(maxsplit=2)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def _release_requeued() -> None:
    """A requeued job waits ~2 minutes (its BeginTime) before it may start again: let it start now."""
    for job_id, state, reason in _squeue():
        if state == "PD" and "BeginTime" in reason:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def _start_sweep(cwd: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "nst_exp", "run", "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        _release_requeued()
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; squeue: {_squeue()}")


def _sweep_dir(cwd: Path) -> Path:
    (sweep,) = [p for p in (cwd / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    return sweep


def _run_sweep(cwd: Path, args: list[str], meanwhile, timeout: float) -> tuple[int, str, str]:
    """Run a sweep, call ``meanwhile()`` while it runs, and return (exit code, stdout, stderr).
    Whatever happens, no job of it is left on the cluster."""
    proc = _start_sweep(cwd, args)
    try:
        meanwhile()
        _wait_for(lambda: proc.poll() is not None, timeout, "the sweep to finish")
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-u", "root"], capture_output=True)
    return proc.returncode, stdout, stderr


def _job0_training(cwd: Path) -> bool:
    return any(cwd.glob("outputs/multirun/*/*/0_*/events.out.tfevents*"))


JOB0_STEPS = 1500  # ~40 s of 32-px steps on one idle core: long enough to be pre-empted mid-run


def test_preempted_and_timed_out_jobs(tmp_path):
    """Job 0 is pre-empted by a job in the urgent partition, requeued, and completes; job 1 runs into its
    time limit twice (submitit's USR2, 60 s before the 4-minute limit) and ends timed_out once out of
    requeues (max_num_timeout=1; submitit counts job 0's pre-emption as a time-out too, as it does for
    limits of 10 minutes or less). Each stop checkpoints at a step boundary: the curves have every step
    once. The driver waits for the requeued jobs, reports both outcomes and exits 1."""

    def preempt_job0() -> None:
        _wait_for(lambda: _job0_training(tmp_path), 180, "job 0 to start training")
        urgent = subprocess.run(
            ["sbatch", "-p", "urgent", "-c", "2", "--mem=1G", "-o", "/dev/null", "--wrap", "sleep 5"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "Submitted" in urgent.stdout

    returncode, stdout, stderr = _run_sweep(
        tmp_path,
        [
            *SLURM,
            f"trainer.max_steps={JOB0_STEPS},100000",
            "hydra.launcher.timeout_min=4",
            "hydra.launcher.signal_delay_s=60",
            "hydra.launcher.max_num_timeout=1",
        ],
        preempt_job0,
        1200,
    )
    assert returncode == 1, stderr  # one job did not complete
    assert "sweep:       2 jobs, 1 completed, 1 timed_out" in stdout
    sweep = _sweep_dir(tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]  # no extra folders from requeues

    done, timed_out = (json.loads((p / "result.json").read_text()) for p in jobs)
    assert done["status"] == "completed" and done["metrics"]["result/steps"] == JOB0_STEPS
    assert len(done["interruptions"]) >= 1  # the pre-emption (SIGUSR2 or SIGTERM)
    assert _steps(jobs[0]) == list(range(JOB0_STEPS))  # resumed where it stopped: no step twice, none missing

    assert timed_out["status"] == "timed_out" and "not requeued" in timed_out["error"]
    assert [i["signal"] for i in timed_out["interruptions"]] == ["SIGUSR2", "SIGUSR2"]
    steps = _steps(jobs[1])
    assert steps == list(range(len(steps))) and len(steps) >= timed_out["interruptions"][-1]["step"] > 0
    assert (jobs[1] / "last.ckpt").is_file() and (jobs[1] / "final.png").is_file()

    summary = (sweep / "summary.csv").read_text()
    assert ",completed," in summary and ",timed_out," in summary


@pytest.mark.parametrize("shared", [[], ["trainer.devices=2", "image.tile=16"]], ids=["one_task", "two_tasks_sharing_tiles"])
def test_cancelled_job_is_reported_and_fails_the_sweep(tmp_path, shared):
    """``scancel`` (SIGTERM, no requeue): the job checkpoints and exits without a result; the driver
    records it as cancelled (with how to continue it) and exits 1, not 0. With two tasks sharing the
    tiles, task 0 does so and then stops the other one."""

    def cancel_job() -> None:
        _wait_for(lambda: _job0_training(tmp_path), 180, "the job to train")
        time.sleep(2)
        ((job_id, _, _),) = _squeue()
        subprocess.run(["scancel", job_id], check=True)

    returncode, stdout, stderr = _run_sweep(tmp_path, [*SLURM, "trainer.max_steps=100000", *shared], cancel_job, 300)
    assert returncode == 1, stderr
    assert "sweep:       1 jobs, 0 completed, 1 cancelled" in stdout
    (job,) = [p for p in _sweep_dir(tmp_path).iterdir() if p.name.startswith("0_")]
    result = json.loads((job / "result.json").read_text())
    assert result["status"] == "cancelled" and "CANCELLED" in result["error"] and "resume=" in result["error"]
    assert result["interruptions"][0]["signal"] == "SIGTERM"
    assert (job / "last.ckpt").is_file() and (job / "final.png").is_file()
    assert _steps(job) == list(range(result["interruptions"][0]["step"]))  # checkpointed where it stopped
    if shared:  # the helper task was told to stop (it did not die with the job)
        assert any("tile helper 1/2: " in p.read_text() for p in _sweep_dir(tmp_path).glob(".submitit/*/*_log.out"))


def test_job_tasks_share_the_tiles_on_the_cluster(tmp_path):
    """``trainer.devices=2`` on the slurm launcher: one job of two tasks (tasks_per_node follows it),
    joined over torch.distributed (gloo); task 0 runs the job, task 1 evaluates its share of the tiles.
    The job paints the image a one-process run paints."""
    shared = ["image.size=96", "image.tile=48", "trainer.max_steps=4", "trainer.precision=32-true"]
    one = tmp_path / "one"
    alone = subprocess.run(
        [sys.executable, "-m", "nst_exp", "run", *shared, "logging.progress_bar=false", f"hydra.run.dir={one}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 0, alone.stderr
    args = [a for a in SLURM if not a.startswith("image.size=")] + shared + ["trainer.devices=2"]
    returncode, stdout, stderr = _run_sweep(tmp_path, args, lambda: None, 600)
    assert returncode == 0, stderr
    assert "sweep:       1 jobs, 1 completed" in stdout
    sweep = _sweep_dir(tmp_path)
    (job,) = [p for p in sweep.iterdir() if p.name.startswith("0_")]
    logs = [p.read_text() for p in sweep.glob(".submitit/*/*_log.out")]
    assert len(logs) == 2  # two tasks
    assert sum("tile helper 1/2: " in text for text in logs) == 1
    a = np.asarray(Image.open(job / "final.png"), dtype=np.int16)
    b = np.asarray(Image.open(one / "final.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_killed_sweep_resumes_on_the_cluster(tmp_path):
    """The driver SIGKILLed mid-sweep and its jobs cancelled (one finished, one between checkpoints):
    ``resume=<sweep folder>`` keeps the finished job, continues the other from its last.ckpt on the
    cluster, and every step is in its logs once."""
    from test_sweep_resume import job_dirs, kill_tree, raw_steps

    from nst_exp.errors import UserError
    from nst_exp.sweep.resume import sweep_command

    steps = (30, 300)  # job 1: long enough to be caught between checkpoints (every 20 steps)
    sweep = tmp_path / "sweep"
    args = [a for a in SLURM if not a.startswith("trainer.checkpoint_every=")]
    proc = _start_sweep(
        tmp_path, [*args, f"trainer.max_steps={steps[0]},{steps[1]}", "trainer.checkpoint_every=20", f"hydra.sweep.dir={sweep}"]
    )
    try:

        def one_done_one_going() -> bool:
            jobs = job_dirs(sweep) if sweep.is_dir() else []
            return len(jobs) == 2 and (jobs[0] / "result.json").is_file() and (jobs[1] / "last.ckpt").is_file()

        _wait_for(one_done_one_going, 600, "job 0 to finish and job 1 to checkpoint")
        kill_tree(proc)  # the driver: its jobs belong to the cluster and go on
        with pytest.raises(UserError, match="jobs of this sweep still run"):  # resuming beside them is refused
            sweep_command([f"resume={sweep}"])
        subprocess.run(["scancel", "-u", "root"], capture_output=True)  # the workers too
        _wait_for(lambda: not _squeue(), 120, "the cancelled jobs to leave the queue")
        first, second = job_dirs(sweep)
        kept = (first / "result.json").read_text()
        if (second / "result.json").is_file():  # scancel's SIGTERM: checkpointed at a step boundary, "interrupted"
            assert json.loads((second / "result.json").read_text())["status"] != "completed"
        resumed = subprocess.run(
            [sys.executable, "-m", "nst_exp", "run", f"resume={sweep}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""},
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "-u", "root"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sweep:       2 jobs, 2 completed" in resumed.stdout
    assert (first / "result.json").read_text() == kept  # kept, not run again
    for job, n in zip((first, second), steps):
        assert json.loads((job / "result.json").read_text())["metrics"]["result/steps"] == n
        assert raw_steps(job) == list(range(n))  # every step once, as stored
    assert len(list(second.glob("events.out.tfevents.*"))) == 2  # continued (from last.ckpt), not started over


def test_optuna_trials_run_in_parallel_on_the_cluster(tmp_path):
    """An Optuna search on the slurm launcher: two trials of one batch run as SLURM jobs at the same time,
    both report their losses to the sweep folder's SQLite study, and the same command run again
    continues the study without repeating a trial."""
    optuna = pytest.importorskip("optuna")
    from test_optuna import ran_at_once

    sweep = tmp_path / "sweep"
    args = [a for a in SLURM if not a.startswith("hydra.launcher.array_parallelism=")]
    search = [
        "run",
        "hparams_search=adam_optuna",
        f"hydra.sweep.dir={sweep}",
        *args,
        "hydra.launcher.array_parallelism=2",
        "trainer.max_steps=3",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        first = subprocess.run(
            [sys.executable, "-m", "nst_exp", *search], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert first.returncode == 0, first.stderr[-3000:]
        storage = f"sqlite:///{sweep / 'optuna.db'}"
        done = optuna.load_study(study_name="nst_adam", storage=storage).get_trials()
        assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
        assert all(t.intermediate_values for t in done) and ran_at_once(sweep)
        more = [a if a != "hydra.sweeper.n_trials=2" else "hydra.sweeper.n_trials=3" for a in search]
        again = subprocess.run([sys.executable, "-m", "nst_exp", *more], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        subprocess.run(["scancel", "-u", "root"], capture_output=True)
    after = optuna.load_study(study_name="nst_adam", storage=storage).get_trials()
    assert [t.number for t in after] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in after)
    assert [t.params for t in after[:2]] == [t.params for t in done]  # the first two stand, not run again
    assert len([p for p in sweep.iterdir() if p.name[0].isdigit()]) == 3
