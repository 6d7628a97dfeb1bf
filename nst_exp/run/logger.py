"""The run's logger: TensorBoard in the run folder (and the other ``logging.loggers``, ``run/loggers.py``),
kept open across stages, and what goes into it besides the per-step losses (input images, final metrics;
the HPARAMS session is ``run/tb_hparams``); ``trim_logs`` for a run that continues in its folder.
Also quiets Lightning's chatter."""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger
from torch import Tensor

from nst_exp.files import WriteFailed, atomic_write, writing
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
    warnings.filterwarnings("ignore", ".*Experiment logs directory .* exists and is not empty.*")  # csv: a resumed run's rows are kept
    if "SLURM_JOB_ID" not in os.environ:  # a cluster machine, but not a SLURM job: srun is not for this run
        warnings.filterwarnings("ignore", ".*`srun` command is available on your system but is not used.*")


class Fanout:
    """What the run writes through (``logger.experiment``): TensorBoard's SummaryWriter when
    ``tensorboard`` is among ``logging.loggers``, and the other loggers' metrics.

    The run writes scalars per step in batches (``run/module.py``); for the other loggers they are
    gathered per step and handed over at each ``flush``. Images go to TensorBoard only (the other
    loggers get the PNG files as artifacts, ``run/loggers.log_artifacts``).
    """

    def __init__(self, writer: Any | None, others: list[Any]) -> None:
        self.writer = writer
        self.others = others
        self._rows: dict[int, dict[str, float]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.others:
            self._rows.setdefault(int(step), {})[tag] = float(value)

    def add_image(self, tag: str, image: Any, step: int, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, **kwargs)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self._rows:
            for logger in self.others:
                for step in sorted(self._rows):
                    logger.log_metrics(self._rows[step], step)
                logger.save()
            self._rows.clear()

    def _get_file_writer(self) -> Any:
        """TensorBoard's file writer (``run/tb_hparams``); only asked for when TensorBoard is on."""
        return self.writer._get_file_writer()


class RunLogger(Logger):
    """The run's one Lightning logger, kept open across stages: TensorBoard in the run folder and the
    other ``logging.loggers`` (``run/loggers.py``) behind one ``experiment`` (a ``Fanout``).

    Lightning finalizes its logger at the end of every ``fit``; here ``finalize`` only flushes and
    ``close`` really ends them.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, others: list[Any] | None = None) -> None:
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self.others = list(others or [])
        try:
            writer = SummaryWriter(str(run_dir)) if tensorboard else None
        except OSError as exc:  # a full disk fails here, as ``WriteFailed``
            raise WriteFailed(EVENT_FILE, run_dir, exc) from None
        self._fanout = Fanout(writer, self.others)

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def experiment(self) -> Fanout:
        return self._fanout

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self._fanout.add_scalar(tag, float(value), step or 0)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's own (empty) hparams: nothing. The run's go through ``log_session_start``."""

    def log_session_start(self, hparams: dict[str, Any]) -> None:
        """The run's hyperparameters: TensorBoard's HPARAMS session, and the other loggers' params."""
        from nst_exp.run.loggers import log_hyperparams
        from nst_exp.run.tb_hparams import write_session_start

        if self.tensorboard:
            write_session_start(self._fanout, hparams)
        log_hyperparams(self.others, hparams)

    def log_session_end(self, completed: bool) -> None:
        from nst_exp.run.tb_hparams import write_session_end

        if self.tensorboard:
            write_session_end(self._fanout, completed)

    def log_artifacts(self, paths: list[Path]) -> None:
        from nst_exp.run.loggers import log_artifacts

        self._fanout.flush()
        log_artifacts(self.others, paths)

    def open(self) -> Fanout:
        """Guard the event file's writes (made by ``__init__``): a failed one is a ``WriteFailed``."""
        if self.tensorboard:
            guard_event_file(self._fanout)
        return self._fanout

    def finalize(self, status: str) -> None:
        try:
            self._fanout.flush()
        except WriteFailed:
            if status == "success":
                raise  # else the run is failing already: its first failure is the one reported

    def save(self) -> None:
        """Only flush: the run folder's config.yaml is the config (no Lightning hparams.yaml)."""
        self._fanout.flush()

    def close(self, status: str) -> None:
        """``status``: how the run ended (``run.folder.STATUSES``)."""
        from nst_exp.run.loggers import finalize

        self._fanout.flush()
        if self._fanout.writer is not None:
            self._fanout.writer.close()
        finalize(self.others, status)


def trim_logs(run_dir: Path, step: int) -> None:
    """Before a run continues in its folder from ``step`` (a checkpoint's logged step; 0: it starts over):
    drop what the folder's logs hold from ``step`` on, so that every step appears exactly once.

    A job killed after its last checkpoint has written steps past it, and will write them again.
    TensorBoard event files are rewritten without those events (0: removed), so any reader sees one
    curve; the CSV logger's rows from ``step`` on go too. The image at ``step`` itself is the
    checkpoint's and stays (TensorBoard's and the snapshot PNG); later ones go.
    """
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        if step <= 0:
            events.unlink()
        else:
            _trim_event_file(events, step)
    from nst_exp.run.loggers import trim_csv  # the ecosystem loggers' files

    trim_csv(run_dir, step)
    for png in sorted((run_dir / "snapshots").glob("step_*.png")):
        if int(png.stem.removeprefix("step_") or 0) > step:
            png.unlink()


def _trim_event_file(path: Path, step: int) -> None:
    """Rewrite one event file keeping the events before ``step`` (and those that are not step data)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    kept: list[bytes] = []
    dropped = 0
    with writing(EVENT_FILE, path):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            image = event.HasField("summary") and any(v.HasField("image") for v in event.summary.value)
            if (event.step > step if image else event.step >= step) and (event.HasField("summary") or event.HasField("session_log")):
                dropped += 1
                continue
            kept.append(record)
    if not dropped:
        return

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            writer = RecordWriter(fh)
            for record in kept:
                writer.write(record)
            writer.flush()

    atomic_write(path, write, EVENT_FILE)  # a full disk keeps the old event file whole


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
