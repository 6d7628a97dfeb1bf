"""Sweeps through submitit (SLURM, or its local executor): submit, then wait for every job's final outcome.

Hydra's submitit launcher collects results with ``[job.results()[0] for job in jobs]``: the first
job that ends without a result (``scancel``, killed, the cluster's time limit) raises in the sweep
driver, which then exits with a traceback and no summary while the other jobs still run. Here each
job is waited for in turn. A requeued job (pre-emption, or a time-out with requeues left) has no
result yet and is still a pending or running job to submitit, so the driver goes on waiting; one
that ends without a result is recorded in its folder (``cancelled``, ``timed_out`` or ``failed``,
with the cluster's state) and returns a failed objective (inf), so the sweep finishes and says so.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from nst_exp.errors import UserError
from nst_exp.run.folder import CHECKPOINT, mark_ended

log = logging.getLogger(__name__)

MIN_WORK_S = 60  # time a job must get before submitit's pre-emption signal for the limit to make sense


def check_time_limit(params: Mapping[str, Any]) -> None:
    """Refuse a time limit that ends before submitit's pre-emption signal leaves any time for work.

    submitit asks SLURM for SIGUSR2 ``signal_delay_s`` before the limit; with ``timeout_min`` at or
    below it every job is signalled (and requeued, counted as a time-out) within seconds of starting.
    """
    timeout_min, delay_s = params.get("timeout_min"), params.get("signal_delay_s")
    if timeout_min is None or delay_s is None or timeout_min * 60 - delay_s >= MIN_WORK_S:
        return
    need = math.ceil((delay_s + MIN_WORK_S) / 60)
    raise UserError(
        f"hydra.launcher.timeout_min={timeout_min} leaves {max(0, timeout_min * 60 - delay_s)} s before submitit's "
        f"pre-emption signal (hydra.launcher.signal_delay_s={delay_s}): every job would be stopped and requeued "
        f"at once; fix: hydra.launcher.timeout_min={need} or more, or a smaller hydra.launcher.signal_delay_s"
    )


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Submit the jobs as one array with the launcher's parameters, then collect each job's outcome."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(launcher.params)
    check_time_limit(params)
    kind = launcher._EXECUTOR
    folder = params.pop("submitit_folder")
    requeues = {f"{kind}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=kind, **requeues)
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"{kind}_{k}": v for k, v in params.items()})
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    numbers = [initial_job_idx + i for i in range(len(job_overrides))]
    for number, overrides in zip(numbers, job_overrides):
        log.info(f"\t#{number} : {' '.join(overrides)}")
    args = [(list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state()) for o, n in zip(job_overrides, numbers)]
    jobs = executor.map_array(launcher, *zip(*args))
    return [outcome(launcher, job, list(o), n) for job, o, n in zip(jobs, job_overrides, numbers)]


def outcome(launcher: Any, job: Any, overrides: list[str], number: int) -> JobReturn:
    """The job's JobReturn once it has ended for good; a job that gave none is recorded and returns inf."""
    try:
        return job.results()[0]
    except Exception as exc:  # noqa: BLE001 - submitit's UncompletedJobError / FailedJobError: no result
        state = cluster_state(job)
        status = "timed_out" if state.startswith("TIMEOUT") else "cancelled" if state.startswith("CANCELLED") else "failed"
        run_dir = job_folder(launcher, overrides, number)
        error = f"job {job.job_id} ended {state} without a result"
        if status == "failed":
            error += f": {_last_line(exc)}"
        if (run_dir / CHECKPOINT).is_file():
            error += f"; last.ckpt holds where it stopped: python -m nst_exp run resume={run_dir} continues it"
        mark_ended(run_dir, status, error, overrides)
        print(f"error: sweep job {number} {status}: {error}", file=sys.stderr)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=math.inf)


def cluster_state(job: Any) -> str:
    try:
        return str(job.state or "UNKNOWN").upper()
    except Exception:  # noqa: BLE001 - sacct may be unavailable: say so rather than fail the sweep
        return "UNKNOWN"


def job_folder(launcher: Any, overrides: list[str], number: int) -> Path:
    """The folder Hydra gave job ``number`` (``hydra.sweep.dir``/``hydra.sweep.subdir``)."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = number
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
