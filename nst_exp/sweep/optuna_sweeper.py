"""The Optuna search driver behind ``hydra/sweeper: nst_optuna`` (``hydra_plugins/nst_exp_sweepers``).

- The study lives in Optuna's RDB storage: ``hydra.sweeper.storage`` (e.g. a PostgreSQL URL shared
  by many machines), else an SQLite file in the sweep folder (``sweep/study.py``).
- Trials are asked in batches of ``n_jobs`` and handed to whatever launcher the config chose (basic,
  joblib, submitit_local, slurm), which runs a batch in parallel; each job gets ``optuna.trial=<number>``.
- ``n_trials`` is the number of completed or pruned trials the study should hold: the same command
  again (same storage) continues the study and runs only what is missing. A trial left running by a
  driver that died is relaunched into its own job folder, where the job resumes from ``last.ckpt``.
- Jobs report their progress and prune themselves (``sweep/study.TrialReporter``); the driver records
  every other outcome: the returned ``result/objective``, or a failed trial for a job that gave none.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from nst_exp.errors import UserError
from nst_exp.sweep.study import build, open_storage, storage_url

log = logging.getLogger(__name__)

TRIAL_KEY = "optuna.trial"  # the override telling a job which trial it is (nst_exp/config.py OptunaConfig)
_JOB_NUMBER = re.compile(r"^(\d+)_")


def search_space(params: Mapping[str, str], arguments: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(fixed overrides, {key: Optuna distribution}) from ``hydra.sweeper.params`` and the command line.

    Hydra's sweep syntax: ``choice(a, b)`` or ``a,b`` -> categorical, ``range(lo, hi, step)`` -> stepped
    int/float (``hi`` excluded, as in Python), ``interval(lo, hi)`` -> float, ``tag(log, ...)`` -> log
    scale. A command-line override of a key replaces that key's entry in ``params``.
    """
    import optuna.distributions as dist
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser = OverridesParser.create()
    given = parser.parse_overrides(list(arguments))
    on_command_line = {o.key_or_group for o in given}
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in on_command_line]) + given
    fixed: list[str] = []
    space: dict[str, Any] = {}
    for o in overrides:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        key, value = o.get_key_element(), o.value()
        log_scale = "log" in (value.tags or set())
        if isinstance(value, ChoiceSweep):
            space[key] = dist.CategoricalDistribution(list(value.list))
        elif isinstance(value, RangeSweep):
            numbers = [value.start, value.stop, value.step]
            if all(isinstance(n, int) for n in numbers):
                high = value.start + (value.stop - 1 - value.start) // value.step * value.step
                space[key] = dist.IntDistribution(value.start, high, step=value.step)
            else:
                count = math.ceil((value.stop - value.start) / value.step)
                space[key] = dist.FloatDistribution(value.start, value.start + (count - 1) * value.step, step=value.step)
        elif isinstance(value, IntervalSweep):
            space[key] = dist.FloatDistribution(value.start, value.end, log=log_scale)
        else:
            raise UserError(
                f"{o.input_line}: an Optuna search takes choice(...), range(...), interval(...) or "
                "tag(log, interval(...)); fix: one of these (docs/optuna.md)"
            )
    return fixed, space


def _override(key: str, value: Any) -> str:
    text = str(value)
    if isinstance(value, str) and re.search(r"[\s,()\[\]{}'\"=]", text):
        text = "'" + text.replace("'", "\\'") + "'"
    return f"{key}={text}"


def next_job_number(sweep_dir: Path) -> int:
    """The first job number no folder in ``sweep_dir`` uses yet (a rerun adds after what is there)."""
    numbers = (
        [int(m.group(1)) for p in sweep_dir.iterdir() if p.is_dir() and (m := _JOB_NUMBER.match(p.name))] if sweep_dir.is_dir() else []
    )
    return max(numbers, default=-1) + 1


SWEEPER = "hydra_plugins.nst_exp_sweepers.NstOptunaSweeper"


def check_settings(settings: Mapping[str, Any]) -> None:
    """One-line errors for the sweeper's settings, before Hydra starts (``cli/checks.py``): direction,
    counts, the search space, the sampler and pruner, and a storage URL that is given (not the default)."""
    if settings.get("direction", "minimize") != "minimize":
        raise UserError(
            f"hydra.sweeper.direction={settings['direction']}: the objective result/objective is lower-is-better; "
            "fix: hydra.sweeper.direction=minimize"
        )
    for key in ("n_trials", "n_jobs"):
        if not isinstance(settings.get(key, 1), int) or not settings.get(key, 1) >= 1:
            raise UserError(f"hydra.sweeper.{key}={settings[key]} must be at least 1; fix: hydra.sweeper.{key}=1 or more")
    try:
        search_space(dict(settings.get("params") or {}), [])
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - Hydra's override grammar: say which entry
        raise UserError(
            f"hydra.sweeper.params: {str(exc).strip().splitlines()[0]}; fix: choice(...), range(...), "
            "interval(...) or tag(log, interval(...)) (docs/optuna.md)"
        ) from None
    build(settings.get("sampler"))
    build(settings.get("pruner"))
    if settings.get("storage"):
        open_storage(str(settings["storage"]))


