"""The one exception type that reaches the user as a single line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input or config; the message names the problem and the fix."""


# The layers that take plain typed arguments and raise ordinary exceptions about them, with messages
# written for the user: only the entry points (cli, api) turn those into one line.
_PLAIN_LAYERS = ("nst_exp.model", "nst_exp.optim")


def as_user_error(exc: BaseException) -> UserError | None:
    """A ``ValueError``/``FileNotFoundError`` raised by ``nst_exp.model`` or ``nst_exp.optim`` code as the
    one-line ``UserError`` with its message; None for anything else (a bug elsewhere keeps its traceback)."""
    if isinstance(exc, UserError) or not isinstance(exc, (ValueError, FileNotFoundError)):
        return None
    tb, module = exc.__traceback__, ""
    while tb is not None:  # the frame that raised it is the last one
        module, tb = str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_next
    if module == "" or not any(module == p or module.startswith(p + ".") for p in _PLAIN_LAYERS):
        return None
    return UserError(str(exc))


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Around an entry point's call into the library: the model's and optimiser's own errors become ``UserError``."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        user = as_user_error(exc)
        if user is None:
            raise
        raise user from None
