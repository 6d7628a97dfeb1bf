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

from nst_exp.labels import cut_bytes, dated_name, image_label, path_stem, run_label, safe_part

MAX_LEN = 96
# Overrides that do not distinguish jobs' results (logging, hardware) are left out of names.
_IGNORED_PREFIXES = (
    "hydra.",
    "logging.",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.device_index",
    "launcher",
    "hparams_search",
    "optuna.",
)
_LONG_FLOAT = re.compile(r"^-?\d+\.\d{5,}(e-?\d+)?$")
_IMAGE_FILE = re.compile(r"\.(png|jpe?g|webp|tiff?|bmp|gif)$", re.IGNORECASE)
_INTERPOLATION = re.compile(r"^\$\{(?:hydra:|oc\.env:)?([^}]*)\}$")  # ${hydra:job.num} -> job.num


def _short_value(value: str) -> str:
    for escaped in ("\\:", "\\{", "\\}"):  # Hydra escapes these in the overrides it hands over
        value = value.replace(escaped, escaped[1])
    value = value.strip().strip("'\"").replace("builtin:", "")
    if match := _INTERPOLATION.match(value):  # resolved in the job: name what it reads (it has no other text)
        value = match.group(1)
    if "/" in value or "\\" in value or _IMAGE_FILE.search(value):  # a path: its file stem says enough
        value = re.split(r"[/\\]", value.rstrip("/\\"))[-1]
        value = _IMAGE_FILE.sub("", value)
    if _LONG_FLOAT.match(value):  # a sampled float: 4 significant digits say enough
        value = f"{float(value):.4g}"
    return value


def _preset_image_stem(group: str, preset: str) -> str:
    """``style=hubble`` names the image the preset opens (``hubble_deep_field``), as a path override would."""
    import yaml

    from nst_exp.config import CONF_DIR

    try:
        path = (yaml.safe_load((CONF_DIR / group / f"{preset}.yaml").read_text()) or {}).get("path")
    except (OSError, yaml.YAMLError, AttributeError):
        return preset
    return path_stem(path) or preset


def override_label(override: str) -> str | None:
    """``loss.style_weight=1e4`` -> ``style_weight=1e4``; paths and image presets -> their file stem
    (``style=hubble`` -> ``style=hubble_deep_field``); ignored keys -> None."""
    key, sep, value = override.lstrip("+~").partition("=")
    if not sep or key.startswith(_IGNORED_PREFIXES):
        return None
    if key in ("content", "style") and "/" not in value:
        return f"{key}={_preset_image_stem(key, value.strip())}"
    parts = key.split(".")
    short_key = parts[-2] if len(parts) > 1 and parts[-1] in ("path", "name") else parts[-1]
    return f"{short_key}={_short_value(value)}"


def job_dirname(overrides: Iterable[str], max_len: int = MAX_LEN) -> str:
    labels = [label for o in overrides if (label := override_label(str(o)))]
    name = safe_part(",".join(labels), limit=None, keep="=,") or "default"
    if len(name.encode()) > max_len:  # bytes: a file name's limit, and letters such as é take two
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = cut_bytes(name, max_len - 9).rstrip(",-.") + "_" + digest
    return name


def run_name(content_path: str, content_name: str | None, style_path: str, style_name: str | None, experiment: str | None) -> str:
    """A single run's folder under its root (``labels.dated_name``), labelled by the images really used."""
    content = image_label({"path": content_path, "name": content_name})
    style = image_label({"path": style_path, "name": style_name})
    return dated_name(run_label(content, style, experiment))


def register_resolvers() -> None:
    """``${nst_dirname:...}`` (sweep job folders), ``${nst_run_name:...}`` (single runs) and ``${nst_dated:}``
    (sweeps) in conf/config.yaml. The dated ones are cached, as Hydra's ``${now:...}``: every read of one
    config (and of its sweep's job configs, which copy the cache) gives the same folder."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("nst_dirname", lambda overrides: job_dirname(overrides), replace=True)
    OmegaConf.register_new_resolver("nst_run_name", run_name, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("nst_dated", lambda: dated_name(), replace=True, use_cache=True)
