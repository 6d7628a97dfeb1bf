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


def write_result(
    run_dir: Path,
    status: str,
    error: str | None = None,
    image: str | None = None,
    metrics: dict[str, float] | None = None,
    cfg: Any = None,
) -> None:
    """status: completed | interrupted | diverged | failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "status": status,
        "error": error,
        "image": image,
        "metrics": metrics or {},
        "content": getattr(getattr(cfg, "content", None), "name", None),
        "style": getattr(getattr(cfg, "style", None), "name", None),
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(payload, indent=2, default=str))


def record_failure(run_dir: Path, message: str, cfg: Any = None) -> None:
    write_result(run_dir, "failed", error=message, cfg=cfg)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
