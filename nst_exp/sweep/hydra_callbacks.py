"""Hydra callbacks: record each job's overrides, and summarise a sweep when it ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nst_exp.run.folder import RESULT_FILE, read_result, record_failure


FAILED_JOBS: list[int] = []  # failed-job count of the last sweep in this process (the exit code reads it)


class SweepSummary(Callback):
    """``on_job_end``: overrides into result.json (and a failure record if the job raised).
    ``on_multirun_end``: contact sheet + summary.csv/md in the sweep folder (also in TensorBoard)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and read_result(run_dir) is None:
            exc = job_return._return_value  # the exception; reading .return_value would re-raise it
            record_failure(run_dir, f"{type(exc).__name__}: {exc}".splitlines()[0])
        result = read_result(run_dir)
        if result is not None:
            result["overrides"] = list(job_return.overrides or [])
            (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from nst_exp.sweep.summary import collect_jobs, summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = collect_jobs([sweep_dir])
        paths = summarize(jobs, sweep_dir, title=f"sweep {sweep_dir}")
        failed = [j for j in jobs if j.status == "failed"]
        FAILED_JOBS.append(len(failed))
        print(f"sweep:       {len(jobs)} jobs, {len(failed)} failed")
        print(f"summary:     {paths['md']}")
        print(f"contact:     {paths['contact_sheet']}")
        print(f"tensorboard: tensorboard --logdir {sweep_dir}")
