"""Checks on raw ``run`` overrides before Hydra sees them, for one-line errors on common slips.

Hydra reports a misspelt key or a value of the wrong type in five lines (and for a sweep only
once the sweep starts); here every override value is composed against the schema first, and
the first failure becomes one line naming the override, the problem and the fix.
"""

from __future__ import annotations

import re
from typing import Any

from nst_exp.config import CONF_DIR
from nst_exp.errors import UserError

MAX_COMPOSES = 64  # a sweep's values are checked one override at a time, up to this many compositions
KEYS_HINT = "python -m nst_exp run --cfg job prints every key with its value"


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


def check_overrides_compose(argv: list[str]) -> None:
    """Compose the config with each value of each override; raise UserError (one line) at the first that fails.

    Values that cannot be listed before the sweep (``interval``, ``glob``) are left to Hydra, as
    are command lines with Hydra flags other than ``-m``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([a for a in argv if not a.startswith("-")])
    except OverrideParseException as exc:
        raise UserError(f"cannot read the override {exc.override!r}: {_first_line(exc)}; fix: key=value, "
                        "quote values with spaces or commas ('key=\"a, b\"')") from None
    fixed: list[str] = []
    sweeps: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        try:
            lines = [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
        except HydraException:
            continue  # interval() or glob(): the sweeper draws the values
        if lines and all(_is_plain(parser, line) for line in lines):
            sweeps.append(lines)
    first = [lines[0] for lines in sweeps]
    trials = [fixed + first] + [
        fixed + first[:i] + [line] + first[i + 1:] for i, lines in enumerate(sweeps) for line in lines[1:]
    ]
    for overrides in trials[:MAX_COMPOSES]:
        _compose(overrides)


def _is_plain(parser: Any, line: str) -> bool:
    """A sweep value that reads back as the same single value (not a sweep, not a parse error)."""
    try:
        return not parser.parse_overrides([line])[0].is_sweep_override()
    except Exception:  # noqa: BLE001 - an odd value: Hydra will judge it
        return False


def _compose(overrides: list[str]) -> None:
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from nst_exp.config import compose_config

    try:
        compose_config(overrides)
    except MissingConfigException as exc:
        problem = re.sub(r"^In '[^']*': ", "", _first_line(exc))
        fix = f"one of {', '.join(exc.options)}" if exc.options else "check the group and preset names"
        raise UserError(f"{problem}; fix: {fix}") from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        override = _first_line(exc).rsplit(" ", 1)[-1].strip("'.")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            key = getattr(cause, "full_key", None) or override.split("=")[0]
            raise UserError(f"unknown config key '{key}'; fix: {_spelling_fix(key)}") from None
        if isinstance(cause, OmegaConfBaseException):
            key = getattr(cause, "full_key", None) or override.split("=")[0]
            fix = f"a list, e.g. {key}=[{override.partition('=')[2]}]" if "ListConfig" in str(cause) else f"give {key} a value of its type ({KEYS_HINT})"
            raise UserError(f"bad value in '{override}': {_first_line(cause)}; fix: {fix}") from None
        raise UserError(f"{_first_line(exc)}; fix: {KEYS_HINT}") from None
    except Exception:  # noqa: BLE001 - not a slip this check knows: Hydra reports it as always
        return


def _spelling_fix(key: str) -> str:
    """'did you mean ...' from the keys next to ``key`` in the default config, else where to look."""
    import difflib

    from omegaconf import DictConfig, OmegaConf

    from nst_exp.config import compose_config

    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(compose_config(), parent) if parent else compose_config()
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(name, [str(k) for k in keys], n=1)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    return f"check its spelling ({KEYS_HINT})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
