"""The run's logger: TensorBoard in the run folder, kept open across stages, and what goes into it
besides the per-step losses (input images, final metrics; the HPARAMS session is ``run/tb_hparams``). Also quiets Lightning's chatter."""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from nst_exp.files import WriteFailed
from nst_exp.run.metrics import HPARAM_METRICS

EVENT_FILE = "TensorBoard event file"


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`IterableDataset` has `__len__`.*")
    warnings.filterwarnings("ignore", ".*Your `IterableDataset`.*")
    warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", ".*Trying to infer the `batch_size`.*")
    warnings.filterwarnings("ignore", ".*tensorboardX.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
    if "SLURM_JOB_ID" not in os.environ:  # a cluster machine, but not a SLURM job: srun is not for this run
        warnings.filterwarnings("ignore", ".*`srun` command is available on your system but is not used.*")


class RunLogger(TensorBoardLogger):
    """TensorBoard logger writing straight into the run folder, kept open across stages.

    Lightning finalizes (closes) its logger at the end of every ``fit``; a later write would
    open a second event file. Here ``finalize`` only flushes and ``close`` really ends it.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="", default_hp_metric=False)

    def open(self) -> Any:
        """Create the event file now (a full disk fails here, as ``WriteFailed``), its writes guarded."""
        try:
            writer = self.experiment
        except OSError as exc:
            raise WriteFailed(EVENT_FILE, self.save_dir, exc) from None
        guard_event_file(writer)
        return writer

    def finalize(self, status: str) -> None:
        try:
            self.experiment.flush()
        except WriteFailed:
            if status == "success":
                raise  # else the run is failing already: its first failure is the one reported

    def save(self) -> None:
        """Only flush: the run folder's config.yaml is the config (no Lightning hparams.yaml)."""
        self.experiment.flush()

    def close(self, status: str) -> None:
        super().finalize(status)


def guard_event_file(writer: Any) -> None:
    """A failed write of ``writer``'s event file raises ``WriteFailed`` (naming the file) in the run's
    thread, and TensorBoard's writer thread dies without a traceback: its error is kept and raised by
    the next write or flush, here as that one line."""
    from nst_exp.run.tb_hparams import _file_writer

    _quiet_event_writer_threads()
    events = _file_writer(writer).event_writer
    if getattr(events, "_nst_guarded", False):
        return
    path = Path(getattr(events, "_file_name", None) or events.get_logdir())
    for name in ("add_event", "flush", "close"):
        setattr(events, name, _guarded(getattr(events, name), path))
    events._nst_guarded = True


def _guarded(method: Any, path: Path) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            raise WriteFailed(EVENT_FILE, path, exc) from None

    return call


def _quiet_event_writer_threads() -> None:
    """TensorBoard's ``_AsyncWriterThread`` re-raises a failed write after keeping it: no traceback for that."""
    previous = threading.excepthook
    if getattr(previous, "_nst_quiet", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._nst_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def log_final_metrics(writer: Any, metrics: dict[str, float], step: int) -> None:
    """The HPARAMS table's metric values: the last ``result/*`` scalar of each run (none that is unknown)."""
    for name in HPARAM_METRICS:
        value = metrics.get(name)
        if value is not None and math.isfinite(value):
            writer.add_scalar(name, value, step)
    writer.flush()


def log_input_images(writer: Any, images: dict[str, Tensor]) -> None:
    for tag, image in images.items():
        writer.add_image(tag, image.detach()[0].float().clamp(0, 1).cpu(), 0)
