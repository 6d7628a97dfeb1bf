"""Early stopping of an Optuna trial: the run's per-step loss goes to its trial, the study's pruner decides.

The run knows nothing of Optuna: it is handed something with ``report(loss, step) -> prune?``
(``sweep/study.TrialReporter``), called once per flush of the loss history, when the losses are
on the host anyway (no extra device sync).
"""

from __future__ import annotations

from typing import Any, Protocol

import pytorch_lightning as pl

from nst_exp.run.module import StylizeModule


class Reporter(Protocol):
    def report(self, loss: float, step: int) -> bool: ...


class PruneCheck(pl.Callback):
    """After each flush: report ``loss/total`` at its logged step; stop training when told to prune."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.pruned_at: int | None = None  # the logged step at which the pruner stopped the run
        self._reported: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: StylizeModule, *args: Any) -> None:
        step = pl_module.latest_step
        if step is None or step == self._reported or "loss/total" not in pl_module.latest_losses:
            return
        self._reported = step
        if self.reporter.report(pl_module.latest_losses["loss/total"], step):
            self.pruned_at = step
            trainer.should_stop = True
