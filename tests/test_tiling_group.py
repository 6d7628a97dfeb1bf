"""``trainer.devices=N`` with ``image.tile``: N processes share every loss pass's tiles over
torch.distributed (gloo on the CPU), from the CLI (process 0 spawns the others) and as the tasks of
a submitit job; the run paints the image one process paints. The SLURM case is in test_slurm.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from nst_exp.api import compose_config
from nst_exp.config import validate
from nst_exp.errors import UserError

# 96x64 in 48 px tiles (2 x 2), after a 64 px stage that is tiled too: the helpers build a loss per stage.
SHARED = [
    "image.size=96",
    "image.tile=48",
    "image.multiscale_sizes=[64]",
    "image.multiscale_steps=[2]",
    "trainer.max_steps=3",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("one") / "run"
    proc = run_cli(["run", *SHARED, f"hydra.run.dir={out}"], out.parent)
    assert proc.returncode == 0, proc.stderr
    return np.asarray(Image.open(out / "final.png"), dtype=np.int16)


def _same_image(path: Path, reference: np.ndarray) -> None:
    image = np.asarray(Image.open(path), dtype=np.int16)
    assert image.shape == reference.shape
    assert np.abs(image - reference).max() <= 1  # all-reduced sums: float order only


def _helper_lines(text: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(r"tile helper (\d+)/(\d+): (\d+) loss passes shared", text)]


@pytest.mark.slow
def test_two_processes_from_the_cli_paint_the_one_process_image(tmp_path, one_process):
    out = tmp_path / "run"
    proc = run_cli(["run", *SHARED, "trainer.devices=2", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    ((rank, world, passes),) = _helper_lines(proc.stdout)
    assert (rank, world) == (1, 2) and passes >= 5  # both stages' steps went through the helper
    _same_image(out / "final.png", one_process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside the run folder


@pytest.mark.slow
def test_two_processes_with_auto_tiles_share_what_the_budget_forces(tmp_path):
    """image.tile=auto with a budget the whole image does not fit: both processes plan the same tiles
    (process 0's plan is sent with every loss pass) and the image is the one process's."""
    common = [
        "image.size=384",
        "image.tile=auto",
        "image.memory_mib=150",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "logging.progress_bar=false",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli(["run", *common, f"hydra.run.dir={one}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plans = json.loads((one / "result.json").read_text())["tile_plans"]
    assert plans[-1]["tile"] is not None and plans[-1]["auto"], plans  # the budget forced tiles
    proc = run_cli(["run", *common, "trainer.devices=2", f"hydra.run.dir={two}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    ((rank, world, passes),) = _helper_lines(proc.stdout)
    assert (rank, world) == (1, 2) and passes >= 2
    shared = json.loads((two / "result.json").read_text())["tile_plans"]
    assert shared[-1]["tile"] is not None and shared[-1]["world"] == 2, shared
    assert "shared by" in proc.stdout or "would not fit" in proc.stdout  # the plan line names why it tiles
    _same_image(two / "final.png", np.asarray(Image.open(one / "final.png"), dtype=np.int16))  # exact whatever the tiles


@pytest.mark.slow
def test_submitit_job_tasks_share_the_tiles(tmp_path, one_process):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli(["run", "-m", "launcher=submitit_local", *SHARED, "trainer.devices=2", "seed=0"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = [p for p in (tmp_path / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    (job,) = [p for p in sweep.iterdir() if p.name.startswith("0_")]
    logs = {p.name: p.read_text() for p in sweep.glob(".submitit/*/*_log.out")}
    assert len(logs) == 2  # tasks_per_node follows trainer.devices
    helper = [line for text in logs.values() for line in _helper_lines(text)]
    assert len(helper) == 1 and helper[0][:2] == (1, 2) and helper[0][2] >= 5
    _same_image(job / "final.png", one_process)


def test_devices_without_a_tile_is_one_line_with_the_fix():
    with pytest.raises(UserError, match=r"trainer.devices=2 shares the tiles of image.tile .* fix: image.tile=auto"):
        validate(compose_config(["trainer.devices=2", "image.tile=null"]))
    validate(compose_config(["trainer.devices=2"]))  # the default, image.tile=auto, plans the tiles itself
    with pytest.raises(UserError, match=r"trainer.devices must be a positive number"):
        validate(compose_config(["trainer.devices=0"]))


def test_a_group_is_checked_on_the_resolved_settings():
    """A job's tasks (world from the cluster, not trainer.devices) are checked on what the run resolved."""
    from nst_exp.run.setup import check_tile_group
    from nst_exp.settings import resolve

    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=r"^2 processes .* share the tiles of image.tile, which is null; fix: image.tile=auto"):
        check_tile_group(resolve(compose_config(["image.tile=null"]), cpu), world=2)
    with pytest.raises(UserError, match=r"^trainer.precision=bf16-true is not supported with several processes; fix: "):
        check_tile_group(resolve(compose_config(["trainer.precision=bf16-true"]), cpu), world=2)
    check_tile_group(resolve(compose_config(["trainer.precision=bf16-mixed"]), cpu), world=2)
    check_tile_group(resolve(compose_config(["image.tile=null", "trainer.precision=bf16-true"]), cpu), world=1)


@pytest.mark.slow
def test_a_helper_that_cannot_start_is_an_error_not_a_hang(tmp_path):
    """Spawned helpers import the calling script: without a ``__main__`` guard the helper fails at once,
    and process 0 says so (it does not wait at the rendezvous)."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from nst_exp import stylize\n"
        f"stylize(output_dir={str(tmp_path / 'run')!r}, image={{'size': 64, 'tile': 32}}, trainer={{'devices': 2, 'max_steps': 1}},"
        " logging={'progress_bar': False})\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "a tile helper process (trainer.devices) exited with status" in proc.stderr
    assert "if __name__ == '__main__':" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_saves_the_image_and_ends_the_helpers(tmp_path):
    """Ctrl-C during a two-process run: process 0 saves final.png and last.ckpt and exits 130; its helper
    ends with it (stopped between loss passes, or ended if the signal cut one short), nothing hangs."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nst_exp",
            "run",
            *SHARED[:2],
            "trainer.max_steps=100000",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "logging.progress_bar=false",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not list(out.glob("events.out.tfevents*")) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(5)  # some steps in
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        helpers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert helpers, "no helper process was running"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert (out / "final.png").is_file() and (out / "last.ckpt").is_file()
    time.sleep(2)
    assert not [pid for pid in helpers if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
