"""The Hydra callback of every sweep: a failure record for a job that died without one, and the
summary (contact sheet, summary.csv/md, TensorBoard) when the sweep ends.

It reads finished job folders only (``run.folder``); a sweep in which any job did not complete ends
the process with exit status 1 once the summary is written, so no state is kept between jobs.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nst_exp.files import WriteFailed
from nst_exp.run.folder import FINISHED, read_result, record_failure


class SweepSummary(Callback):
    """``on_multirun_start``: a folder of someone else's files refused. ``on_job_end``: a failure record if
    the job raised past the task (its overrides are in ``.hydra/``).
    ``on_multirun_end``: contact sheet + summary.csv/md in the sweep folder (also in TensorBoard), one
    line counting the jobs by status, and exit status 1 unless every job completed (or was pruned by its
    Optuna study: a finished trial)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before Hydra writes the sweep's ``multirun.yaml``: a folder holding files that no nst_exp sweep wrote
        under the names a sweep writes is refused in one line (a SystemExit passes Hydra's callback guard)."""
        from nst_exp.sweep.summary import foreign_files

        sweep_dir = Path(config.hydra.sweep.dir)
        foreign = foreign_files(sweep_dir, sweep=True)
        if foreign:
            print(
                f"error: {sweep_dir} holds files that no nst_exp sweep wrote ({', '.join(foreign)}), which the sweep would "
                "overwrite; fix: another hydra.sweep.dir (or none: a new dated folder under outputs/multirun)",
                file=sys.stderr,
            )
            raise SystemExit(2)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and read_result(run_dir) is None:
            exc = job_return._return_value  # the exception; reading .return_value would re-raise it
            record_failure(run_dir, f"{type(exc).__name__}: {exc}".splitlines()[0])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from nst_exp.sweep.summary import collect_jobs, summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = collect_jobs([sweep_dir])
        counts = Counter(j.status for j in jobs)
        others = ", ".join(f"{n} {status}" for status, n in counts.items() if status != "completed")
        print(f"sweep:       {len(jobs)} jobs, {counts['completed']} completed" + (f", {others}" if others else ""))
        summarized = True
        try:
            paths = summarize(jobs, sweep_dir, title=f"sweep {sweep_dir}")
        except WriteFailed as exc:  # a full disk: the jobs' folders stand, the summary can be made again
            summarized = False
            exc.fix = f"{exc.room()}, then python -m nst_exp compare {sweep_dir} (or --out <another folder>)"
            print(f"error: the sweep summary could not be written: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the jobs' own folders stand; say what is missing
            summarized = False
            print(
                f"error: the sweep summary could not be written: {type(exc).__name__}: {exc}; "
                f"fix: python -m nst_exp compare {sweep_dir} --out <folder> once the cause is mended",
                file=sys.stderr,
            )
        else:
            print(f"summary:     {paths['md']}")
            print(f"contact:     {paths['contact_sheet']}")
            print(f"tensorboard: tensorboard --logdir {sweep_dir}")
        if sum(counts[s] for s in FINISHED) < len(jobs) or not summarized:
            # A SystemExit passes Hydra's callback guard and its error report: the command exits 1
            # (the other jobs ran; the summary marks the ones that did not complete).
            raise SystemExit(1)
