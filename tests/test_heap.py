"""trainer.keep_freed_memory: while a run's steps hold it, a large block the process frees is kept for the next
allocation (no new page faults), and afterwards the C library hands such blocks back again (Linux, glibc)."""

from __future__ import annotations

import json
import platform
import resource

import pytest
import torch

import nst_exp
from nst_exp.run.heap import freed_memory_kept

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): a block of its own mapping by default


def _faults_of_a_repeated_block() -> int:
    """Page faults while a large tensor is written after others of its size were written and freed (as a
    step's maps are after the steps before it)."""
    for _ in range(2):
        earlier = torch.empty(BLOCK // 4)
        earlier.fill_(1.0)
        del earlier
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.empty(BLOCK // 4)
    second.fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


@pytest.mark.skipif(not GLIBC, reason="the setting drives glibc's malloc")
def test_freed_blocks_are_reused_inside_and_handed_back_outside():
    pages = BLOCK // resource.getpagesize()
    with freed_memory_kept(True) as kept:
        assert kept is True
        inside = _faults_of_a_repeated_block()
    outside = _faults_of_a_repeated_block()
    assert inside < pages // 10, f"{inside} page faults for a block the heap kept"
    assert outside > pages // 2, f"only {outside} page faults: the block was not handed back after the steps"


def test_off_it_changes_nothing():
    with freed_memory_kept(False) as kept:
        assert kept is False


def test_a_run_with_it_completes_and_records_where_it_applied(tmp_path):
    overrides = ["image.size=32", "trainer.max_steps=3", "logging.progress_bar=false", "trainer.accelerator=cpu"]
    out = tmp_path / "run"
    nst_exp.stylize(overrides=[*overrides, "trainer.keep_freed_memory=true"], output_dir=out)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and (out / "final.png").is_file()
    assert result["provenance"]["resolved"]["trainer.keep_freed_memory"] is GLIBC
