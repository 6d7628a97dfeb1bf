"""Sweep summaries: a contact sheet and summary.csv / summary.md from finished job folders.

Works on folders only (each job's ``result.json``, ``final.png``, ``config.yaml`` and
``.hydra/overrides.yaml``), never on live modules, so the same code serves the Hydra
callback at the end of a multirun and ``python -m nst_exp compare`` on any runs.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

from nst_exp.config import flatten
from nst_exp.files import write_text, writing
from nst_exp.images import save_png
from nst_exp.labels import image_label
from nst_exp.run.folder import CONFIG_FILE, RESULT_FILE, final_image, read_result
from nst_exp.run.metrics import HPARAM_METRICS
from nst_exp.run.tb_hparams import write_experiment
from nst_exp.sweep.naming import override_label

TILE = 224  # px, the box each final image is fitted into
CAPTION_WIDTH = 34  # characters per caption line under a tile
METRIC_COLUMNS = HPARAM_METRICS


@dataclass
class Job:
    path: Path
    status: str
    error: str | None
    metrics: dict[str, float]
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str | None] = field(default_factory=dict)  # content, style, experiment (nst_exp.labels)
    provenance: dict[str, Any] = field(default_factory=dict)  # what ran it (run.provenance), {} for older runs

    @property
    def image(self) -> Path | None:
        return final_image(self.path)

    def override_dict(self) -> dict[str, str]:
        return dict(o.lstrip("+~").split("=", 1) for o in self.overrides if "=" in o)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def load_job(path: Path) -> Job | None:
    result = read_result(path)
    if result is None:
        return None
    overrides = result.get("overrides") or _read_yaml(path / ".hydra" / "overrides.yaml") or []
    config = _read_yaml(path / CONFIG_FILE) or _read_yaml(path / ".hydra" / "config.yaml") or {}
    return Job(
        path=path,
        status=result.get("status", "unknown"),
        error=result.get("error"),
        metrics=result.get("metrics") or {},
        overrides=[str(o) for o in overrides],
        config=config,
        labels={
            "content": result.get("content") or image_label(config.get("content")),
            "style": result.get("style") or image_label(config.get("style")),
            "experiment": result.get("experiment"),
        },
        provenance=result.get("provenance") or {},
    )


def collect_jobs(dirs: Iterable[Path]) -> list[Job]:
    """Every job folder (one holding result.json) at or below the given run or sweep folders."""
    seen: dict[Path, Job] = {}
    for root in dirs:
        root = Path(root)
        candidates = [root] if (root / RESULT_FILE).is_file() else sorted(p.parent for p in root.rglob(RESULT_FILE))
        for path in candidates:
            job = load_job(path)
            if job is not None:
                seen.setdefault(path.resolve(), job)
    return sorted(seen.values(), key=_job_order)


def _job_order(job: Job) -> tuple:
    head = job.path.name.split("_", 1)[0]
    return (str(job.path.parent), int(head) if head.isdigit() else math.inf, job.path.name)


def best_job(jobs: Sequence[Job]) -> Job | None:
    """The completed job with the lowest ``result/objective`` (the sweep objective, lower is better), if any;
    in an Optuna search, the best trial of the study's jobs in these folders."""
    scored = [j for j in jobs if j.status == "completed" and math.isfinite(j.metrics.get("result/objective", math.nan))]
    return min(scored, key=lambda j: j.metrics["result/objective"], default=None)


