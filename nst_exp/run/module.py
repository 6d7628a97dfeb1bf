"""The LightningModule: its only parameter is the generated image.

Manual optimisation: one Lightning batch runs ``iters_per_step`` optimiser iterations
(``global_step`` counts iterations, so ``trainer.max_steps`` stays "optimiser steps"), which
amortises Lightning's fixed per-batch cost over several iterations on fast GPUs. The loss
terms of every iteration are written into an on-device history buffer (no host sync). The
module owns that history: ``flush_losses`` copies it to TensorBoard (asynchronously from a GPU),
keeps the last written terms (``latest_losses``) and stops training at a NaN/inf total
(``diverged_at``). ``callbacks.ScalarFlusher`` only decides when to flush.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from nst_exp.optim.build import OptimizerSpec, build_optimizer
from nst_exp.tiling.exact import LossPass


class HostCopy:
    """A tensor on its way to host memory: from a GPU the copy is only queued, and ``get`` waits for it alone."""

    def __init__(self, source: Tensor) -> None:
        self.ready: torch.cuda.Event | None = None  # None: the copy is complete already
        if source.is_cuda:
            self._value = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self._value.copy_(source, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self._value = source.to("cpu", copy=True)

    def get(self) -> Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self._value


@dataclass
class _Staged:
    """History rows on their way to the host, written at the next flush."""

    rows: HostCopy
    first_step: int
    loss_passes: int


class StylizeModule(pl.LightningModule):
    def __init__(
        self,
        init_image: Tensor,
        loss_pass: LossPass,
        optimizer: OptimizerSpec,
        history_rows: int,
        step_offset: int = 0,
        optimizer_state: dict | None = None,
        iters_per_step: int = 1,
        cuda_graph: bool = False,
        ema_decay: float = 0.0,
        ema_state: dict[str, Tensor] | None = None,
        redraw_every: int = 0,
        stage_done: int = 0,
    ) -> None:
        super().__init__()
        # The loss and its image gradient: whole, tiled, or shared by several processes (tiling/exact.py, tiling/group.py).
        self.loss_pass = loss_pass
        self.cuda_graph = cuda_graph and loss_pass.replayable  # a tiled step is many passes, not one graph
        self.automatic_optimization = False
        self.iters_per_step = iters_per_step
        # The image stays NCHW-contiguous (L-BFGS flattens it with .view); the encoder goes NHWC inside.
        self.image = nn.Parameter(init_image.detach().clone().contiguous())
        self.loss_fn = loss_pass.loss  # a submodule: it moves with the module
        self.optimizer_spec = optimizer
        self.term_names = loss_pass.loss.term_names()
        # Logged step = step_offset + global_step, so multi-scale stages and resumed runs continue one curve.
        self.step_offset = step_offset
        self.register_buffer("history", torch.zeros(history_rows, len(self.term_names)), persistent=False)
        # The row the next step writes, kept on the device so a replayed CUDA graph advances it too.
        self.register_buffer("history_row", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("last_good", init_image.detach().clone(), persistent=False)
        # Averaged iterates (optimizer.ema_decay): a bias-corrected EMA, accumulated from zero as crowsonkb's,
        # so the first image does not linger in it; decay_left = decay^steps.
        self.ema_decay = float(ema_decay)
        self.register_buffer("ema_sum", torch.zeros_like(self.image.detach()), persistent=False)
        self.register_buffer("ema_decay_left", torch.ones((), dtype=torch.float32, device=init_image.device), persistent=False)
        if ema_state is not None:
            self.ema_sum.copy_(ema_state["sum"])
            self.ema_decay_left.copy_(ema_state["decay_left"])
        # loss.swd_redraw_every: draw k of the directions covers the stage's steps [k N, (k + 1) N), counted from the
        # stage's start (stage_done: steps a resumed stage had done), so a resumed run draws what the whole run drew.
        self.redraw_every = int(redraw_every)
        self.stage_done = int(stage_done)
        self.history_start = 0  # global_step of history row 0
        self._closure_calls = 0
        self._optimizer: torch.optim.Optimizer | None = None  # made by configure_optimizers
        self._recorded_step = -1
        self._optimizer_state = optimizer_state  # restored into the optimiser when training starts
        self.latest_losses: dict[str, float] = {}  # the terms of the last step written to TensorBoard
        self.latest_step: int | None = None  # that step (logged numbering)
        self.diverged_at: int | None = None  # the logged step whose total was NaN/inf (training stops there)
        self._staged: _Staged | None = None  # history rows on their way to the host

    @property
    def loss_passes(self) -> int:
        """Loss-and-gradient passes so far (L-BFGS with line search may run more than one per step)."""
        return self._closure_calls + getattr(self._optimizer, "replays", 0)

    def flush_losses(self, wait: bool = True) -> None:
        """Write the history rows staged last time and stage the new ones; these are written too if
        ``wait``, or if their copy is complete already (a CPU copy: only a GPU copy is worth deferring).

        On a GPU each flush starts an asynchronous copy of the rows to pinned host memory and writes
        the rows staged at the previous flush, whose copy finished long ago: the step loop never
        waits for the GPU. A non-finite total stops training (``last_good`` holds the image before it).
        """
        staged = self._stage_history()
        self._write_history(self._staged)
        self._staged = staged
        if wait or (staged is not None and staged.rows.ready is None):
            self._write_history(self._staged)
            self._staged = None

    def drain_losses(self) -> None:
        """Every step so far on disk: a checkpoint must never cover steps whose scalars a kill would lose."""
        self.flush_losses()
        self.logger.experiment.flush()

    def _stage_history(self) -> _Staged | None:
        n = min(self.global_step - self.history_start, self.history.shape[0])
        if n <= 0:
            return None
        staged = _Staged(HostCopy(self.history[:n]), self.step_offset + self.history_start, self.loss_passes)
        # Later steps overwrite the buffer from row 0; the copy is ahead of them on the stream.
        self.history_start = self.global_step
        self.history_row.zero_()
        return staged

    def _write_history(self, staged: _Staged | None) -> None:
        if staged is None:
            return
        writer = self.logger.experiment
        rows = staged.rows.get().tolist()
        for i, row in enumerate(rows):
            if self.diverged_at is not None:
                break
            if not math.isfinite(row[0]):
                self.diverged_at = staged.first_step + i
                self.trainer.should_stop = True
                break
            for name, value in zip(self.term_names, row):
                writer.add_scalar(name, value, staged.first_step + i)
            self.latest_losses = dict(zip(self.term_names, row))
            self.latest_step = staged.first_step + i
        writer.add_scalar("perf/loss_passes", staged.loss_passes, staged.first_step + len(rows) - 1)

    def on_train_start(self) -> None:
        if self._optimizer_state is not None:
            self.trainer.optimizers[0].load_state_dict(self._optimizer_state)
            self._optimizer_state = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._optimizer = build_optimizer(self.image, self.optimizer_spec, cuda_graph=self.cuda_graph)
        return self._optimizer

    def training_step(self, batch: object, batch_idx: int) -> None:
        optimizer = self.optimizers()
        for _ in range(min(self.iters_per_step, self.trainer.max_steps - self.global_step)):
            if self.redraw_every:  # host-side arithmetic; a new draw is written in place
                self.loss_fn.redraw((self.stage_done + self.global_step) // self.redraw_every)
            optimizer.step(closure=self._closure)  # global_step += 1
            with torch.no_grad():
                self.image.clamp_(0.0, 1.0)  # keep pixels valid: projected optimisation
                if self.ema_decay:
                    self.ema_sum.mul_(self.ema_decay).add_(self.image, alpha=1.0 - self.ema_decay)
                    self.ema_decay_left.mul_(self.ema_decay)

    @property
    def output_image(self) -> Tensor:
        """The image a run saves, logs and carries to the next stage: the iterates' average with
        ``ema_decay``, else the iterate itself (before the first step, the iterate either way). No host sync."""
        image = self.image.detach()
        if not self.ema_decay:
            return image
        done = 1.0 - self.ema_decay_left
        return torch.where(done > 0, self.ema_sum / done.clamp_min(1e-12), image)

    def ema_state(self) -> dict[str, Tensor] | None:
        """What a checkpoint keeps of the average (None without ``ema_decay``)."""
        if not self.ema_decay:
            return None
        return {"sum": self.ema_sum.detach().cpu().clone(), "decay_left": self.ema_decay_left.detach().cpu().clone()}

    def restart_average(self) -> None:
        """Forget the average (after a divergence the iterate went back to its last good value)."""
        self.ema_sum.zero_()
        self.ema_decay_left.fill_(1.0)

    def _closure(self) -> Tensor:
        self.image.grad = None
        terms = self.loss_pass(self.image, self.manual_backward)  # the gradient in image.grad
        total = terms["loss/total"]
        self._closure_calls += 1
        if self._recorded_step != self.global_step:
            # First loss pass of this step = the loss at the image before the update.
            self._recorded_step = self.global_step
            with torch.no_grad():
                row = torch.stack([terms[name].detach().float() for name in self.term_names])
                self.history.index_copy_(0, self.history_row, row[None])
                self.history_row.add_(1)
                good = torch.isfinite(total)
                self.last_good.copy_(torch.where(good, self.image.detach(), self.last_good))
        return total

    @property
    def logged_step(self) -> int:
        """The step number on the run's curves (continues across stages and resumes)."""
        return self.step_offset + self.global_step
