"""``python -m nst_exp bench``: the FLOP count by hand, the time-to-quality rule, and CLI smoke runs (no timed asserts)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from nst_exp.bench.clock import StepClock, window_end
from nst_exp.bench.flops import conv_flops, peak_tflops
from nst_exp.bench.peak import measure_peak, vgg_conv_shapes
from nst_exp.bench.ttq import QualityPoint, time_to_quality
from nst_exp.bench.variants import VARIANTS
from nst_exp.model.layers import GATYS_STYLE_LAYERS, pastiche_layer


def _conv(c_in: int, c_out: int, h: int, w: int) -> int:
    """Forward 2*Cin*Cout*9*H*W, doubled for the input-gradient backward."""
    return 2 * (2 * c_in * c_out * 9 * h * w)


def test_conv_flops_first_layer_by_hand():
    # conv1_1 on 4x4: 2*3*64*9*16 = 55,296 forward; the same again backward.
    assert conv_flops(["relu1_1"], 4, 4) == 110_592
    assert conv_flops(["conv1_1"], 4, 4) == conv_flops(["relu1_1"], 4, 4)


def test_conv_flops_through_a_pooling_by_hand():
    # conv1_1 (3->64) and conv1_2 (64->64) at 4x6, pool1 -> 2x3, conv2_1 (64->128) at 2x3.
    forward = 2 * 3 * 64 * 9 * 24 + 2 * 64 * 64 * 9 * 24 + 2 * 64 * 128 * 9 * 6
    assert forward == 82_944 + 1_769_472 + 884_736
    assert conv_flops(["relu2_1"], 4, 6) == 2 * forward == 5_474_304


def test_conv_flops_default_layers_cut_at_relu5_1():
    h, w = 32, 48  # pools: 16x24, 8x12, 4x6, 2x3
    expected = (
        _conv(3, 64, 32, 48)
        + _conv(64, 64, 32, 48)
        + _conv(64, 128, 16, 24)
        + _conv(128, 128, 16, 24)
        + _conv(128, 256, 8, 12)
        + 3 * _conv(256, 256, 8, 12)
        + _conv(256, 512, 4, 6)
        + 3 * _conv(512, 512, 4, 6)
        + _conv(512, 512, 2, 3)  # conv5_1 only: the network ends at relu5_1
    )
    layers = ["relu4_2", *GATYS_STYLE_LAYERS]
    assert conv_flops(layers, h, w) == expected
    assert conv_flops(layers, h, w) == conv_flops(["relu5_1"], h, w)  # only the deepest layer matters
    assert conv_flops(["relu5_4"], h, w) == expected + 3 * _conv(512, 512, 2, 3)


def test_pastiche_layer_names():
    assert [pastiche_layer(n) for n in ("relu4_2", "conv1_1", "pool3")] == ["block4_relu2", "block1_conv1", "block3_pool"]


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") is None  # a different part: not in the table
    assert peak_tflops(None, "fp32") is None


@pytest.mark.parametrize("basis", ["fp32", "bf16"])
def test_measured_peak_times_real_vgg_shaped_convs(basis: str):
    """The CPU peak is the fastest of VGG19's C->C 3x3 convs, each timed for real: FLOPs by hand over a measured call."""
    peak = measure_peak(basis, "cpu", base=(16, 24), repeats=2, matmul=64)
    assert vgg_conv_shapes((16, 24)) == [(64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]
    assert [t.flops for t in peak.convs] == [2 * c * c * 9 * h * w for c, h, w in vgg_conv_shapes((16, 24))]
    assert all(0 < t.seconds < 10 and math.isfinite(t.tflops) and t.tflops > 0 for t in peak.convs)
    assert peak.tflops == max(t.tflops for t in peak.convs) and math.isfinite(peak.tflops) and peak.tflops > 0
    assert peak.matmul is not None and peak.matmul.flops == 2 * 64**3 and peak.matmul.seconds > 0
    # A second measurement merged in keeps each kernel's faster call, so the peak can only rise.
    again = measure_peak(basis, "cpu", base=(16, 24), repeats=1, matmul=None)
    merged = again.merge(peak)
    assert [t.seconds for t in merged.convs] == [min(a.seconds, b.seconds) for a, b in zip(peak.convs, again.convs)]
    assert merged.tflops >= max(peak.tflops, again.tflops) and merged.matmul == peak.matmul
    assert merged.summary().startswith(f"{basis} {merged.tflops:.3f} TFLOP/s (conv ")


def test_of_peak_on_a_busy_machine_says_so():
    from nst_exp.bench.table import busy_note

    assert busy_note(1.5, 2) is None and busy_note(None, 2) is None
    assert "load average (9.50) exceeds the 2 cores" in busy_note(9.5, 2)


def test_time_to_quality_rule():
    points = [QualityPoint(10, 1.0, 0.30, 0.50), QualityPoint(20, 2.0, 0.45, 0.30), QualityPoint(30, 3.0, 0.39, 0.33)]
    assert time_to_quality(points, content=0.40, style=0.35) == ("both", points[2])
    # Never both; the first point whose content+style is below 0.42+0.32 (p0 0.80, p1 0.75, p2 0.72).
    assert time_to_quality(points, content=0.42, style=0.32) == ("sum", points[2])
    assert time_to_quality(points, content=0.10, style=0.10) == ("never", None)


@pytest.mark.parametrize("stride", [1, 3, 4])
def test_step_clock_counts_steps_whatever_the_tick_stride(stride: int):
    """A loop ticking every ``stride`` steps (trainer.iters_per_step) still times >= steps whole steps."""
    clock, cpu = StepClock(warmup=3, steps=10), torch.device("cpu")
    end = window_end(3, 10, stride)
    for step in range(0, end + 1, stride):
        clock.tick(step, cpu)
    durations = clock.durations()
    assert clock.closed and len(durations) == end - clock.stamps[0][0] >= 10
    assert clock.stamps[0][0] >= 3 and all(d >= 0 for d in durations)
    assert window_end(3, 10, 1) == 13 and window_end(3, 10, 4) == 16


def test_step_clock_refuses_an_unfinished_window():
    clock = StepClock(warmup=1, steps=5)
    for step in range(4):
        clock.tick(step, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="stopped before"):
        clock.durations()


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table's rows by variant (the 64 px runs; at 32 px a 1-pixel map cannot be reflect-padded by stock modules)."""
    rows = [line.split() for line in stdout.splitlines()]
    # A table row: size, WxH, variant, ... (not the runs' own "64 px: ..." lines or progress bars)
    return {cells[2]: cells for cells in rows if len(cells) > 4 and cells[0] == "64" and re.fullmatch(r"\d+x\d+", cells[1])}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One tiny real bench run (every variant, plus a tiny --ttq), shared by the tests below."""
    cwd = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # a smoke run: one thread keeps it quick on a busy 2-core machine
        proc = run_cli(
            [
                "bench",
                "--sizes",
                "64",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--device",
                "cpu",
                "--json",
                "out.json",
                "--variants",
                *VARIANTS,
                "--repeats",
                "2",
                "--ttq",
                "--ttq-size",
                "32",
                "--ttq-steps",
                "3",
                "--ttq-every",
                "2",
                "--ttq-overrides",
                "trainer.max_steps=4",
                "logging.progress_bar=false",
            ],
            cwd=cwd,
            timeout=240,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, cwd


@pytest.mark.slow
def test_bench_smoke_table(smoke):
    proc, cwd = smoke
    assert "machine:" in proc.stdout and "s/step" in proc.stdout
    table = _table_rows(proc.stdout)
    assert set(table) == {"tool", "tiled", "bare", "stock", "pastiche", "kept"}, proc.stdout
    for variant, cells in table.items():
        assert float(cells[4]) > 0, (variant, cells)  # seconds per step, mean
    rows = json.loads((cwd / "out.json").read_text())["rows"]
    assert {r["variant"]: r["error"] for r in rows} == {v: None for v in VARIANTS}
    assert "kept: the tool with trainer.keep_freed_memory=true" in proc.stdout
    # Every ratio is against the same size's rows; the floor's own is 1.
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["stock"]["vs_stock"] == 1.0 and by_variant["bare"]["vs_bare"] == 1.0
    tool, stock = by_variant["tool"], by_variant["stock"]
    assert tool["vs_stock"] == pytest.approx(tool["s_per_step_mean"] / stock["s_per_step_mean"])
    assert (stock["width"], stock["height"]) == (tool["width"], tool["height"]) == (64, 43)
    assert all(r["s_per_step_mean"] > 0 and r["measured_steps"] == 2 for r in rows)
    assert all(r["conv_gflop_per_step"] > 0 and r["mem_peak_mib"] > 0 for r in rows)
    assert all(r["mem_rise_mib_per_mpx"] == pytest.approx(r["mem_rise_mib"] / (r["width"] * r["height"] / 1e6)) for r in rows)
    assert all(cells[-4] == f"{r['mem_rise_mib_per_mpx']:.0f}" for r in rows for cells in [table[r["variant"]]])
    assert all(r["mem_mib_per_extra_mpx"] is None for r in rows)  # one size: no smaller one to grow from
    # of peak on the CPU: over the fp32 peak measured at start (and again between the two rounds).
    peak = json.loads((cwd / "out.json").read_text())["machine"]["peak"]
    assert set(peak) == {"fp32"} and peak["fp32"]["tflops"] > 0 and len(peak["fp32"]["convs"]) == 4
    assert "measured peak: fp32 " in proc.stdout and "of peak: n/a" not in proc.stdout
    for r in rows:
        assert r["peak_basis"] == "fp32" and r["peak_tflops"] == peak["fp32"]["tflops"]
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / r["peak_tflops"]) and r["peak_fraction"] > 0
        assert table[r["variant"]][-1] == f"{100 * r['peak_fraction']:.1f}%"
    # --repeats 2: two interleaved rounds per variant, the row is the faster one
    assert all(len(r["round_means"]) == 2 and r["s_per_step_mean"] == min(r["round_means"]) for r in rows)
    assert (
        proc.stdout.index("tool at 64 px (round 1/2)")
        < proc.stdout.index("bare at 64 px (round 1/2)")
        < proc.stdout.index("tool at 64 px (round 2/2)")
    )


@pytest.mark.slow
def test_bench_smoke_ttq(smoke):
    proc, cwd = smoke
    assert "time to quality at 32 px" in proc.stdout and "pastiche: 3 L-BFGS steps" in proc.stdout
    ttq = json.loads((cwd / "out.json").read_text())["ttq"]
    assert [p["step"] for p in ttq["tool_points"]] == [2, 4]
    assert ttq["pastiche_seconds"] > 0 and ttq["criterion"] in ("both", "sum", "never")
    assert all(p["seconds"] > 0 and p["content"] >= 0 and p["style"] >= 0 for p in ttq["tool_points"])


@pytest.mark.slow
def test_bench_writes_nothing_but_its_json(smoke):
    _, cwd = smoke
    assert sorted(p.name for p in cwd.iterdir()) == ["out.json"]  # run folders went to temp dirs


def test_stock_loop_is_built_from_stock_modules_and_descends():
    """The floor is a plain loop: nn.Conv2d/ReLU/MaxPool2d and torch.optim.LBFGS, none of this package's modules."""
    from torch import nn

    from nst_exp.bench.stock import stock_loop, stock_vgg19
    from nst_exp.bench.variants import Spec, tool_config
    from nst_exp.images import load_tensor
    from nst_exp.model.vgg import load_pastiche_weights

    net = stock_vgg19(load_pastiche_weights(), "relu2_1", "reflect", "max")
    assert list(dict(net.named_children())) == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1"]
    assert {type(m) for m in net} == {nn.Conv2d, nn.ReLU, nn.MaxPool2d}
    assert net.conv1_1.padding_mode == "reflect" and not any(p.requires_grad for p in net.parameters())
    spec = Spec("stock", 64, 2, 0, "cpu", "32", "builtin:chelsea.png", "builtin:starry_night.jpg")
    cfg = tool_config(spec)
    step, image = stock_loop(cfg, load_tensor(spec.content, 64), load_tensor(spec.style, 64), "cpu", "32")
    before = image.detach().clone()
    step()
    step()
    assert image.shape == before.shape and not torch.equal(image, before) and 0 <= image.min() and image.max() <= 1


def test_memory_per_extra_megapixel_by_hand():
    from nst_exp.bench.table import _per_extra_mpx

    small = {"variant": "tiled", "size": 1000, "width": 1000, "height": 500, "mem_rise_mib": 600.0, "error": None}
    large = {"variant": "tiled", "size": 2000, "width": 2000, "height": 1000, "mem_rise_mib": 900.0, "error": None}
    other = {**small, "variant": "tool", "mem_rise_mib": 10.0}
    assert _per_extra_mpx(large, [small, large, other]) == pytest.approx(300 / 1.5)  # 1.5 Mpx more, 300 MiB more
    assert _per_extra_mpx(small, [small, large, other]) is None
