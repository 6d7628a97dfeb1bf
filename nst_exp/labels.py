"""What a run is called: the images it really used (their file stems) and its experiment.

One source for every label a person reads: the run folder's name, result.json, the summary
tables, the contact sheet and TensorBoard's HPARAMS table. A preset's image and a user's
``content.path=/my/coffee.png`` are named the same way, by the file actually opened.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

_SAFE = "A-Za-z0-9._+"  # characters a folder name keeps anywhere, and "-"
MAX_PART = 40  # characters of one image's stem in a folder name


def path_stem(path: Any) -> str | None:
    """``builtin:starry_night.jpg`` -> ``starry_night``; ``/my/photos/coffee.png`` -> ``coffee``."""
    if path is None:
        return None
    text = str(path).strip()
    if not text or text == "???":
        return None
    if text.startswith("builtin:"):
        text = text[len("builtin:"):]
    return PurePath(text.replace("\\", "/")).stem or None


def image_label(node: Any) -> str | None:
    """The label of a ``content``/``style`` config node: its explicit ``name``, else its file's stem."""
    if node is None:
        return None
    name = getattr(node, "name", None) if not isinstance(node, dict) else node.get("name")
    path = getattr(node, "path", None) if not isinstance(node, dict) else node.get("path")
    return str(name) if name not in (None, "", "???") else path_stem(path)


def safe_part(text: str, limit: int | None = MAX_PART, keep: str = "") -> str:
    """A filesystem-safe piece of a folder name: each run of characters outside ``_SAFE``, ``keep`` and
    ``-`` becomes one ``-``; at most ``limit`` characters."""
    unsafe = re.compile(f"[^{_SAFE}{re.escape(keep)}-]+")  # "-" last: a literal, not a range
    return unsafe.sub("-", text).strip("-.")[:limit].rstrip("-.")


def run_label(content: str | None, style: str | None, experiment: str | None = None) -> str:
    """``[experiment_]content_style``, e.g. ``fast_coffee_starry_night``: a run folder's suffix."""
    parts = [p for p in (experiment, content, style) if p]
    return "_".join(safe_part(p) for p in parts) or "run"


def hydra_experiment() -> str | None:
    """The ``experiment=`` choice of the running Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside a Hydra job there is no choice
        return None


def labels_of(cfg: Any, experiment: str | None = None) -> dict[str, str | None]:
    """What result.json, summaries and HPARAMS call a run: its images' labels and its experiment."""
    return {
        "content": image_label(getattr(cfg, "content", None)),
        "style": image_label(getattr(cfg, "style", None)),
        "experiment": experiment or hydra_experiment(),
    }
