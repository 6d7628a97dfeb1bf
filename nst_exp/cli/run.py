"""The Hydra entry point for ``python -m nst_exp run``: compose, run, report."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from nst_exp.compose import first_line, register_launchers
from nst_exp.config import CONF_DIR, register_configs
from nst_exp.errors import UserError
from nst_exp.run.folder import CHECKPOINT, FINAL_IMAGE, FINAL_RESULTS, mark_ended, read_result, record_failure
from nst_exp.run.signals import JobInterrupted
from nst_exp.sweep.naming import register_resolvers

if TYPE_CHECKING:
    from nst_exp.sweep.study import TrialReporter


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def task(cfg: DictConfig) -> float:
    """One job. Returns the sweep objective (``hp/objective``, lower is better; inf for a failed job)."""
    from nst_exp.run.tile_group import job_tasks

    tasks = job_tasks()
    if tasks is not None:  # one of a submitit job's tasks: they share the run's tiles (trainer.devices)
        return _job_task(cfg, *tasks)
    return _run_job(cfg)


def _resumed(cfg: DictConfig) -> DictConfig:
    """With ``resume=<run dir>``: the run's own config, this command's overrides on top."""
    if not cfg.resume:
        return cfg
    from nst_exp.run.checkpoint import resumed_config

    return resumed_config(cfg, list(HydraConfig.get().overrides.task))


def _trial(cfg: DictConfig) -> TrialReporter | None:
    """The Optuna trial this job is, when the nst_optuna sweeper launched it (``optuna.trial``)."""
    if cfg.optuna.trial is None or not _is_multirun():
        return None
    from nst_exp.sweep.study import connect

    hydra = HydraConfig.get()
    return connect(cfg.optuna.trial, hydra.sweeper, hydra.sweep.dir)


def _run_job(cfg: DictConfig) -> float:
    from nst_exp.run import runner  # heavy imports (torch, lightning) only once a job runs

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    done = read_result(run_dir)
    if _is_multirun() and done and done.get("status") in FINAL_RESULTS and not (run_dir / CHECKPOINT).exists():
        # A job that finished before its sweep was run again (resume=<sweep folder>), or just before the
        # cluster pre-empted it and requeued it into its folder: its result stands.
        print(f"done already: {run_dir}")
        return float((done.get("metrics") or {}).get("hp/objective", math.inf))
    try:
        cfg = _resumed(cfg)
        trial = _trial(cfg)
        result = runner.run(cfg, run_dir, trial=trial)
    except JobInterrupted as exc:
        print(f"\ninterrupted: {exc}; the latest image is saved at {run_dir / FINAL_IMAGE}, "
              f"and last.ckpt continues the run", file=sys.stderr)
        return _hand_over(exc, run_dir)
    except UserError as exc:
        record_failure(run_dir, str(exc), cfg)
        print(f"error: {exc}", file=sys.stderr)
        if _is_multirun():
            return math.inf  # the sweep goes on; the summary marks this job failed
        sys.exit(2)
    except Exception as exc:  # re-raised unless in a sweep, which must survive one job's crash (e.g. out of memory)
        if not _is_multirun():
            raise
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        record_failure(run_dir, message, cfg)
        print(f"error: job failed: {message}", file=sys.stderr)
        return math.inf
    image = run_dir / FINAL_IMAGE
    if result.status == "interrupted":
        print(f"\ninterrupted: the latest image is saved at {image}", file=sys.stderr)
    elif result.status == "diverged":
        print(f"error: {result.error} (image: {image})", file=sys.stderr)
    elif result.status == "pruned":
        trial.pruned()
        print(f"trial {trial.number} {result.error} (image: {image})")
    else:
        print(f"image:       {image}")
    print(f"logs:        {run_dir}")
    print(f"tensorboard: tensorboard --logdir {run_dir}")
    if result.status == "interrupted":  # Ctrl-C: stop here, a sweep too (its partial run is no result)
        if _is_multirun():
            raise KeyboardInterrupt
        sys.exit(130)
    if result.status == "diverged" and not _is_multirun():
        sys.exit(3)
    return result.metrics.get("hp/objective", math.inf)


def _job_task(cfg: DictConfig, rank: int, world: int, local_world: int) -> float:
    """A task of a job with several: all join one process group; task 0 runs the job, the others
    evaluate their share of its tiles (``run/tile_group.py``) and return nothing to the sweep."""
    import torch

    from nst_exp.run.tile_group import TileGroup, check_group_config, helper_device, join_job_tasks, serve, threads_per_process

    try:
        check_group_config(cfg, world)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if rank == 0:
            record_failure(Path(HydraConfig.get().runtime.output_dir), str(exc), cfg)
        return math.inf
    device = helper_device(cfg, rank % local_world)
    torch.set_num_threads(threads_per_process(local_world))
    join_job_tasks(device)
    if rank == 0:
        try:
            return _run_job(cfg)
        finally:
            if torch.distributed.is_initialized():  # the run ended before its group did (an error, done already)
                TileGroup(device, world).close()
    try:
        serve(_resumed(cfg), device)
    finally:
        torch.distributed.destroy_process_group()
    return math.inf


def _hand_over(stop: JobInterrupted, run_dir: Path) -> float:
    """After a signal stopped the run: let submitit requeue the job (it exits), else exit 128 + signal.

    The job must not return: submitit would report a result, and the sweep would take this partial
    run as final. Only when submitit will not requeue (out of ``max_num_timeout``) does the job end
    here, as ``timed_out``.
    """
    try:
        stop.hand_over()
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - submitit's UncompletedJobError ("timed-out too many times"), or scontrol failed
        if type(exc).__name__ != "UncompletedJobError":
            raise SystemExit(128 + stop.signum) from None  # let the cluster decide (a pre-emption requeues it)
        mark_ended(run_dir, "timed_out", f"{stop} and not requeued: {first_line(exc)}; fix: a longer "
                   "hydra.launcher.timeout_min or more hydra.launcher.max_num_timeout, or resume=<this folder>")
        print(f"error: job timed out: {first_line(exc)}", file=sys.stderr)
        if _is_multirun():
            return math.inf
        sys.exit(1)
    raise SystemExit(128 + stop.signum)  # not reached: hand_over always exits or raises


def main(argv: list[str]) -> int:
    """Hand the overrides to Hydra (it reads sys.argv) with the config dir of this checkout."""
    register_configs()
    register_resolvers()
    register_launchers()
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]  # a run folder (a sweep's: __main__)
    if resume and resume[-1] not in ("", "null") and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv = [*argv, f"hydra.run.dir={resume[-1]}"]  # continue in the run's own folder: one curve, one place
    sys.argv = [sys.argv[0], *argv]
    entry = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    try:
        entry()  # a sweep with failed jobs exits 1 from its summary callback (sweep/hydra_callbacks.py)
    except KeyboardInterrupt:
        print("interrupted: the sweep stopped; finished jobs keep their folders "
              "(python -m nst_exp compare <sweep folder> summarises them)", file=sys.stderr)
        return 130
    return 0
