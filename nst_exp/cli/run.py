"""The Hydra entry point for ``python -m nst_exp run``: compose, run, report.

A single run's folder is decided here, before Hydra starts, and Hydra writes its ``.hydra/`` files
into a staging folder instead: they join the run folder only once the run is accepted
(``runner.run``'s ``on_accept``). A refused run (a wrong ``resume=``, a finished run's folder,
nothing left to do) leaves every file as it was and creates nothing.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from nst_exp.compose import first_line, quote_letters_beyond_ascii, register_launchers
from nst_exp.config import CONF_DIR, register_configs
from nst_exp.errors import UserError, one_line_errors
from nst_exp.files import WriteFailed, is_write_error
from nst_exp.run.folder import CHECKPOINT, FINAL_IMAGE, FINAL_RESULTS, mark_ended, read_result, record_failure
from nst_exp.run.signals import JobInterrupted
from nst_exp.sweep.naming import register_resolvers

if TYPE_CHECKING:
    from nst_exp.sweep.study import TrialReporter


@dataclass
class _Staged:
    """A single run's real folder, and the staging folder Hydra writes into until the run is accepted."""

    target: Path
    staging: Path
    given: list[str]  # the command's own hydra.run.dir override, if any (Hydra's record keeps it)
    accepted: bool = False


_STAGED: _Staged | None = None
STAGING_PREFIX = "nst_exp-hydra-"