# Overrides that name a job's bookkeeping, not its settings (the Optuna trial number)
_BOOKKEEPING = ("optuna.",)


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys whose values differ between jobs, in order of first appearance."""
    keys: dict[str, set[str]] = {}
    for job in jobs:
        for key, value in job.override_dict().items():
            if key.startswith(_BOOKKEEPING):
                continue
            keys.setdefault(key, set()).add(value)
    varied = [k for k, values in keys.items() if len(values) > 1 or any(k not in j.override_dict() for j in jobs)]
    return varied


def settings(job: Job) -> dict[str, Any]:
    """A job's config and provenance as flat keys (``loss.style_weight``, ``provenance.versions.torch``,
    ``resolved.trainer.precision``): what ``differences`` compares."""
    from nst_exp.run.provenance import hparams

    record = job.provenance
    flat_provenance = hparams(record) if "resolved" in record else flatten(record, "provenance.")
    # config.yaml keeps the names as asked (null: the file stem); the runs' sessions name the images used
    labels = {f"{key}.name": job.labels[key] for key in ("content", "style") if job.labels.get(key)}
    return {**flatten(job.config), **labels, **flat_provenance}


def differences(jobs: Sequence[Job]) -> dict[str, list[Any]]:
    """Keys (config, provenance, resolved autos) whose values are not the same in every job, each with
    its value per job (None where a job lacks it), in key order."""
    flat = [settings(job) for job in jobs]
    keys = sorted({k for f in flat for k in f})
    table = {k: [f.get(k) for f in flat] for k in keys}
    return {k: values for k, values in table.items() if len({repr(v) for v in values}) > 1}


def differences_lines(jobs: Sequence[Job]) -> list[str]:
    """Markdown lines: per differing key, each value with the jobs that have it."""
    found = differences(jobs)
    if len(jobs) < 2:
        return []
    if not found:
        return [f"All {len(jobs)} runs have the same config and provenance."]
    lines = []
    for key, values in found.items():
        groups: dict[str, list[str]] = {}
        for job, value in zip(jobs, values):
            groups.setdefault(_fmt(value) if value is not None else "(absent)", []).append(job.path.name)
        shown = "; ".join(f"`{v}`: {', '.join(names)}" for v, names in groups.items())
        lines.append(f"- `{key}`: {shown}")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _relative_to(path: Path, base: Path) -> str:
    """Paths inside the summary's folder stay relative (the folder can move); others absolute."""
    path, base = path.resolve(), base.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def write_tables(jobs: Sequence[Job], out_dir: Path) -> tuple[Path, Path]:
    """summary.csv and summary.md: one row per job; the best one (lowest result/objective) says ``best``."""
    header = ["job", "content", "style", "experiment", "overrides", "status", "best", "error", *METRIC_COLUMNS, "image"]
    best = best_job(jobs)
    rows = []
    for job in jobs:
        rows.append(
            [
                job.path.name,
                *[job.labels.get(k) or "" for k in ("content", "style", "experiment")],
                " ".join(job.overrides),
                job.status,
                "best" if job is best else "",
                job.error or "",
                *[_fmt(job.metrics.get(m)) for m in METRIC_COLUMNS],
                _relative_to(job.image, out_dir) if job.image else "",
            ]
        )
    text = io.StringIO(newline="")
    table = csv.writer(text)
    table.writerow(header)
    table.writerows(rows)
    csv_path = write_text(out_dir / "summary.csv", text.getvalue(), "summary table")
    md_path = out_dir / "summary.md"
    escape = lambda s: s.replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    if best is not None:
        lines += [
            "",
            f"**Best:** `{best.path.name}`, result/objective {_fmt(best.metrics['result/objective'])}"
            + (f": `{' '.join(best.overrides)}`" if best.overrides else ""),
        ]
    differs = differences_lines(jobs)
    if differs:
        lines += ["", "## differs", "", *differs]
    write_text(md_path, "\n".join(lines) + "\n", "summary table")
    return csv_path, md_path


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(img: Image.Image, box: int) -> Image.Image:
    """Scale (up or down) so the long side is ``box``; small test images stay visible."""
    from nst_exp.images import resize_long_side

    return resize_long_side(img.convert("RGB"), box)


def _wrap(text: str, lines: int, width: int = CAPTION_WIDTH) -> list[str]:
    """At most ``lines`` lines, broken between words (a long word is cut with an ellipsis, never split)."""
    out = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
    out = [line if len(line) <= width else line[: width - 1] + "…" for line in out]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 2].rstrip(" ,") + " …"  # more follows
    return out


def _thumbnail(path: Path, box: int) -> Image.Image:
    """The image fitted into ``box``; a grey square if it cannot be read (a broken input must not cost the sheet)."""
    try:
        with Image.open(path) as img:
            return _fit(img, box)
    except (OSError, ValueError):
        return Image.new("RGB", (box, box), (200, 200, 200))


