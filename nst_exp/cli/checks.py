"""Checks on raw ``run`` overrides before Hydra sees them, for one-line errors on common slips.

Hydra reports a misspelt key or a value of the wrong type in five lines (and for a sweep only
once the sweep starts); here every override value is composed against the schema first, and
the first failure becomes one line naming the override, the problem and the fix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nst_exp.cli.compose import compose_config, first_line, quote_letters_beyond_ascii, quoting_fix
from nst_exp.config import CONF_DIR
from nst_exp.errors import UserError

MAX_COMPOSES = 64  # a sweep's values are checked one override at a time, up to this many compositions


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
                    + (
                        f"; fix: {key}={available[0]} or {key}.path=/path/to/image"
                        if key in ("content", "style")
                        else f"; fix: {key}={available[0]}"
                    )
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
        parsed = parser.parse_overrides(quote_letters_beyond_ascii([a for a in argv if not a.startswith("-")]))
    except OverrideParseException as exc:
        raise UserError(f"cannot read the override {exc.override!r}: {first_line(exc)}; fix: {quoting_fix(exc.override)}") from None
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
    trials = [fixed + first] + [fixed + first[:i] + [line] + first[i + 1 :] for i, lines in enumerate(sweeps) for line in lines[1:]]
    for overrides in trials[:MAX_COMPOSES]:
        try:
            cfg = compose_config(overrides)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - not a slip this check knows: Hydra reports it as always
            continue
        check_values(cfg)
    check_launch(fixed + first, multirun="-m" in argv or "--multirun" in argv)


def check_values(cfg: Any) -> None:
    """What a job would find wrong at its start: values (``validate``) and input images (missing,
    unreadable, too large, too small a short side at some size), so a sweep fails before any job runs."""
    from nst_exp.config import validate
    from nst_exp.run.input_checks import check_inputs

    validate(cfg)
    from nst_exp.run.loggers import check_available

    check_available(cfg.logging.loggers)  # an optional logger that is not installed: before any job
    if cfg.resume:
        from pathlib import Path

        from nst_exp.run.folder import check_resume_target

        check_resume_target(Path(cfg.resume))
        return  # the resumed run's own config (its images) is read by the job
    check_inputs(cfg)


def check_launch(overrides: list[str], multirun: bool) -> None:
    """The output folder can be made, and a cluster time limit leaves time to work (hydra.* settings)."""
    from hydra.types import RunMode

    from nst_exp.sweep.cluster import check_time_limit

    try:
        hydra = compose_config(overrides, with_hydra=True).hydra
    except Exception:  # noqa: BLE001 - composition errors were reported above; the rest is Hydra's to report
        return
    raw = OmegaConf.to_container(hydra, resolve=False)  # ${now:...} needs Hydra's run to resolve
    multirun = multirun or hydra.mode == RunMode.MULTIRUN
    folder = raw["sweep"]["dir"] if multirun else raw["run"]["dir"]
    check_writable(str(folder), "hydra.sweep.dir" if multirun else "hydra.run.dir")
    check_time_limit(raw.get("launcher") or {})
    sweeper = raw.get("sweeper") or {}
    if multirun and sweeper.get("_target_") == "hydra_plugins.nst_exp_sweepers.NstOptunaSweeper":
        from nst_exp.sweep.optuna_sweeper import check_settings

        check_settings(sweeper)


def check_writable(template: str, key: str) -> None:
    """The folder part of ``template`` before any ``${...}`` can be made, and written to (Hydra would
    otherwise fail with a traceback while making the job's folder)."""
    existing = Path(template.split("${", 1)[0] or ".").expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    problem = None if existing.is_dir() else "is not a folder"
    if problem is None:
        try:
            with tempfile.TemporaryDirectory(dir=existing):  # made and removed: nothing is left behind
                pass
        except OSError as exc:
            problem = f"cannot be written to ({exc.strerror or exc})"
    if problem:
        raise UserError(
            f"cannot create the output folder {template}: {existing} {problem}; "
            f"fix: {key}=/a/writable/path (or run from a folder you can write to)"
        )


def _is_plain(parser: Any, line: str) -> bool:
    """A sweep value that reads back as the same single value (not a sweep, not a parse error)."""
    try:
        return not parser.parse_overrides([line])[0].is_sweep_override()
    except Exception:  # noqa: BLE001 - an odd value: Hydra will judge it
        return False
