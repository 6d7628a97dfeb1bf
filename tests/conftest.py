"""Shared fixtures: tiny real images and a helper that runs the real CLI in a scratch folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "nst_exp" / "assets"

# Subprocesses (`python -m nst_exp` in a scratch folder, the bench's workers) must import this
# checkout, not whatever nst_exp is installed: otherwise the CLI tests test another copy.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

MAX_WORKERS = 4  # each worker holds a VGG19 and starts real runs: more would trade memory for little


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per core, at most ``MAX_WORKERS``."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Workers share the cores: each (and every process it starts) gets its share of threads, so no
    # worker's threads spin waiting for a core another worker holds.
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# Small, fast, deterministic settings shared by the end-to-end tests.
TINY = ["image.size=48", "trainer.max_steps=8", "logging.image_every=4", "logging.flush_every=3", "logging.progress_bar=false"]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same random tensors: a tolerance holds or fails, never by chance."""
    torch.manual_seed(0)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **popen: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "nst_exp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **popen
    )


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI's refusal: a failed exit, exactly one non-empty line on stderr and no traceback; returns the
    line, which holds every one of ``needles``."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_dirs(root: Path) -> list[Path]:
    """Every job folder (one holding result.json) below ``root``."""
    return sorted(p.parent for p in root.rglob("result.json"))


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    """A small real photo (the bundled cat), as a user file."""
    path = tmp_path / "photo.png"
    Image.open(ASSETS / "chelsea.png").convert("RGB").resize((64, 43)).save(path)
    return path


@pytest.fixture()
def painting(tmp_path: Path) -> Path:
    path = tmp_path / "painting.jpg"
    Image.open(ASSETS / "starry_night.jpg").convert("RGB").resize((64, 51)).save(path)
    return path


@pytest.fixture()
def noise_image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path
