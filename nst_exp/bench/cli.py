"""``python -m nst_exp bench``: arguments, the interleaved rounds, printing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from nst_exp.bench.flops import peak_basis
from nst_exp.bench.peak import Peak, measure_peaks
from nst_exp.bench.table import format_table, header_line, machine_info, peak_line, rows_of
from nst_exp.bench.ttq import format_ttq, run_ttq
from nst_exp.bench.variants import DEFAULT_VARIANTS, PRECISIONS, VARIANTS, Measurement, Spec, best_of, measure_in_subprocess
from nst_exp.files import WriteFailed, write_text

DEFAULT_CONTENT = "builtin:chelsea.png"
DEFAULT_STYLE = "builtin:starry_night.jpg"
DEFAULT_SIZES = {"cpu": [256, 512], "cuda": [512, 1024]}
DEFAULT_WARMUP = {"cpu": 3, "cuda": 55}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nst_exp bench",
        description="Seconds per L-BFGS step: this tool vs a stock PyTorch loop, its own bare loop and pastiche (and --ttq: time to quality).",
    )
    p.add_argument("--sizes", type=int, nargs="+", help="long sides in px (default 256 512 on cpu, 512 1024 on cuda)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant (default 20)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps before them (default 3 on cpu; 55 on cuda, so L-BFGS's memory of 50 is "
        "full and the CUDA graph captured: the steady state of a run)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="32")
    p.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=list(DEFAULT_VARIANTS),
        help="which to time (default all but kept: the tool with trainer.keep_freed_memory=true; none with --ttq: only the "
        "time-to-quality comparison)",
    )
    p.add_argument("--content", default=DEFAULT_CONTENT, help=f"content image (default {DEFAULT_CONTENT})")
    p.add_argument("--style", default=DEFAULT_STYLE, help=f"style image (default {DEFAULT_STYLE})")
    p.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="tool config overrides for the tool, bare and stock rows, e.g. trainer.iters_per_step=8 trainer.compile=true",
    )
    p.add_argument(
        "--tile",
        default=None,
        help="the tiled row's image.tile: px, or auto (default: half the long side, about four tiles); a fixed "
        "tile over several sizes shows what each further megapixel costs with activations bounded by it",
    )
    p.add_argument(
        "--tile-keep",
        type=int,
        default=None,
        help="the tiled row's image.tile_keep: crops whose pass-1 graph pass 2 reuses (default: as many as fit; "
        "1: the memory of one crop, each other crop run forward once more)",
    )
    p.add_argument(
        "--tile-memory",
        type=int,
        default=None,
        help="the tiled row's image.memory_mib: the budget its plan must fit (with --tile auto: the cost of "
        "an image that would not fit that memory whole)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds per size, the variants interleaved; each row keeps its best round (default 1; 2-3 on a shared or noisy machine)",
    )
    p.add_argument("--json", type=Path, help="also write the rows (and the ttq result) to this JSON file")
    p.add_argument("--ttq", action="store_true", help="also run the time-to-quality comparison")
    p.add_argument("--ttq-size", type=int, default=256, help="ttq image size (default 256)")
    p.add_argument("--ttq-steps", type=int, default=100, help="pastiche's L-BFGS steps in ttq (default 100)")
    p.add_argument("--ttq-every", type=int, default=10, help="tool image copies every N steps (default 10)")
    p.add_argument("--ttq-overrides", nargs="*", default=[], help="the tool's config overrides for ttq (default: its defaults)")
    args = p.parse_args(list(argv))
    args.variants = list(dict.fromkeys(args.variants))
    if min(args.steps, args.repeats, args.ttq_steps, args.ttq_every) < 1 or (args.warmup is not None and args.warmup < 0):
        p.error("--steps, --repeats, --ttq-steps and --ttq-every must be >= 1 and --warmup >= 0")
    if args.tile is not None and args.tile != "auto" and not args.tile.isdigit():
        p.error("--tile must be a size in px or auto")
    if args.sizes and min(args.sizes) < 32:
        p.error("--sizes must be >= 32 (VGG19 pools four times)")
    if args.ttq_size < 32:
        p.error("--ttq-size must be >= 32 (VGG19 pools four times)")
    if args.tile is not None and args.tile.isdigit() and int(args.tile) < 16:
        p.error("--tile must be >= 16 px (a whole pooling cell of VGG19), or auto")
    if (args.tile_keep is not None and args.tile_keep < 1) or (args.tile_memory is not None and args.tile_memory < 1):
        p.error("--tile-keep and --tile-memory must be >= 1")
    from nst_exp.errors import UserError
    from nst_exp.files import output_file_problem
    from nst_exp.images import open_image

    for flag, value in (("--content", args.content), ("--style", args.style)):
        try:
            open_image(value, flag.removeprefix("--"))  # exists, and is a picture Pillow reads
        except UserError as exc:  # before any row runs, not as each row's failure
            p.error(f"{flag} {value}: {exc}")
    problem = args.json and output_file_problem(args.json)
    if problem:  # before the rows run, not after them with the results lost
        p.error(f"--json {args.json}: {problem}")
    return args


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; fix: --device cpu")
    return choice


def cpu_peaks(args: argparse.Namespace, device: str, before: dict[str, Peak] | None = None) -> dict[str, Peak]:
    """On the CPU, the measured peak in the bench's precision (and fp32 for pastiche's rows), merged with
    ``before`` (an earlier round's); none on CUDA (datasheet peaks there)."""
    if device != "cpu" or not args.variants:
        return {}
    bases = [peak_basis(device, args.precision)] + (["fp32"] if "pastiche" in args.variants else [])
    now = measure_peaks(bases, device)
    return {basis: p.merge(before[basis]) if before else p for basis, p in now.items()}


def peak_info(peaks: dict[str, Peak]) -> dict[str, object]:
    """The peaks as --json writes them (machine.peak)."""
    return {
        basis: {"tflops": p.tflops, "convs": [asdict(t) for t in p.convs], "matmul": asdict(p.matmul) if p.matmul else None}
        for basis, p in peaks.items()
    }


def main(argv: list[str]) -> int:
    if "--quality" in argv:  # its own arguments: bench/quality.py
        from nst_exp.bench.quality import main as quality_main

        return quality_main(argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = args.sizes or DEFAULT_SIZES[device]
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[device]
    info = machine_info(device)
    print(header_line(info), flush=True)
    peaks = cpu_peaks(args, device)
    if peaks:
        print(peak_line(peaks), flush=True)

    measurements = []
    for size in sizes:
        rounds: dict[str, list[Measurement]] = {variant: [] for variant in args.variants}
        for index in range(args.repeats):
            for variant in args.variants:  # interleaved, so a slow spell of a shared machine hits every variant
                spec = Spec(
                    variant,
                    size,
                    args.steps,
                    args.warmup,
                    device,
                    args.precision,
                    args.content,
                    args.style,
                    tuple(args.overrides),
                    args.tile,
                    args.tile_keep,
                    args.tile_memory,
                )
                what = f"{variant} at {size} px" + (f" (round {index + 1}/{args.repeats})" if args.repeats > 1 else "")
                print(f"[bench] {what} ...", flush=True)
                m = measure_in_subprocess(spec)
                rounds[variant].append(m)
                # A line per variant as it finishes, so a bench cut short still says what it measured.
                print(
                    f"[bench] {what}: " + (f"{m.mean * 1e3:.2f} ms/step, peak {m.mem_peak_mib:.0f} MiB" if m.ok else f"failed: {m.error}"),
                    flush=True,
                )
            if peaks and index + 1 < args.repeats:  # between rounds too: the peak is each kernel's best call
                peaks = cpu_peaks(args, device, peaks)
        measurements += [best_of(rounds[variant]) for variant in args.variants]
    if peaks:
        info["peak"] = peak_info(peaks)
    rows = rows_of(measurements, info["device_name"], peaks)
    if rows:
        print()
        print(header_line(info))
        load = max(filter(None, (info["load_average_1min"], machine_info(device)["load_average_1min"])), default=None)
        print(format_table(rows, device, peaks, (load, info["cores"])), flush=True)

    ttq = None
    if args.ttq:
        print(f"[bench] time to quality at {args.ttq_size} px ...", flush=True)
        ttq = run_ttq(args, device)
        print()
        print(format_ttq(ttq, args.ttq_overrides), flush=True)

    if args.json:
        payload = {"machine": info, "rows": rows, "ttq": asdict(ttq) if ttq else None}
        try:
            write_text(args.json, json.dumps(payload, indent=2), "bench results")
        except WriteFailed as exc:  # a full disk: the table above stands
            print(f"error: {exc}", file=sys.stderr)
            return 1
    # pastiche failing (say, on an unsupported device) is a reported row, not a failed benchmark.
    return 0 if all(m.ok for m in measurements if m.spec.variant != "pastiche") else 1