class OptunaSearch:
    def __init__(self, settings: Mapping[str, Any], *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.settings = OmegaConf.create(dict(settings))
        check_settings(self.settings)
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context, task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        import optuna
        from optuna.trial import TrialState

        fixed, space = search_space(OmegaConf.to_container(self.settings.params or {}), arguments)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        url = storage_url(self.settings.storage, self.sweep_dir)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(url)
        study = optuna.create_study(
            study_name=self.settings.study_name,
            storage=storage,
            sampler=build(self._sampler(storage)),
            direction="minimize",
            load_if_exists=True,
        )
        n_trials, n_jobs = int(self.settings.n_trials), int(self.settings.n_jobs)
        log.info(f"Optuna study {study.study_name} in {_shown(url)}: {len(space)} searched, {n_trials} trials, {n_jobs} at a time")
        returns: list[JobReturn] = []
        stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if self._ours(t)]
        # after every folder and every number a trial left running holds (its job may not have made its folder yet)
        number = max([next_job_number(self.sweep_dir), *(int(t.user_attrs["job_number"]) + 1 for t in stale)])
        failures = 0
        while True:
            if stale:  # a driver killed mid-batch left these running: relaunch them into their own folders
                batch, stale = stale[:n_jobs], stale[n_jobs:]
                jobs = sorted((t.number, list(t.user_attrs["overrides"]), int(t.user_attrs["job_number"])) for t in batch)
                log.info(f"continuing trials {', '.join(str(j[0]) for j in jobs)} in their job folders")
                for run in _consecutive(jobs):  # a launch numbers its jobs consecutively
                    results = self._launch(study, run)
                    failures += sum(not _finite(r) for r in results)
                    returns += results
                continue
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            elsewhere = sum(t.state == TrialState.RUNNING and not self._ours(t) for t in trials)  # other drivers' batches
            missing = n_trials - done - elsewhere
            if missing <= 0 or failures >= n_trials:
                break
            jobs = []
            for _ in range(min(n_jobs, missing)):
                trial = study.ask(space)
                overrides = [*fixed, *(_override(k, v) for k, v in trial.params.items()), f"{TRIAL_KEY}={trial.number}"]
                trial.set_user_attr("sweep_dir", str(self.sweep_dir))
                trial.set_user_attr("job_number", number)
                trial.set_user_attr("overrides", overrides)
                jobs.append((trial.number, overrides, number))
                number += 1
            results = self._launch(study, jobs)
            failures += sum(not _finite(r) for r in results)
            returns += results
        self._report(study, failures >= n_trials)
        return returns

    def _sampler(self, storage: Any) -> Any:
        """The sampler's settings; a seeded sampler continuing a study is seeded past its trials, since the
        same seed again would draw the first trials' parameters again."""
        spec = self.settings.sampler
        if spec is None or spec.get("seed") is None:
            return spec
        try:
            study_id = storage.get_study_id_from_name(self.settings.study_name)
        except KeyError:  # a new study
            return spec
        spec = OmegaConf.create(OmegaConf.to_container(spec))
        spec.seed = int(spec.seed) + len(storage.get_all_trials(study_id, deepcopy=False))
        return spec

    def _ours(self, trial: Any) -> bool:
        return trial.user_attrs.get("sweep_dir") == str(self.sweep_dir) and "job_number" in trial.user_attrs

    def _launch(self, study: Any, jobs: list[tuple[int, list[str], int]]) -> list[JobReturn]:
        """Run the jobs (consecutive job numbers) as one launch, then tell the study each outcome."""
        from optuna.trial import TrialState

        results = list(self.launcher.launch([o for _, o, _ in jobs], initial_job_idx=jobs[0][2]))
        for (trial, _, _), result in zip(jobs, results):
            if _finite(result):
                study.tell(trial, float(result._return_value), skip_if_finished=True)  # a pruned job told its state itself
            else:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return results

    def _report(self, study: Any, gave_up: bool) -> None:
        from optuna.trial import TrialState

        counts = {s.name.lower(): n for s in TrialState if (n := len(study.get_trials(deepcopy=False, states=(s,))))}
        print(f"study:       {study.study_name}, " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        if gave_up:
            print(
                f"error: {self.settings.n_trials} trials failed in this search; the summary says why. fix: the cause, "
                "then the same command continues the study"
            )
        try:
            best = study.best_trial
        except ValueError:  # no completed trial yet
            return
        params = " ".join(_override(k, v) for k, v in best.params.items())
        where = best.user_attrs.get("sweep_dir")
        folder = f" (job {best.user_attrs.get('job_number')} in {where})" if where else ""
        print(f"best trial:  #{best.number}, result/objective {best.value:.4g}: {params}{folder}")


def _consecutive(jobs: list[tuple[int, list[str], int]]) -> list[list[tuple[int, list[str], int]]]:
    """The jobs in runs of consecutive job numbers."""
    runs: list[list[tuple[int, list[str], int]]] = []
    for job in sorted(jobs, key=lambda j: j[2]):
        if runs and runs[-1][-1][2] + 1 == job[2]:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def _finite(result: JobReturn) -> bool:
    if result.status != JobStatus.COMPLETED:
        return False
    value = result._return_value
    return isinstance(value, (int, float)) and math.isfinite(value)


def _shown(url: str) -> str:
    from nst_exp.sweep.study import _safe

    return _safe(url)
