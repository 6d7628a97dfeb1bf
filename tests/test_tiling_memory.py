"""L-BFGS's pairs grow with the image: a history that cannot fit is a one-line error before any work,
naming the largest ``optimizer.history_size`` that fits; the tile plan's budget leaves room for the
same bytes (one formula, ``tiling.memory.state_bytes``)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_cli

from nst_exp.api import compose_config
from nst_exp.errors import UserError
from nst_exp.run.setup import history_pairs
from nst_exp.tiling.memory import SHARE, available_bytes, check_history_fits, state_bytes
from nst_exp.tiling.plan import budget

GIB = 2**30
CPU = torch.device("cpu")


def test_a_history_too_large_names_the_one_that_fits():
    # 30 Mpx with 24 GiB free: 80% of it is 687 B per pixel; 96 B for the vectors leave 24 pairs of 24 B.
    with pytest.raises(
        UserError,
        match=r"optimizer.history_size=50: L-BFGS's pairs need 36.2 GiB for a 30.0 Mpx image .* "
        r"24.0 GiB is free on cpu; fix: optimizer.history_size=24 \(or less\), or optimizer=adam",
    ):
        check_history_fits(50, 30_000_000, CPU, available=24 * GIB)
    check_history_fits(24, 30_000_000, CPU, available=24 * GIB)
    check_history_fits(None, 30_000_000, CPU, available=24 * GIB)  # Adam: no pairs


def test_the_history_checked_is_the_configs():
    assert history_pairs(compose_config([])) == 50  # L-BFGS, 50 pairs
    assert history_pairs(compose_config(["optimizer.history_size=24"])) == 24
    assert history_pairs(compose_config(["optimizer=adam"])) is None


def test_no_history_fits_says_adam():
    with pytest.raises(UserError, match=r"fix: optimizer=adam, or a smaller image.size"):
        check_history_fits(50, 100_000_000, CPU, available=8 * GIB)


def test_the_check_and_the_tile_budget_count_the_same_bytes():
    """A history fits exactly when its state is at most SHARE of the free memory, and the tile plan's
    budget is what that state leaves of it."""
    pixels, pairs = 1_000_000, 50
    need = state_bytes(pairs, pixels)
    assert need == pixels * (24 * pairs + 96)
    check_history_fits(pairs, pixels, CPU, available=int(need / SHARE) + 1)
    with pytest.raises(UserError):
        check_history_fits(pairs, pixels, CPU, available=int(need / SHARE) - 64)
    free = available_bytes(CPU)
    assert free is not None
    left = budget(None, pairs, CPU, pixels)
    assert left is not None and abs(left - (int(SHARE * free) - need)) < 0.05 * free  # MemAvailable moves meanwhile
    assert budget(300, pairs, CPU, pixels) == 300 * 2**20  # image.memory_mib, as given


def test_free_memory_is_memavailable_within_the_machines_ram():
    """On Linux: MemAvailable, which lies between the kernel's free pages (less its reserve) and the RAM."""
    free = available_bytes(CPU)
    page = os.sysconf("SC_PAGE_SIZE")
    assert free is not None and free <= os.sysconf("SC_PHYS_PAGES") * page
    assert free >= os.sysconf("SC_AVPHYS_PAGES") * page // 2


def test_free_memory_parses_meminfo_and_says_none_when_unknown(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:   12345678 kB\n")
    assert available_bytes(CPU, meminfo) == 12345678 * 1024
    meminfo.write_text("MemTotal:       24576000 kB\n")  # an old kernel without MemAvailable
    assert available_bytes(CPU, meminfo) is None
    assert available_bytes(CPU, tmp_path / "missing") is None
    assert available_bytes(torch.device("meta")) is None


def test_the_cli_stops_before_any_work(tmp_path):
    """A 20000 px image with 50 pairs needs about 340 GB: exit 2, one line, no traceback, in seconds."""
    proc = run_cli(["run", "image.size=20000", "image.max_input_pixels=0", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optimizer.history_size=50" in errors[0] and "fix: optimizer" in errors[0]
    assert "Traceback" not in proc.stderr
