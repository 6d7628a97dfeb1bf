"""The Hydra callback of every sweep: a failure record for a job that died without one, and the
summary (contact sheet, summary.csv/md, TensorBoard) when the sweep ends.

It reads finished job folders only (``run.folder``); a sweep with failed jobs ends the process
with exit status 1 once the summary is written, so no state is kept between jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nst_exp.run.folder import record_failure


class SweepSummary(Callback):
    """``on_job_end``: a failure record if the job raised past the task (its overrides are in ``.hydra/``).
    ``on_multirun_end``: contact sheet + summary.csv/md in the sweep folder (also in TensorBoard)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value  # the exception; reading .return_value would re-raise it
            record_failure(Path(config.hydra.runtime.output_dir), f"{type(exc).__name__}: {exc}".splitlines()[0],
                           keep_existing=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from nst_exp.sweep.summary import collect_jobs, summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = collect_jobs([sweep_dir])
        paths = summarize(jobs, sweep_dir, title=f"sweep {sweep_dir}")
        failed = [j for j in jobs if j.status == "failed"]
        print(f"sweep:       {len(jobs)} jobs, {len(failed)} failed")
        print(f"summary:     {paths['md']}")
        print(f"contact:     {paths['contact_sheet']}")
        print(f"tensorboard: tensorboard --logdir {sweep_dir}")
        if failed:
            # A SystemExit passes Hydra's callback guard and its error report: the command exits 1
            # (the other jobs ran; the summary marks the failed ones).
            raise SystemExit(1)
