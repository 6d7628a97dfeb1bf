"""The Hydra sweeper plugin of nst_exp: an Optuna study on a real database (``hydra/sweeper: nst_optuna``).

Kept thin (Hydra imports every ``hydra_plugins`` module at start-up, and Optuna is imported only when
a search runs); the logic is in ``nst_exp.sweep.optuna_sweeper``. ``conf/hparams_search/*.yaml`` choose it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class NstOptunaSweeperConf:
    """``hydra.sweeper`` of an Optuna search; docs/optuna.md explains each key."""

    _target_: str = "hydra_plugins.nst_exp_sweepers.NstOptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built by the sweeper (and the pruner by each job)
    direction: str = "minimize"  # result/objective is lower-is-better; the only direction accepted
    study_name: str = "nst"
    storage: Optional[str] = None  # an SQLAlchemy URL; null = sqlite:///<sweep folder>/optuna.db
    n_trials: int = 20  # trials the study should hold, completed or pruned (a rerun tops it up)
    n_jobs: int = 1  # trials per batch handed to the launcher (run in parallel by joblib/submitit/SLURM)
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    # null = no pruning; the jobs report their relative loss (loss/total over its first value) every logging.flush_every steps
    pruner: Any = field(default_factory=lambda: {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 4, "n_warmup_steps": 20})
    params: Dict[str, str] = field(default_factory=dict)  # key: Hydra sweep syntax (choice, range, interval, tag(log, ...))


ConfigStore.instance().store(group="hydra/sweeper", name="nst_optuna", node=NstOptunaSweeperConf, provider="nst_exp")


class NstOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.impl: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from nst_exp.sweep.optuna_sweeper import OptunaSearch

        self.impl = OptunaSearch(self.settings, hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Optional[Any]:
        return self.impl.sweep(arguments)