def _stage(argv: list[str]) -> list[str]:
    """For a single run: resolve its folder now (as Hydra would) and point Hydra at a staging folder."""
    global _STAGED
    if any(a.startswith("-") for a in argv):
        return argv  # -m, --cfg, --help...: Hydra's own ways, as always
    try:
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        from nst_exp.cli.compose import compose_config

        cfg = compose_config(argv, with_hydra=True)
        if cfg.hydra.mode == RunMode.MULTIRUN:
            return argv
        HydraConfig.instance().set_config(cfg)
        target = Path(str(OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True))).absolute()
    except Exception:  # noqa: BLE001 - what cannot be resolved here is Hydra's to report, as always
        return argv
    finally:
        HydraConfig.instance().cfg = None
    remove_stale_staging()
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    _STAGED = _Staged(target, staging, [a for a in argv if a.startswith("hydra.run.dir=")][-1:])
    return [a for a in argv if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={staging}"]


def remove_stale_staging(root: Path | None = None) -> None:
    """Staging folders of runs killed outright (SIGKILL: no ``finally``), named by a process that is gone."""
    for path in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def _accept(run_dir: Path) -> None:
    """The run is accepted: Hydra's staged ``.hydra/`` files join its folder, naming the real folder. A
    continued run keeps the ``.hydra/`` of the command that made it (a sweep's summary reads its overrides)."""
    from omegaconf import OmegaConf

    from nst_exp.files import write_text

    if _STAGED is None:
        return
    _STAGED.accepted = True
    hydra = HydraConfig.get()
    if hydra.output_subdir is None:
        return
    staged, dest = _STAGED.staging / str(hydra.output_subdir), run_dir / str(hydra.output_subdir)
    if dest.exists() or not staged.is_dir():
        return
    for path in sorted(staged.glob("*.yaml")):
        text = path.read_text()
        if path.name == "hydra.yaml":
            saved = OmegaConf.load(path)
            saved.hydra.run.dir = saved.hydra.runtime.output_dir = str(run_dir)
            saved.hydra.overrides.hydra = [o for o in saved.hydra.overrides.hydra if not o.startswith("hydra.run.dir=")] + _STAGED.given
            text = OmegaConf.to_yaml(saved)
        write_text(dest / path.name, text, "Hydra record")


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def task(cfg: DictConfig) -> float:
    """One job. Returns the sweep objective (``result/objective``, lower is better; inf for a failed job)."""
    from nst_exp.tiling.group import job_tasks

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

    staged = _STAGED if _STAGED is not None and not _is_multirun() else None
    run_dir = staged.target if staged else Path(HydraConfig.get().runtime.output_dir)
    accepted = lambda: staged is None or staged.accepted  # a sweep job's folder is its own from the start
    done = read_result(run_dir)
    if _is_multirun() and done and done.get("status") in FINAL_RESULTS and not (run_dir / CHECKPOINT).exists():
        # A job that finished before its sweep was run again (resume=<sweep folder>), or just before the
        # cluster pre-empted it and requeued it into its folder: its result stands.
        print(f"done already: {run_dir}")
        return float((done.get("metrics") or {}).get("result/objective", math.inf))
    try:
        cfg = _resumed(cfg)
        trial = _trial(cfg)
        with one_line_errors():  # the model's and optimiser's own errors, as one line
            result = runner.run(cfg, run_dir, trial=trial, on_accept=_accept)
    except JobInterrupted as exc:
        print(
            f"\ninterrupted: {exc}; the latest image is saved at {run_dir / FINAL_IMAGE}, and last.ckpt continues the run", file=sys.stderr
        )
        return _hand_over(exc, run_dir)
    except UserError as exc:
        if accepted() and not isinstance(exc, WriteFailed):  # a refused run writes nothing; a failed write recorded itself
            _record_failure(run_dir, str(exc), cfg)
        print(f"error: {exc}", file=sys.stderr)
        if _is_multirun():
            return math.inf  # the sweep goes on; the summary marks this job failed
        sys.exit(2)
    except Exception as exc:  # a sweep must survive one job's crash (e.g. out of memory)
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if is_write_error(exc):  # a write no module turned into WriteFailed: still one line
            failed = WriteFailed(
                "file",
                exc.filename or run_dir,
                exc,
                fix="free space or make it writable, then "
                f"resume={run_dir} if the folder holds last.ckpt or final.png, else run the command again",
            )
            print(f"error: {failed}", file=sys.stderr)
            if not _is_multirun():
                sys.exit(1)
            message = str(failed)
        elif not _is_multirun():
            if accepted():
                _record_failure(run_dir, message, cfg)
            raise
        _record_failure(run_dir, message, cfg)
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
    return result.metrics.get("result/objective", math.inf)


def _record_failure(run_dir: Path, message: str, cfg: DictConfig) -> None:
    try:
        record_failure(run_dir, message, cfg)
    except WriteFailed:
        pass  # the disk refuses even this: the error line says what happened


def _job_task(cfg: DictConfig, rank: int, world: int, local_world: int) -> float:
    """A task of a job with several: all join one process group; task 0 runs the job, the others
    run their share of its loss passes' tiles (``tiling/group.py``) and return nothing to the sweep."""
    import torch

    from nst_exp.run.setup import TileHelperSetup, check_tile_group
    from nst_exp.settings import resolve
    from nst_exp.tiling.group import TileGroup, join_job_tasks, serve, threads_per_process

    device = TileHelperSetup(cfg).device(rank % local_world)
    try:
        check_tile_group(resolve(cfg, device), world)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if rank == 0:
            record_failure(Path(HydraConfig.get().runtime.output_dir), str(exc), cfg)
        return math.inf
    torch.set_num_threads(threads_per_process(local_world))
    join_job_tasks(device)
    if rank == 0:
        try:
            return _run_job(cfg)
        finally:
            if torch.distributed.is_initialized():  # the run ended before its group did (an error, done already)
                TileGroup(device, world).close()
    try:
        serve(device, *TileHelperSetup(_resumed(cfg)).open(device))
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
        mark_ended(
            run_dir,
            "timed_out",
            f"{stop} and not requeued: {first_line(exc)}; fix: a longer "
            "hydra.launcher.timeout_min or more hydra.launcher.max_num_timeout, or resume=<this folder>",
        )
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
    sys.argv = [sys.argv[0], *quote_letters_beyond_ascii(_stage(argv))]  # a path like café.jpg, as Hydra reads it
    entry = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    try:
        entry()  # a sweep with failed jobs exits 1 from its summary callback (sweep/hydra_callbacks.py)
    except KeyboardInterrupt:
        print(
            "interrupted: the sweep stopped; finished jobs keep their folders (python -m nst_exp compare <sweep folder> summarises them)",
            file=sys.stderr,
        )
        return 130
    finally:
        if _STAGED is not None:
            shutil.rmtree(_STAGED.staging, ignore_errors=True)
    return 0
