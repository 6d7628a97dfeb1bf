"""The run folder: the one module that names its files and writes them.

A run (CLI job, sweep job, ``nst_exp.stylize``) writes only into its folder:

- ``config.yaml``: the composed config (``write_config``), written before the first step;
- ``final.png``: the image (``save_final``), also on Ctrl-C or divergence;
- ``last.ckpt``: the resume state (``CHECKPOINT``; its contents are ``run.checkpoint``'s);
- ``result.json``: status, error, image, final metrics (``write_result``, ``record_failure``),
  what sweep summaries and ``compare`` read (``read_result``);
- ``snapshots/``: image snapshots as PNGs when ``logging.save_snapshots``;
- TensorBoard's event file (``run.logger``) and Hydra's ``.hydra/`` (overrides).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
FINAL_IMAGE = "final.png"
CHECKPOINT = "last.ckpt"
RESULT_FILE = "result.json"
SNAPSHOT_DIR = "snapshots"


def write_config(run_dir: Path, cfg: Any) -> Path:
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def save_final(run_dir: Path, image: Any) -> Path:
    """The run's image (a tensor in [0, 1] or a PIL image), written atomically."""
    from nst_exp.images import save_png

    return save_png(image, run_dir / FINAL_IMAGE)


def final_image(run_dir: Path) -> Path | None:
    path = run_dir / FINAL_IMAGE
    return path if path.is_file() else None

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


def record_failure(run_dir: Path, message: str, cfg: Any = None, keep_existing: bool = False) -> None:
    """``keep_existing``: only if the job left no result.json (the Hydra callback's fallback)."""
    if keep_existing and read_result(run_dir) is not None:
        return
    write_result(run_dir, "failed", error=message, cfg=cfg)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
