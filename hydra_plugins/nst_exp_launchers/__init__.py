"""Hydra launcher plugins of nst_exp: Hydra's submitit launchers, with each job's outcome collected.

Kept thin (Hydra imports every ``hydra_plugins`` module at start-up); the logic is in
``nst_exp.sweep.cluster``. ``conf/launcher/slurm.yaml`` and ``submitit_local.yaml`` name these classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


class NstSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nst_exp.sweep.cluster import launch

        return launch(self, job_overrides, initial_job_idx)


class NstLocalLauncher(LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nst_exp.sweep.cluster import launch

        return launch(self, job_overrides, initial_job_idx)
