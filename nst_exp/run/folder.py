"""The run folder: the one module that names its files and writes them.

A run (CLI job, sweep job, ``nst_exp.stylize``) writes only into its folder:

- ``config.yaml``: the composed config (``write_config``), written before the first step;
- ``provenance.yaml``: versions, commit, device, weights, seed, every ``auto`` as resolved
  (``write_provenance``; the record is ``run.provenance``'s, also in result.json);
- ``final.png``: the image (``save_final``), also on Ctrl-C or divergence; ``final.tif`` too with
  ``logging.save_tiff``;
- ``last.ckpt``: the resume state (``CHECKPOINT``; its contents are ``run.checkpoint``'s);
- ``result.json``: status, error, image, final metrics, labels, interruptions (``write_result``,
  ``record_failure``, ``mark_ended``),
  what sweep summaries and ``compare`` read (``read_result``);
- ``snapshots/``: image snapshots as PNGs when ``logging.save_snapshots``;
- TensorBoard's event file (``run.logger``) and Hydra's ``.hydra/`` (overrides; a single run's is
  moved in from a staging folder once the run is accepted, ``cli/run.py``).

Nothing is made before a run is accepted (``check_target`` reads only; ``create`` comes after every
check; a folder holding a user's own files under these names is refused, ``made_by_nst_exp``), and every file
is written atomically (``nst_exp.files``): a refused run or a full disk never
leaves a torn or rewritten record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.yaml"
FINAL_IMAGE = "final.png"
FINAL_TIFF = "final.tif"  # with logging.save_tiff, for print workflows
CHECKPOINT = "last.ckpt"
RESULT_FILE = "result.json"
SNAPSHOT_DIR = "snapshots"
# what a run writes under fixed names (a user's own file of that name in the folder is never written over)
RUN_FILES = (CONFIG_FILE, PROVENANCE_FILE, FINAL_IMAGE, FINAL_TIFF, CHECKPOINT, RESULT_FILE, SNAPSHOT_DIR)


def check_target(run_dir: Path, resume: str | None = None) -> None:
    """Refuse, writing nothing, a folder that cannot be made or written, and a finished run's folder: one
    with a final image, no last.ckpt and a final result (``FINAL_RESULTS``, or none) is only continued by
    ``resume=`` pointing at it. A failed, cancelled or timed-out run's folder runs again."""
    from nst_exp.errors import UserError
    from nst_exp.files import unwritable

    problem = unwritable(run_dir)
    if problem:
        raise UserError(
            f"cannot write the run folder {run_dir}: {problem}; fix: a writable place "
            "(hydra.run.dir=/path for a run, hydra.sweep.dir=/path for a sweep, output_dir= in Python)"
        )
    result = read_result(run_dir)
    foreign = [name for name in RUN_FILES if (run_dir / name).exists()] if not made_by_nst_exp(run_dir, result) else []
    if foreign:
        raise UserError(
            f"{run_dir} holds files that no nst_exp run wrote ({', '.join(foreign)}), which a run there would overwrite; "
            "fix: another folder (hydra.run.dir=/path for a run, output_dir= in Python)"
        )
    resuming_here = bool(resume) and Path(resume).resolve() == run_dir.resolve()
    finished = result is None or result.get("status") in FINAL_RESULTS
    if (run_dir / FINAL_IMAGE).exists() and not (run_dir / CHECKPOINT).exists() and finished and not resuming_here:
        raise UserError(f"{run_dir} already holds a finished run; fix: another folder, or resume={run_dir} to continue it")


def made_by_nst_exp(run_dir: Path, result: dict[str, Any] | None) -> bool:
    """The folder holds a run's record: its result.json (``result``, as ``read_result`` read it) with a run's
    status, or a provenance.yaml naming nst_exp's version (written before the first step), so that a run there
    may write over its files."""
    if isinstance(result, dict) and result.get("status") in STATUSES:
        return True
    versions = (read_provenance(run_dir) or {}).get("versions")
    return isinstance(versions, dict) and "nst_exp" in versions


def check_resume_target(src: Path) -> None:
    """``resume=`` names a run folder made by nst_exp; else one line saying what it is, before anything is written."""
    from nst_exp.errors import UserError

    hint = "point resume at a run folder made by nst_exp (it holds config.yaml and final.png or last.ckpt)"
    if not src.exists():
        raise UserError(f"resume={src} does not exist; fix: {hint}")
    if not src.is_dir():
        raise UserError(f"resume={src} is not a folder; fix: {hint}")
    if not (src / CONFIG_FILE).is_file():
        jobs = sorted(p.parent.name for p in src.glob(f"*/{CONFIG_FILE}"))
        if jobs or (src / "multirun.yaml").is_file():
            example = f"resume={src / jobs[0]}" if jobs else f"resume={src}/<job folder>"
            raise UserError(f"resume={src} is a sweep folder, not a run; fix: resume one of its jobs, e.g. {example}")
        raise UserError(f"resume={src} is not a run folder made by nst_exp (no {CONFIG_FILE}); fix: {hint}")


