"""What a run is called: the images it really used (their file stems) and its experiment.

One source for every label a person reads: the run folder's name, result.json, the summary
tables, the contact sheet and TensorBoard's HPARAMS table. A preset's image and a user's
``content.path=/my/coffee.png`` are named the same way, by the file actually opened.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

_SAFE = r"\w.+"  # what a folder name keeps anywhere, and "-": letters and digits of any script (é, ß, 猫), "_", ".", "+"
MAX_PART = 40  # characters of one image's stem in a folder name


def path_stem(path: Any) -> str | None:
    """``builtin:starry_night.jpg`` -> ``starry_night``; ``/my/photos/coffee.png`` -> ``coffee``."""
    if path is None:
        return None
    text = str(path).strip()
    if not text or text == "???":
        return None
    if text.startswith("builtin:"):
        text = text[len("builtin:") :]
    return PurePath(text.replace("\\", "/")).stem or None


def image_label(node: Any) -> str | None:
    """The label of a ``content``/``style`` config node: its explicit ``name``, else its file's stem."""
    if node is None:
        return None
    name = getattr(node, "name", None) if not isinstance(node, dict) else node.get("name")
    path = getattr(node, "path", None) if not isinstance(node, dict) else node.get("path")
    return str(name) if name not in (None, "", "???") else path_stem(path)


def safe_part(text: str, limit: int | None = MAX_PART, keep: str = "") -> str:
    """A filesystem-safe piece of a folder name: letters of any script are kept (NFC: ``café`` stays
    ``café``); each run of other characters outside ``_SAFE``, ``keep`` and ``-`` (``/``, spaces, control
    characters, quotes...) becomes one ``-``; at most ``limit`` characters and ``limit`` bytes in UTF-8."""
    unsafe = re.compile(f"[^{_SAFE}{re.escape(keep)}-]+")  # "-" last: a literal, not a range
    cleaned = unsafe.sub("-", unicodedata.normalize("NFC", text)).strip("-.")
    return cut_bytes(cleaned, limit).rstrip("-.") if limit is not None else cleaned


def cut_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters and ``limit`` UTF-8 bytes (a file name's limit is in
    bytes), never inside a character."""
    text = text[:limit]
    while len(text.encode()) > limit:
        text = text[:-1]
    return text


def run_label(content: str | None, style: str | None, experiment: str | None = None) -> str:
    """``[experiment_]content_style``, e.g. ``fast_coffee_starry_night``: a run folder's suffix."""
    parts = [p for p in (experiment, content, style) if p]
    return "_".join(safe_part(p) for p in parts) or "run"


def dated_name(label: str | None = None, now: datetime | None = None) -> str:
    """``<date>/<time with microseconds>[_label]``: how every run and sweep folder is named under its root
    (the CLI's ``hydra.run.dir`` and ``hydra.sweep.dir`` through ``sweep/naming.py``'s resolvers, and
    ``nst_exp.stylize``'s folders)."""
    now = now or datetime.now()
    stamp = now.strftime("%H-%M-%S-%f")
    return f"{now.strftime('%Y-%m-%d')}/{stamp}_{label}" if label else f"{now.strftime('%Y-%m-%d')}/{stamp}"


def run_folder(
    root: str | Path, content: str | None, style: str | None, experiment: str | None = None, now: datetime | None = None
) -> Path:
    """A single run's folder: ``root/<date>/<time>_[experiment_]content_style``."""
    return Path(root) / dated_name(run_label(content, style, experiment), now)


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
