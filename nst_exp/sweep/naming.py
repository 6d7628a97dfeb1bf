"""Readable, filesystem-safe, bounded folder names for sweep jobs, built from their overrides.

Hydra's own ``override_dirname`` keeps ``/`` (nested folders for path values), brackets and
commas, and fails with "File name too long" on long override lists. Here every job folder is
``<num>_<key=value,...>`` with keys shortened to their last part, paths to their file stem,
unsafe characters replaced, and a hash suffix when the name would exceed ``MAX_LEN``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

MAX_LEN = 96
# Overrides that do not distinguish jobs' results (logging, hardware) are left out of names.
_IGNORED_PREFIXES = (
    "hydra.", "logging.", "trainer.accelerator", "trainer.devices", "trainer.device_index", "launcher", "hparams_search",
)
_LONG_FLOAT = re.compile(r"^-?\d+\.\d{5,}(e-?\d+)?$")
_IMAGE_FILE = re.compile(r"\.(png|jpe?g|webp|tiff?|bmp|gif)$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


def _short_value(value: str) -> str:
    value = value.replace("\\:", ":").strip().strip("'\"").replace("builtin:", "")
    if "/" in value or "\\" in value or _IMAGE_FILE.search(value):  # a path: its file stem says enough
        value = re.split(r"[/\\]", value.rstrip("/\\"))[-1]
        value = _IMAGE_FILE.sub("", value)
    if _LONG_FLOAT.match(value):  # a sampled float: 4 significant digits say enough
        value = f"{float(value):.4g}"
    return value


def override_label(override: str) -> str | None:
    """``loss.style_weight=1e4`` -> ``style_weight=1e4``; ignored keys -> None."""
    key, sep, value = override.lstrip("+~").partition("=")
    if not sep or key.startswith(_IGNORED_PREFIXES):
        return None
    parts = key.split(".")
    short_key = parts[-2] if len(parts) > 1 and parts[-1] in ("path", "name") else parts[-1]
    return f"{short_key}={_short_value(value)}"


def job_dirname(overrides: Iterable[str], max_len: int = MAX_LEN) -> str:
    labels = [label for o in overrides if (label := override_label(str(o)))]
    name = _UNSAFE.sub("-", ",".join(labels)).strip("-.") or "default"
    if len(name) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name[: max_len - 9].rstrip(",-.") + "_" + digest
    return name


def register_resolvers() -> None:
    """``${nst_dirname:${hydra.overrides.task}}`` in conf/config.yaml's ``hydra.sweep.subdir``."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("nst_dirname", lambda overrides: job_dirname(overrides), replace=True)
