"""Composing the config (conf/ + the typed schema) with overrides, as the CLI and the notebook API do.

A slip (unknown key, wrong type, missing preset) becomes one ``UserError`` line naming the
override and the fix, with "did you mean" for a misspelt key, whether it came from the command
line, ``overrides=[...]`` or keyword settings in Python.

It sits below both entry points (``cli`` and ``api``) and above ``sweep``: composing registers
this package's launcher plugins, which call the sweep driver.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nst_exp.errors import UserError

KEYS_HINT = "python -m nst_exp run --cfg job prints every key with its value"


def compose_config(overrides: list[str] | None = None, with_hydra: bool = False, **settings: Any) -> Any:
    """The CLI's config (conf/ + schema) with Hydra-style ``overrides`` and nested ``settings`` merged on top.

    ``settings`` are group names mapped to dicts, e.g. ``image={"size": 128}``, or top-level
    keys such as ``seed=1``; they are type-checked against the schema like CLI overrides.
    ``with_hydra`` keeps the ``hydra`` node (launcher, output folders, the groups' choices).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nst_exp.config import CONF_DIR, register_configs

    register_configs()
    register_launchers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="nst_api"):
            cfg = compose("config", overrides=quote_letters_beyond_ascii(list(overrides or [])), return_hydra_config=with_hydra)
    except Exception as exc:  # noqa: BLE001 - a slip becomes one line; anything else stays as it was
        raise _user_error(exc) or exc from None
    if settings:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(settings))
        except OmegaConfBaseException as exc:
            key = str(getattr(exc, "full_key", "") or "")
            if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
                raise UserError(f"unknown config key '{key}'; fix: {_spelling_fix(key)}") from None
            raise UserError(f"bad value for '{key}': {first_line(exc)}; fix: give {key} a value of its type ({KEYS_HINT})") from None
    return cfg


_GRAMMAR_CHARS = set(",[]{}()'\"\\$=:")  # what makes an override value a list, a sweep, an interpolation...


def quote_letters_beyond_ascii(argv: list[str]) -> list[str]:
    """Overrides whose value has letters beyond ASCII (a path like café.jpg or 星夜.png), which Hydra's
    grammar reads only quoted, quoted for it; values with any of the grammar's own characters are left
    as typed (a sweep's commas, a list's brackets)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        plain = sep and not arg.startswith("-") and value and not value.isascii() and not (_GRAMMAR_CHARS & set(value))
        out.append(f"{key}='{value}'" if plain else arg)
    return out


def quoting_fix(override: str, sweep: bool = True) -> str:
    """How to write an override Hydra's grammar refused: a value with letters beyond ASCII (a path's 'café'
    or '星夜') must be quoted, each of a sweep's comma-separated values (``sweep``) or the whole value (the
    Python API, which runs no sweeps); anything else gets the general form."""
    key, sep, value = override.partition("=")
    if not sep or value[:1] in "'\"" or value.isascii():
        return "key=value, quote values with spaces or commas ('key=\"a, b\"')"
    quote = '"' if "'" in value else "'"
    quoted = ",".join(f"{quote}{v}{quote}" for v in (value.split(",") if sweep else [value]))
    shell = f' (in the shell: "{key}={quoted}")' if sweep else ""  # the command line; the API takes the string as is
    return f"quote the value, e.g. {key}={quoted}{shell}"


def register_launchers() -> None:
    """Make the launchers of ``hydra_plugins.nst_exp_launchers`` and the sweeper of
    ``hydra_plugins.nst_exp_sweepers`` (with its config, ``hydra/sweeper: nst_optuna``) known to Hydra.

    An editable install puts them where Python imports them but where Hydra's plugin scan does not look.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.nst_exp_sweepers import NstOptunaSweeper

    Plugins.instance().register(NstOptunaSweeper)
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.nst_exp_launchers import NstLocalLauncher, NstSlurmLauncher
    except ImportError:  # the [sweeps] extra (hydra-submitit-launcher) is not installed
        return
    for launcher in (NstSlurmLauncher, NstLocalLauncher):
        Plugins.instance().register(launcher)


def _user_error(exc: Exception) -> UserError | None:
    """A composition error this module knows as one line naming the override and the fix; None otherwise."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return UserError(f"cannot read the override {exc.override!r}: {first_line(exc)}; fix: {quoting_fix(exc.override, sweep=False)}")
    if isinstance(exc, MissingConfigException):
        problem = re.sub(r"^In '[^']*': ", "", first_line(exc))
        fix = f"one of {', '.join(exc.options)}" if exc.options else "check the group and preset names"
        return UserError(f"{problem}; fix: {fix}")
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        override = first_line(exc).rsplit(" ", 1)[-1].strip("'.")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            key = getattr(cause, "full_key", None) or override.split("=")[0]
            return UserError(f"unknown config key '{key}'; fix: {_spelling_fix(key)}")
        if isinstance(cause, OmegaConfBaseException):
            key = getattr(cause, "full_key", None) or override.split("=")[0]
            fix = (
                f"a list, e.g. {key}=[{override.partition('=')[2]}]"
                if "ListConfig" in str(cause)
                else f"give {key} a value of its type ({KEYS_HINT})"
            )
            return UserError(f"bad value in '{override}': {first_line(cause)}; fix: {fix}")
        return UserError(f"{first_line(exc)}; fix: {KEYS_HINT}")
    return None


def _spelling_fix(key: str) -> str:
    """'did you mean ...' from the keys next to ``key`` in the default config, else where to look."""
    import difflib

    from omegaconf import DictConfig, OmegaConf

    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(compose_config(), parent) if parent else compose_config()
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(name, [str(k) for k in keys], n=1)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    return f"check its spelling ({KEYS_HINT})"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
