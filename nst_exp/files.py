"""Writing files so that a failed write loses nothing: atomic replace, and one line naming what failed.

Every file a run or a summary writes goes through ``atomic_write``: the new bytes go to a temporary
file beside the target and replace it only once complete, so the previous version stays whole when
the disk is full, the folder read-only or a quota reached; the temporary file is removed. The
failure becomes ``WriteFailed``, a ``UserError`` whose one line names the file, the reason and the fix.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nst_exp.errors import UserError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is too large for the filesystem",
}


class WriteFailed(UserError):
    """A file could not be written. ``fix`` says what to do next (the caller knows: resume, compare...)."""

    def __init__(self, what: str, path: Path | str, cause: BaseException, fix: str | None = None) -> None:
        self.what, self.path, self.cause = what, Path(path), cause
        self.fix = fix
        super().__init__(str(self))

    @property
    def reason(self) -> str:
        code = getattr(self.cause, "errno", None)
        return _REASONS.get(code) or getattr(self.cause, "strerror", None) or str(self.cause).splitlines()[0] or type(self.cause).__name__

    def room(self) -> str:
        """What makes the write possible again, for this reason."""
        code = getattr(self.cause, "errno", None)
        where = self.path.parent
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"free space where it goes (df -h {where})"
        return f"make {where} writable"

    def __str__(self) -> str:
        fix = self.fix or f"{self.room()}, then run the command again"
        return f"could not write the {self.what} {self.path}: {self.reason}; fix: {fix}"


def is_write_error(exc: BaseException) -> bool:
    """An OSError that a full disk, a quota, a read-only filesystem or missing permissions raise."""
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in _REASONS


@contextmanager
def writing(what: str, path: Path | str) -> Iterator[None]:
    """Turn a failed write of ``path`` (an OSError) into ``WriteFailed``."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as exc:
        raise WriteFailed(what, path, exc) from None


def unwritable(path: Path) -> str | None:
    """Why ``path`` (a file or folder, made with its missing parents) could not be written, known before any
    work is done; None where it can be: the nearest folder that exists must be one, and writable."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written to"
    return None


def output_file_problem(path: Path) -> str | None:
    """Why a command's output file (``--json out.json``) could not be written, with the fix, before the
    command's work; None where it can be."""
    problem = f"{path} is a folder" if Path(path).is_dir() else unwritable(path)
    return f"{problem}; fix: a file in a folder you can write" if problem else None


def atomic_write(path: Path, write: Callable[[Path], Any], what: str) -> Path:
    """``write(tmp)`` then replace ``path`` by it; on any failure the tmp file is removed and ``path`` is
    as it was. An OSError becomes ``WriteFailed`` naming ``what``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with writing(what, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only filesystem: no tmp file could have been made
        raise
    return path


def write_text(path: Path, text: str, what: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def write_bytes(path: Path, data: bytes, what: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), what)