def _caption(job: Job, keys: Sequence[str], best: bool = False) -> list[str]:
    shown = {k: v for k, v in job.override_dict().items() if k in keys} or {
        k: v for k, v in job.override_dict().items() if not k.startswith(_BOOKKEEPING)
    }
    labels = [label for k, v in shown.items() if (label := override_label(f"{k}={v}"))]
    lines = _wrap(", ".join(labels) or job.path.name, 2)
    if job.status in ("completed", "pruned", "interrupted", "diverged"):
        m = job.metrics
        lines.append(f"style {_fmt(m.get('result/eval_style'))}  content {_fmt(m.get('result/eval_content'))}")
        lines.append(f"loss {_fmt(m.get('result/loss_total'))}  {_fmt(m.get('result/wall_time_s'))}s")
        if job.status != "completed":
            lines.append(job.status.upper())
        elif best:
            lines.append(f"BEST  objective {_fmt(m.get('result/objective'))}")
    else:
        lines.append(job.status.upper())
        lines += _wrap(job.error or "", 3)
    return lines


def _inputs(jobs: Sequence[Job]) -> list[tuple[str, Path]]:
    """The distinct content and style images of the jobs, for the sheet's top row."""
    from nst_exp.images import resolve_path

    found: dict[str, tuple[str, Path]] = {}
    for job in jobs:
        for what in ("content", "style"):
            node = job.config.get(what) or {}
            path = node.get("path")
            if not path or path in found:
                continue
            try:
                found[path] = (f"{what}: {image_label(node)}", resolve_path(path, what))
            except Exception:  # noqa: BLE001 - a moved input only loses its thumbnail
                continue
    return list(found.values())


def grid_layout(jobs: Sequence[Job], keys: Sequence[str]) -> tuple[list[list[Job | None]], list[str], list[str]]:
    """Rows x columns of jobs: by the two swept parameters when there are exactly two, else a square-ish grid."""
    if len(keys) == 2:
        rows_v = list(dict.fromkeys(j.override_dict().get(keys[0], "") for j in jobs))
        cols_v = list(dict.fromkeys(j.override_dict().get(keys[1], "") for j in jobs))
        grid: list[list[Job | None]] = [[None] * len(cols_v) for _ in rows_v]
        for job in jobs:
            d = job.override_dict()
            grid[rows_v.index(d.get(keys[0], ""))][cols_v.index(d.get(keys[1], ""))] = job
        return grid, [override_label(f"{keys[0]}={v}") or v for v in rows_v], [override_label(f"{keys[1]}={v}") or v for v in cols_v]
    cols = max(1, math.ceil(math.sqrt(len(jobs))))
    grid = [list(jobs[i : i + cols]) + [None] * (cols - len(jobs[i : i + cols])) for i in range(0, len(jobs), cols)]
    return grid, [], []


