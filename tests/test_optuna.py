"""Optuna searches on a real database (the nst_optuna sweeper, docs/optuna.md): the study in an SQLite
file of the sweep folder, continued by the same command; a hopeless trial pruned from its per-step
loss by a real pruner; a real local PostgreSQL server with trials run in parallel; the best trial
marked in the summary and in TensorBoard. Every run is the real CLI at 32 px and a few steps."""

from __future__ import annotations

import csv
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nst_exp.sweep.summary import collect_jobs

optuna = pytest.importorskip("optuna")

TINY = [
    "image.size=32",
    "trainer.max_steps=3",
    "logging.flush_every=1",
    "logging.progress_bar=false",
    "logging.image_every=0",
    "trainer.accelerator=cpu",
]
PRUNE_EARLY = ["hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0"]


def search(tmp_path: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = run_cli(["run", "hparams_search=adam_optuna", f"hydra.sweep.dir={sweep}", *TINY, *overrides], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def trials(storage: str, name: str = "nst_adam") -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def summary_rows(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / "summary.csv").open() as fh:
        return {row["job"]: row for row in csv.DictReader(fh)}


def ran_at_once(sweep: Path) -> bool:
    """Did the sweep's two jobs run at the same time: each wrote its config (at its start) before the
    other wrote its result (at its end)?"""
    jobs = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    started = [(p / "config.yaml").stat().st_mtime for p in jobs]
    ended = [(p / "result.json").stat().st_mtime for p in jobs]
    return len(jobs) == 2 and started[0] < ended[1] and started[1] < ended[0]


def test_the_search_space_is_hydras_sweep_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from nst_exp.sweep.optuna_sweeper import search_space

    params = {
        "optimizer.lr": "tag(log, interval(0.003, 0.2))",
        "loss.style_loss": "choice(gram, mean_cov)",
        "trainer.max_steps": "range(10, 40, 10)",
        "seed": "1",
    }
    fixed, space = search_space(params, ["loss.tv_weight=0,1", "optimizer.lr=0.05"])
    assert fixed == ["seed=1", "optimizer.lr=0.05"]  # the command line fixes a searched key
    assert space == {
        "loss.style_loss": CategoricalDistribution(["gram", "mean_cov"]),
        "trainer.max_steps": IntDistribution(10, 30, step=10),
        "loss.tv_weight": CategoricalDistribution([0, 1]),
    }
    _, space = search_space(params, [])
    assert space["optimizer.lr"] == FloatDistribution(0.003, 0.2, log=True)


def test_the_study_lives_in_sqlite_in_the_sweep_folder_and_the_same_command_continues_it(tmp_path):
    sweep = tmp_path / "sweep"
    first = search(tmp_path, sweep, "hydra.sweeper.n_trials=2")
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    done = trials(storage)
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert all(t.intermediate_values and t.intermediate_values[0] == 1.0 for t in done)  # reported, as loss / first loss
    assert "best trial:  #" in first.stdout
    results = {p: p.stat().st_mtime_ns for p in sweep.glob("*/result.json")}
    assert len(results) == 2

    again = search(tmp_path, sweep, "hydra.sweeper.n_trials=3")
    now = trials(storage)
    assert [t.number for t in now] == [0, 1, 2] and {t.state.name for t in now} == {"COMPLETE"}
    assert now[2].params not in (now[0].params, now[1].params)  # the seeded sampler went on, not back
    assert {p: p.stat().st_mtime_ns for p in results} == results  # the finished trials did not run again
    assert "Launching 1 jobs" in again.stdout + again.stderr
    jobs = collect_jobs([sweep])
    assert len(jobs) == 3 and sorted(j.config["optuna"]["trial"] for j in jobs) == [0, 1, 2]
    assert all(j.config["optimizer"]["name"] == "adam" and j.metrics["result/objective"] >= 0 for j in jobs)  # the preset's own

    # the same command once more: the study has its trials, nothing runs
    idle = search(tmp_path, sweep, "hydra.sweeper.n_trials=3")
    assert "Launching" not in idle.stdout + idle.stderr and len(trials(storage)) == 3

    # the best trial, marked in summary.csv/md and in TensorBoard's _summary run
    best = min((t for t in now), key=lambda t: t.value)
    rows = summary_rows(sweep)
    (marked,) = [job for job, row in rows.items() if row["best"] == "best"]
    assert marked.startswith(f"{best.user_attrs['job_number']}_")
    assert float(rows[marked]["result/objective"]) == pytest.approx(best.value, rel=1e-3)  # the table shows 4 digits
    assert f"**Best:** `{marked}`" in (sweep / "summary.md").read_text()
    acc = EventAccumulator(str(sweep / "_summary"), size_guidance={"tensors": 0})
    acc.Reload()
    latest = max(acc.Tensors("sweep/best/text_summary"), key=lambda e: e.step)  # one per summary, at its job count
    assert latest.step == 3 and marked in latest.tensor_proto.string_val[0].decode()


def test_a_hopeless_trial_is_pruned_from_its_per_step_loss(tmp_path):
    sweep = tmp_path / "sweep"
    search(tmp_path, sweep, "hydra.sweeper.n_trials=1", "optimizer.lr=0.05", *PRUNE_EARLY)
    # Adam at a learning rate of 1e-9 leaves the image as it is: its loss stays at its first value
    proc = search(tmp_path, sweep, "hydra.sweeper.n_trials=2", "optimizer.lr=1e-9", *PRUNE_EARLY)
    assert "sweep:       2 jobs, 1 completed, 1 pruned" in proc.stdout
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    good, hopeless = trials(storage)
    assert good.state.name == "COMPLETE" and hopeless.state.name == "PRUNED"
    assert max(hopeless.intermediate_values) < 2  # stopped before its last step
    assert hopeless.intermediate_values[1] > good.intermediate_values[1]
    (job,) = [j for j in collect_jobs([sweep]) if j.config["optuna"]["trial"] == hopeless.number]
    assert job.status == "pruned" and "pruned by the study's pruner at step 1" in job.error
    assert job.metrics["result/steps"] == 2 and job.image is not None and not (job.path / "last.ckpt").exists()
    rows = summary_rows(sweep)
    assert rows[job.path.name]["status"] == "pruned" and rows[job.path.name]["best"] == ""


def _server_binaries() -> tuple[str, str] | None:
    for folder in [os.path.dirname(shutil.which("initdb") or ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))[::-1]]:
        if folder and os.path.isfile(os.path.join(folder, "initdb")) and os.path.isfile(os.path.join(folder, "pg_ctl")):
            return os.path.join(folder, "initdb"), os.path.join(folder, "pg_ctl")
    return None


@pytest.fixture()
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1 (a free port), in a temporary folder; its URL."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the postgres extra) is not installed")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server here (initdb, pg_ctl); Debian: apt-get install postgresql")
    initdb, pg_ctl = binaries
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="nst_pg_"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "nst", "--auth=trust", "--no-locale", "-E", "UTF8"], capture_output=True, text=True
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {(init.stderr.strip().splitlines() or ['?'])[-1]}")
    start = subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root}",
            "start",
        ],
        capture_output=True,
        text=True,
    )
    if start.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else start.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {(log.strip().splitlines() or ['?'])[-1]}")
    try:
        yield f"postgresql+psycopg2://nst@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_study_on_a_postgresql_server_runs_its_trials_in_parallel(tmp_path, postgres):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = search(
        tmp_path,
        sweep,
        "launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage='{postgres}'",
        "trainer.max_steps=2",
    )
    assert "Launching 2 jobs" in proc.stdout + proc.stderr or "launching 2 jobs" in proc.stdout + proc.stderr
    assert not (sweep / "optuna.db").exists()
    first, second = trials(postgres)
    assert first.state.name == second.state.name == "COMPLETE"
    assert ran_at_once(sweep)  # one batch, its two trials at the same time
    assert {j.status for j in collect_jobs([sweep])} == {"completed"}


