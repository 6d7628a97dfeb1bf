"""trainer.keep_freed_memory: while a run's steps hold it, a large block the process frees is kept for the next
allocation (no new page faults), and afterwards the C library hands such blocks back again (Linux, glibc)."""

from __future__ import annotations

import json
import math
import platform
import resource
import subprocess
import sys
from dataclasses import replace

import pytest

import nst_exp
from nst_exp.run.heap import freed_memory_kept
from nst_exp.tiling.plan import KEPT_HEAP_GROWTH, MIB, TilePlan, with_kept_heap

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): a block of its own mapping by default


# Measured in a fresh interpreter: where glibc can put a freed block back depends on every allocation the process
# made before (a test process that ran other tests has an arbitrary heap), as a run's steps start from its setup.
FAULTS = """
import json, resource, sys, torch
from nst_exp.run.heap import freed_memory_kept

def faults_of_a_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(int(sys.argv[1]) // 4)
    block.fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del block
    return faults

def rss_mib():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

start = rss_mib()
with freed_memory_kept(True) as kept:
    # blocks of one size written and freed again and again, as a step's maps are: the heap settles within a
    # few of them (glibc's aligned allocations leave small neighbours at first), then they fault no more
    inside = [faults_of_a_block() for _ in range(16)]
after = rss_mib()
print(json.dumps({"kept": kept, "inside": inside, "outside": faults_of_a_block(), "kept_mib": after - start}))
"""


@pytest.mark.skipif(not GLIBC, reason="the setting drives glibc's malloc")
def test_freed_blocks_are_reused_inside_and_handed_back_outside():
    pages = BLOCK // resource.getpagesize()
    proc = subprocess.run([sys.executable, "-c", FAULTS, str(BLOCK)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["kept"] is True
    faulted = [n for n in seen["inside"] if n > pages // 10]  # without the setting every one of them would
    settled = seen["inside"][-4:]
    assert len(faulted) <= len(seen["inside"]) // 2 and max(settled) < pages // 10, f"page faults per block kept: {seen['inside']}"
    assert seen["kept_mib"] < (BLOCK >> 20) // 2, f"{seen['kept_mib']} MiB still held after the steps"
    assert seen["outside"] > pages // 2, f"only {seen['outside']} page faults: the block was not handed back after the steps"


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


def test_the_plan_keeps_the_heap_only_where_the_budget_has_room_for_it():
    whole = TilePlan(None, need_bytes=100 * MIB, budget_bytes=int(100 * MIB * KEPT_HEAP_GROWTH))
    assert with_kept_heap(whole, True).kept_heap and not with_kept_heap(whole, False).kept_heap
    tight = replace(whole, budget_bytes=150 * MIB)  # the pass fits, the kept heap would not
    assert not with_kept_heap(tight, True).kept_heap
    assert with_kept_heap(TilePlan(None), True).kept_heap  # image.tile=null: no budget, the setting decides


def test_a_run_whose_budget_is_tight_runs_its_steps_without_it(tmp_path, capsys):
    """The same 96 px run twice: with memory to spare the stage keeps its heap; with image.memory_mib
    between the pass's need and the kept heap's, the whole image still runs, with the default allocator."""
    overrides = ["image.size=96", "trainer.max_steps=2", "logging.progress_bar=false", "trainer.accelerator=cpu"]
    overrides += ["trainer.keep_freed_memory=true", "image.tile=auto"]
    nst_exp.stylize(overrides=overrides, output_dir=tmp_path / "roomy")
    roomy = json.loads((tmp_path / "roomy" / "result.json").read_text())["tile_plans"][-1]
    assert roomy["keep_freed_memory"] is GLIBC and roomy["tile"] is None
    tight_mib = math.ceil(roomy["need_mib"] * (1 + KEPT_HEAP_GROWTH) / 2)
    capsys.readouterr()
    nst_exp.stylize(overrides=[*overrides, f"image.memory_mib={tight_mib}"], output_dir=tmp_path / "tight")
    result = json.loads((tmp_path / "tight" / "result.json").read_text())
    tight = result["tile_plans"][-1]
    assert result["status"] == "completed" and tight["tile"] is None and tight["keep_freed_memory"] is False
    if GLIBC:
        assert "trainer.keep_freed_memory is off for these steps" in capsys.readouterr().out