def contact_sheet(jobs: Sequence[Job], title: str = "") -> Image.Image:
    keys = swept_keys(jobs)
    best = best_job(jobs)
    grid, row_labels, col_labels = grid_layout(jobs, keys)
    font, small = _font(14), _font(11)
    caption_h, pad = 5 * 13 + 6, 8
    label_w = 120 if row_labels else 0
    n_cols = max(len(r) for r in grid) if grid else 1
    cell_w, cell_h = TILE + pad, TILE + caption_h + pad
    inputs = _inputs(jobs)
    top_h = 24 + (TILE // 2 + 20 if inputs else 0) + (18 if col_labels else 0)
    width = max(label_w + n_cols * cell_w + pad, len(inputs) * (TILE // 2 + pad) + pad, 400)
    sheet = Image.new("RGB", (width, top_h + len(grid) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title or f"{len(jobs)} runs", fill="black", font=font)
    x = pad
    for label, path in inputs:
        thumb = _thumbnail(path, TILE // 2)
        sheet.paste(thumb, (x, 24))
        draw.text((x, 24 + thumb.height + 2), label, fill="black", font=small)
        x += max(thumb.width, 100) + pad
    y0 = top_h
    for c, label in enumerate(col_labels):
        draw.text((label_w + pad + c * cell_w, y0 - 16), label, fill="black", font=small)
    for r, row in enumerate(grid):
        y = y0 + r * cell_h
        if row_labels:
            draw.text((pad, y + TILE // 2), row_labels[r], fill="black", font=small)
        for c, job in enumerate(row):
            if job is None:
                continue
            x = label_w + pad + c * cell_w
            if job.image:
                tile = _thumbnail(job.image, TILE)
                sheet.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
            else:
                draw.rectangle((x, y, x + TILE, y + TILE), fill=(200, 200, 200))
            if job is best:
                draw.rectangle((x - 3, y - 3, x + TILE + 2, y + TILE + 2), outline=(0, 160, 0), width=3)
            for i, line in enumerate(_caption(job, keys, job is best)):
                draw.text((x, y + TILE + 3 + i * 13), line, fill="black" if job.status == "completed" else "darkred", font=small)
    return sheet


# what ``summarize`` writes into its folder
SUMMARY_FILES = ("summary.csv", "summary.md", "contact_sheet.png", "_summary")


def foreign_files(out_dir: Path, sweep: bool = False) -> list[str]:
    """The files ``summarize`` (and with ``sweep`` a sweep, which writes ``multirun.yaml`` too) would write over
    in ``out_dir`` that nst_exp did not write: the summary's names where neither a sweep's ``multirun.yaml``
    nor a summary's own TensorBoard run is there, and a ``multirun.yaml`` that is not an nst_exp sweep's."""
    from nst_exp.sweep.resume import SWEEP_RECORD, made_by_a_sweep

    if made_by_a_sweep(out_dir):
        return []
    foreign = [SWEEP_RECORD] if sweep and (out_dir / SWEEP_RECORD).exists() else []
    if not any((out_dir / "_summary").glob("events.out.tfevents.*")):
        foreign += [name for name in SUMMARY_FILES if (out_dir / name).exists()]
    return foreign


def summarize(jobs: Sequence[Job], out_dir: Path, title: str = "", log_to_tensorboard: bool = True) -> dict[str, Path]:
    """Write contact_sheet.png, summary.csv and summary.md for ``jobs`` (see ``collect_jobs``) into ``out_dir``."""
    with writing("summary folder", out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_tables(jobs, out_dir)
    sheet = contact_sheet(jobs, title)
    sheet_path = save_png(sheet, out_dir / "contact_sheet.png", "contact sheet")
    if log_to_tensorboard:
        from nst_exp.run.logger import EVENT_FILE, _quiet_event_writer_threads

        _quiet_event_writer_threads()
        with writing(EVENT_FILE, out_dir / "_summary"):
            for stale in (out_dir / "_summary").glob("events.out.tfevents.*"):  # a resumed sweep, compare again: one sheet
                stale.unlink()
            _log_sheet(sheet, out_dir / "_summary")
            sessions = [{**settings(job), "experiment": job.labels.get("experiment") or "none"} for job in jobs if job.config]
            write_experiment(out_dir / "_summary", sessions)
            _log_best(best_job(jobs), out_dir / "_summary", len(jobs))
    return {"contact_sheet": sheet_path, "csv": csv_path, "md": md_path}


def _log_best(best: Job | None, log_dir: Path, step: int) -> None:
    """The best job as text in the ``_summary`` run (TEXT tab: ``sweep/best``), at step = the number of
    jobs, so a sweep summarised again as it grows (a continued study) shows its latest best last."""
    if best is None:
        return
    from torch.utils.tensorboard import SummaryWriter

    overrides = " ".join(f"`{o}`" for o in best.overrides) or "(none)"
    text = (
        f"**{best.path.name}**: result/objective {_fmt(best.metrics['result/objective'])}, "
        f"style {_fmt(best.metrics.get('result/eval_style'))}, content {_fmt(best.metrics.get('result/eval_content'))}  \n"
        f"overrides: {overrides}"
    )
    writer = SummaryWriter(str(log_dir))
    writer.add_text("sweep/best", text, step)
    writer.close()


def _log_sheet(sheet: Image.Image, log_dir: Path) -> None:
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    writer.add_image("sweep/contact_sheet", np.asarray(sheet), 0, dataformats="HWC")
    writer.close()
