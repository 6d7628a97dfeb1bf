"""The Hydra entry point for ``python -m nst_exp run``: compose, run, report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from nst_exp.config import CONF_DIR, register_configs
from nst_exp.errors import UserError
from nst_exp.sweep.naming import register_resolvers
from nst_exp.run.folder import FINAL_IMAGE, record_failure


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def task(cfg: DictConfig) -> float:
    """One job. Returns the sweep objective (``hp/objective``, lower is better; inf for a failed job)."""
    from nst_exp.run import runner  # heavy imports (torch, lightning) only once a job runs

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.resume:
            from nst_exp.run.checkpoint import resumed_config

            cfg = resumed_config(cfg, list(HydraConfig.get().overrides.task))
        result = runner.run(cfg, run_dir)
    except UserError as exc:
        record_failure(run_dir, str(exc), cfg)
        print(f"error: {exc}", file=sys.stderr)
        if _is_multirun():
            return math.inf  # the sweep goes on; the summary marks this job failed
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a sweep must survive one job's crash (e.g. out of memory)
        if not _is_multirun():
            raise
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        record_failure(run_dir, message, cfg)
        print(f"error: job failed: {message}", file=sys.stderr)
        return math.inf
    image = run_dir / FINAL_IMAGE
    if result.status == "interrupted":
        print(f"interrupted: the latest image is saved at {image}", file=sys.stderr)
    elif result.status == "diverged":
        print(f"error: {result.error} (image: {image})", file=sys.stderr)
    else:
        print(f"image:       {image}")
    print(f"logs:        {run_dir}")
    print(f"tensorboard: tensorboard --logdir {run_dir}")
    if result.status == "interrupted" and not _is_multirun():
        sys.exit(130)
    if result.status == "diverged" and not _is_multirun():
        sys.exit(3)
    return result.metrics.get("hp/objective", math.inf)


def main(argv: list[str]) -> int:
    """Hand the overrides to Hydra (it reads sys.argv) with the config dir of this checkout."""
    register_configs()
    register_resolvers()
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if resume and resume[-1] not in ("", "null") and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv = [*argv, f"hydra.run.dir={resume[-1]}"]  # continue in the run's own folder: one curve, one place
    sys.argv = [sys.argv[0], *argv]
    entry = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    entry()  # a sweep with failed jobs exits 1 from its summary callback (sweep/hydra_callbacks.py)
    return 0