def create(run_dir: Path) -> Path:
    """Make the run folder, once the run is accepted (``check_target`` and every other check passed)."""
    from nst_exp.files import writing

    with writing("run folder", run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare(run_dir: Path, resume: str | None = None) -> Path:
    """``check_target`` then ``create``: for callers with nothing to check in between."""
    check_target(run_dir, resume)
    return create(run_dir)


def write_config(run_dir: Path, cfg: Any) -> Path:
    from omegaconf import OmegaConf

    from nst_exp.files import write_text

    return write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True), "run's config")


def write_provenance(run_dir: Path, record: dict[str, Any]) -> Path:
    import yaml

    from nst_exp.files import write_text

    return write_text(run_dir / PROVENANCE_FILE, yaml.safe_dump(record, sort_keys=False), "run's provenance")


def read_provenance(run_dir: Path) -> dict[str, Any] | None:
    """``write_provenance``'s record, or None where there is none that reads as one."""
    import yaml

    try:
        record = yaml.safe_load((run_dir / PROVENANCE_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return record if isinstance(record, dict) else None


def save_final(run_dir: Path, image: Any, tiff: bool = False) -> Path:
    """The run's image (a tensor in [0, 1] or a PIL image), written atomically; also as TIFF if ``tiff``."""
    from nst_exp.images import save_png, tensor_to_pil

    pil = image if not hasattr(image, "detach") else tensor_to_pil(image)
    if tiff:
        save_png(pil, run_dir / FINAL_TIFF, "final image")
    return save_png(pil, run_dir / FINAL_IMAGE, "final image")


def final_image(run_dir: Path) -> Path | None:
    path = run_dir / FINAL_IMAGE
    return path if path.is_file() else None


# How a run or job ended. Only "completed" is a result a sweep may compare; "interrupted" is a run
# stopped by Ctrl-C or a signal (last.ckpt continues it), "pruned" an Optuna trial its study's pruner
# stopped early (a finished trial, not a failure), the rest are final outcomes.
STATUSES = ("completed", "pruned", "interrupted", "diverged", "failed", "cancelled", "timed_out")
FINISHED = ("completed", "pruned")  # outcomes a sweep counts as done: rerunning the job would repeat it
# A sweep run again (resume=<sweep folder>) keeps these jobs; the others run again (from last.ckpt if any).
FINAL_RESULTS = (*FINISHED, "diverged")


def write_result(
    run_dir: Path,
    status: str,
    error: str | None = None,
    image: str | None = None,
    metrics: dict[str, float] | None = None,
    cfg: Any = None,
    interruptions: list[dict[str, Any]] | None = None,
    labels: dict[str, str | None] | None = None,
    tile_plans: list[dict[str, Any]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> None:
    """result.json of a run (``status`` one of STATUSES); ``interruptions`` lists the signals it survived,
    ``labels`` its content, style and experiment (default: from ``cfg`` and the Hydra job), ``tile_plans``
    how each stage evaluated its loss (whole, or which tiles), ``provenance`` what ran it (``run.provenance``)."""
    from nst_exp.labels import labels_of

    payload = {
        "status": status,
        "error": error,
        "image": image,
        "metrics": metrics or {},
        **(labels or labels_of(cfg)),
        "interruptions": interruptions or [],
        "tile_plans": tile_plans or [],
        "provenance": provenance or {},
    }
    _write(run_dir, payload)


def record_failure(run_dir: Path, message: str, cfg: Any = None) -> None:
    """A run that failed: a new folder gets a failed result.json; a folder with an earlier run keeps what
    it holds (image, metrics), marked failed, and a completed run's record is never overwritten by a
    failed attempt to continue it."""
    existing = read_result(run_dir)
    if existing is None or not isinstance(existing, dict):
        write_result(run_dir, "failed", error=message, cfg=cfg)
    elif existing.get("status") != "completed":
        mark_ended(run_dir, "failed", message)


def mark_ended(run_dir: Path, status: str, error: str, overrides: list[str] | None = None) -> None:
    """Set the final status of a job that ended without finishing its run (cancelled, killed, out of
    requeues), keeping what its folder already says (image, partial metrics, interruptions)."""
    payload = read_result(run_dir) or {"image": None, "metrics": {}, "interruptions": []}
    payload.update(status=status, error=error)
    if overrides is not None:
        payload["overrides"] = list(overrides)
    _write(run_dir, payload)


def _write(run_dir: Path, payload: dict[str, Any]) -> None:
    """Atomic: a job killed while writing, or a full disk, never leaves a torn result.json."""
    from nst_exp.files import write_text

    write_text(run_dir / RESULT_FILE, json.dumps(payload, indent=2, default=str), "run record")


def read_result(run_dir: Path) -> dict[str, Any] | None:
    from nst_exp.run.metrics import current_names

    path = run_dir / RESULT_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(payload, dict) and isinstance(payload.get("metrics"), dict):
        payload["metrics"] = current_names(payload["metrics"])
    return payload
