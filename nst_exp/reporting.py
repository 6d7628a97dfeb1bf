"""What a finished (or failed) job leaves behind for summaries: ``result.json`` in its folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"

# Every run logs exactly these HPARAMS metrics, so TensorBoard's table is complete in any sweep.
HPARAM_METRICS = (
    "hp/loss_total",
    "hp/loss_content",
    "hp/loss_style",
    "hp/eval_content",
    "hp/eval_style",
    "hp/objective",
    "hp/wall_time_s",
    "hp/steps",
)


# How a run or job ended. Only "completed" is a result a sweep may compare; "interrupted" is a run
# stopped by Ctrl-C or a signal (last.ckpt continues it), the rest are final outcomes.
STATUSES = ("completed", "interrupted", "diverged", "failed", "cancelled", "timed_out")


def write_result(
    run_dir: Path,
    status: str,
    error: str | None = None,
    image: str | None = None,
    metrics: dict[str, float] | None = None,
    cfg: Any = None,
    interruptions: list[dict[str, Any]] | None = None,
    labels: dict[str, str | None] | None = None,
) -> None:
    """result.json of a run (``status`` one of STATUSES); ``interruptions`` lists the signals it survived,
    ``labels`` its content, style and experiment (default: from ``cfg`` and the Hydra job)."""
    from nst_exp.labels import labels_of

    payload = {
        "status": status,
        "error": error,
        "image": image,
        "metrics": metrics or {},
        **(labels or labels_of(cfg)),
        "interruptions": interruptions or [],
    }
    _write(run_dir, payload)


def record_failure(run_dir: Path, message: str, cfg: Any = None) -> None:
    """A run that failed: a new folder gets a failed result.json; a folder with an earlier run keeps what
    it holds (image, metrics), marked failed, and a completed run's record is never overwritten by a
    failed attempt to continue it."""
    existing = read_result(run_dir)
    if existing is None:
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
    """Atomic: a job killed while writing never leaves a torn result.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(run_dir / RESULT_FILE)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
