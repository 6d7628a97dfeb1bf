"""The Optuna study on its database, as the sweep driver and each trial's job see it.

The driver (``sweep/optuna_sweeper.py``) creates or continues the study; a job that is a trial
(``optuna.trial`` set by the driver) opens the same study from the sweeper's settings in its Hydra
config, reports its progress there and, when the study's pruner says so, stops and records itself
as pruned. Nothing here is imported unless a search runs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nst_exp.errors import UserError

STUDY_FILE = "optuna.db"  # the embedded default: an SQLite file in the sweep folder
REPORTED = "loss/total"  # the per-step loss whose ratio to its first value the jobs report


def storage_url(storage: str | None, sweep_dir: str | Path) -> str:
    """The study's SQLAlchemy URL: ``storage`` as given, or an SQLite file in the sweep folder."""
    if storage:
        return str(storage)
    return f"sqlite:///{Path(sweep_dir).resolve() / STUDY_FILE}"


def open_storage(url: str) -> Any:
    """Optuna's RDB storage on ``url``; an unreachable database or a missing driver is one line."""
    import optuna

    # SQLite: jobs running in parallel write intermediate values to one file; wait for its lock.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except ModuleNotFoundError as exc:
        raise UserError(
            f"hydra.sweeper.storage={_safe(url)} needs the Python module {exc.name}; fix: "
            "pip install 'nst_exp[postgres]' (psycopg2-binary) for a postgresql:// URL"
        ) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's OperationalError/ArgumentError: say which URL and why
        raise UserError(
            f"cannot open the Optuna storage {_safe(url)}: {_first_line(exc)}; fix: a reachable database URL "
            "in hydra.sweeper.storage (null = an SQLite file in the sweep folder)"
        ) from None


def build(spec: Any) -> Any:
    """A sampler or pruner from its ``_target_`` node (None stays None)."""
    if spec is None:
        return None
    from hydra.utils import instantiate

    try:
        return instantiate(spec)
    except Exception as exc:  # noqa: BLE001 - a misspelt class or argument: one line
        problem = _first_line(exc).split(", set env var HYDRA_FULL_ERROR")[0]
        raise UserError(
            f"cannot build {dict(spec).get('_target_')}: {problem}; fix: an optuna.samplers.* or "
            "optuna.pruners.* class and its arguments (docs/optuna.md)"
        ) from None


class TrialReporter:
    """A job's handle on its trial: reports the relative loss (``loss/total`` over its first reported
    value, kept in the trial's user attributes so a resumed job keeps the same scale) and asks the
    study's pruner whether to stop.

    The ratio, not the loss itself: ``loss/total`` grows with ``loss.style_weight``, so a median of
    raw losses would prune the trials with large weights rather than the ones that make no progress.
    """

    def __init__(self, study: Any, trial: Any) -> None:
        self.study, self.trial = study, trial
        self.first = trial.user_attrs.get("first_loss")

    @property
    def number(self) -> int:
        return self.trial.number

    def report(self, loss: float, step: int) -> bool:
        """Report ``loss`` at ``step``; True when the pruner says the trial is hopeless."""
        if not math.isfinite(loss):
            return False  # divergence is the run's own stop
        if self.first is None:
            self.first = loss
            self.trial.set_user_attr("first_loss", loss)
        self.trial.report(loss / self.first if self.first > 0 else loss, step)
        return self.trial.should_prune()

    def pruned(self) -> None:
        """Record the trial as pruned (its last reported value stays with it)."""
        import optuna

        self.study.tell(self.trial.number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)


def connect(trial_number: int | None, sweeper: Mapping[str, Any] | None, sweep_dir: str) -> TrialReporter | None:
    """The trial this job is, when an Optuna search launched it (``optuna.trial`` and the sweeper's
    settings); None otherwise. A study that cannot be reached costs the pruning, not the run."""
    if trial_number is None or not sweeper or "study_name" not in sweeper or sweeper.get("pruner") is None:
        return None
    try:
        import optuna

        storage = open_storage(storage_url(sweeper.get("storage"), sweep_dir))
        study = optuna.load_study(study_name=sweeper["study_name"], storage=storage, pruner=build(sweeper["pruner"]))
        study_id = storage.get_study_id_from_name(sweeper["study_name"])
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(trial_number))
        return TrialReporter(study, optuna.trial.Trial(study, trial_id))
    except Exception as exc:  # noqa: BLE001 - the run goes on unpruned; the driver still records its result
        print(f"warning: trial {trial_number} cannot reach its study, so it runs to its end unpruned: {_first_line(exc)}", file=sys.stderr)
        return None


def _safe(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.split(':')[0]}:***@{tail}" if ":" in user else url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