def test_trials_of_an_sqlite_study_run_in_parallel_on_submitit(tmp_path):
    """Two trials in one batch on the submitit launcher (the SLURM code path, run locally), both writing
    their losses to the sweep folder's SQLite file at once."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    search(
        tmp_path,
        sweep,
        "launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=2",
    )
    first, second = trials(f"sqlite:///{sweep / 'optuna.db'}")
    assert first.state.name == second.state.name == "COMPLETE"
    assert first.intermediate_values and second.intermediate_values
    assert ran_at_once(sweep)


def test_a_trial_a_killed_search_left_running_continues_in_its_own_folder(tmp_path):
    """The driver (and its job) killed mid-trial: the same command relaunches that trial into its folder,
    where the job continues from last.ckpt; the study ends with that one trial, complete, every step once."""
    sweep = tmp_path / "sweep"
    args = [
        "run",
        "hparams_search=adam_optuna",
        f"hydra.sweep.dir={sweep}",
        *TINY,
        "trainer.max_steps=60",
        "trainer.checkpoint_every=3",
        "logging.flush_every=3",
        "hydra.sweeper.n_trials=1",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nst_exp", *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list(sweep.glob("0_*/last.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (job,) = sweep.glob("0_*")
    assert (job / "last.ckpt").is_file() and not (job / "result.json").is_file()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    assert [t.state.name for t in trials(storage)] == ["RUNNING"]

    again = run_cli(args, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (trial,) = trials(storage)
    assert trial.state.name == "COMPLETE" and trial.user_attrs["job_number"] == 0
    steps = sorted(trial.intermediate_values)  # reported at each flush (every 3 steps) by both attempts, no gap
    assert steps[-1] >= 50 and all(later - earlier == 3 for earlier, later in zip(steps, steps[1:]))
    assert [p.name for p in sweep.glob("[0-9]*")] == [job.name]
    (done,) = collect_jobs([sweep])
    assert done.status == "completed" and done.metrics["result/steps"] == 60 and not (job / "last.ckpt").exists()
