"""Hydra callbacks: record each job's overrides, and summarise a sweep when it ends."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nst_exp.reporting import RESULT_FILE, read_result, record_failure


FAILED_JOBS: list[int] = []  # jobs of the last sweep in this process that did not complete (the exit code reads it)


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
        from nst_exp.sweeps import collect_jobs, summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = collect_jobs([sweep_dir])
        counts = Counter(j.status for j in jobs)
        FAILED_JOBS.append(len(jobs) - counts["completed"])
        others = ", ".join(f"{n} {status}" for status, n in counts.items() if status != "completed")
        print(f"sweep:       {len(jobs)} jobs, {counts['completed']} completed" + (f", {others}" if others else ""))
        try:
            paths = summarize(jobs, sweep_dir, title=f"sweep {sweep_dir}")
        except Exception as exc:  # noqa: BLE001 - the jobs' own folders stand; say what is missing
            FAILED_JOBS[-1] += 1
            print(f"error: the sweep summary could not be written: {type(exc).__name__}: {exc}; "
                  f"fix: python -m nst_exp compare {sweep_dir} --out <folder> once the cause is mended", file=sys.stderr)
            return
        print(f"summary:     {paths['md']}")
        print(f"contact:     {paths['contact_sheet']}")
        print(f"tensorboard: tensorboard --logdir {sweep_dir}")
