"""Checks on raw ``run`` overrides before Hydra sees them, for one-line errors on common slips."""

from __future__ import annotations

from nst_exp.config import CONF_DIR
from nst_exp.errors import UserError


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_run_overrides(overrides: list[str]) -> None:
    """``style=nope`` -> one line listing the presets, instead of Hydra's multi-line report."""
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if "." in key or key.startswith("hydra") or not (CONF_DIR / key).is_dir():
            continue
        available = presets(key)
        for choice in value.split(","):
            if choice and choice != "null" and choice not in available and not choice.startswith(("choice(", "range(", "glob(")):
                raise UserError(
                    f"unknown {key} preset {choice!r}; available: {', '.join(available)}"
                    + (f"; fix: {key}={available[0]} or {key}.path=/path/to/image" if key in ("content", "style") else f"; fix: {key}={available[0]}")
                )
