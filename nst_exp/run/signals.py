"""Signals that end a job, acted on between optimiser steps.

A cluster ends a job with SIGTERM (``scancel``, time limit, pre-emption) and, through
submitit, announces pre-emption and the coming time limit with SIGUSR2. Acting inside the
signal handler would stop the run mid-step (submitit's handler calls ``sys.exit`` wherever
Python is), so ``JobSignals`` only notes the signal; ``StopOnSignal`` stops training at the
next batch boundary, where the checkpoint, the curves and the image agree on one step. The
run then saves its folder and raises ``JobInterrupted``; the entry point hands the signal to
its previous owner (submitit requeues the job) or exits with 128 + the signal number.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

# submitit's pre-emption/time-out signal (SUBMITIT_PREEMPT_SIGNAL, USR2 by default) is only taken
# over when a Python handler (submitit's) already owns it; SIGTERM always.
_HANDLED = ("SIGTERM", "SIGUSR2")


class JobInterrupted(Exception):
    """The run stopped at a step boundary because the process received ``signum``."""

    def __init__(self, signum: int, previous: Any = None) -> None:
        self.signum = signum
        self.signal = signal_name(signum)
        self.previous = previous  # the handler that owned the signal before the run (submitit's), or None
        super().__init__(f"stopped by {signal_name(signum)}")

    def hand_over(self) -> None:
        """Let the signal's previous owner act (submitit checkpoints the job and requeues it; may raise
        ``submitit``'s UncompletedJobError when out of requeues), else exit with 128 + the signal number."""
        if callable(self.previous):
            self.previous(self.signum, None)
        raise SystemExit(128 + self.signum)


# What stops training at a step boundary because of a job signal: ours (``StopOnSignal``), or
# Lightning's own SIGTERM check, which runs after the batch's hooks and wins when the signal lands
# between the two.
STEP_BOUNDARY_STOPS = (JobInterrupted, SIGTERMException)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class JobSignals:
    """Notes SIGTERM (and submitit's SIGUSR2) while installed; ``received`` is the first one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in _HANDLED:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if signum != signal.SIGTERM and not callable(previous):
                continue  # nobody (submitit) listens for USR2: leave its default action alone
            self._previous[signum] = previous
            signal.signal(signum, self._note)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def interruption(self) -> JobInterrupted | None:
        if self.received is None:
            return None
        return JobInterrupted(self.received, self._previous.get(self.received))

    def as_interruption(self, stop: BaseException) -> JobInterrupted:
        """One of ``STEP_BOUNDARY_STOPS`` as ``JobInterrupted``: Lightning's SIGTERMException carries no
        signal or previous owner, the noted signal does."""
        if isinstance(stop, JobInterrupted):
            return stop
        return self.interruption() or JobInterrupted(signal.SIGTERM)


class StopOnSignal(pl.Callback):
    """Stop training at the first batch end after a noted signal, by raising ``JobInterrupted``.

    Lightning then calls every callback's ``on_exception`` (the checkpointer saves there) and
    re-raises, so the run sees the exception after ``fit``.
    """

    def __init__(self, signals: JobSignals) -> None:
        self.signals = signals

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        interruption = self.signals.interruption()
        if interruption is not None:
            raise interruption
