"""The step loop never makes the host wait for the device: checked on the CPU, op by op.

On a GPU the host runs ahead of the device; anything that reads a device value into Python
(``.item()``, ``bool(t)``, ``float(t)``), has a data-dependent shape (``nonzero``, boolean-mask
indexing) or copies a Python value to the device (``torch.tensor(x, device=...)``: a pageable,
blocking copy) stalls it until the GPU's queue drains, and the GPU then idles through Lightning's
hooks. Those calls dispatch the same aten ops on the CPU, so a dispatch mode that is active from
the second Lightning batch to the end of training sees every one of them, wherever it comes
from (this package, Lightning, its progress bar, TensorBoard logging). ``tolist``/``cpu``/
``numpy`` do not dispatch on the CPU; they are watched directly, except on the host copies that
``HostCopy`` hands out and on tensors computed from them (reading those is the point of a flush).
A checkpoint is the one place allowed to wait: it must hold the device's state.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nst_exp.api import compose_config
from nst_exp.run import module as nst_module
from nst_exp.run import runner

# aten ops that wait for the device (CUDA: a stream sync, or a blocking copy from pageable memory).
SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), bool(), float(), int(), Python comparisons on tensors
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "lift_fresh",  # torch.tensor(python value) / as_tensor: a host-to-device copy that blocks
    "lift_fresh_copy",
}
HOST_READS = ("tolist", "cpu", "numpy")


ALLOWED_TO_WAIT = {("checkpoint.py", "save")}  # (file, function) anywhere on the stack


def _stack() -> list[traceback.FrameSummary]:
    """The frames of the package, Lightning and this test file, less the audit's own."""
    own = {"_stack", "flag", "__torch_dispatch__", "watched"}
    return [f for f in traceback.extract_stack() if any(k in f.filename for k in ("nst_exp", "lightning", __file__)) and f.name not in own]


def _where(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frames of the package or Lightning that led here."""
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


def _storages(tree: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.numel()}


class SyncAudit(TorchDispatchMode):
    """While active, records every op that would make the host wait for a GPU, and where it came from.

    ``on_host`` holds the storages of HostCopy results and of everything computed from them:
    those live in host memory on a GPU too, so reading them costs no wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.on_host: set[int] = set()
        self.active = False
        self.conv_dtypes: set[torch.dtype] = set()  # what the convolutions computed in

    def flag(self, what: str) -> None:
        frames = _stack()
        if not any((Path(f.filename).name, f.name) in ALLOWED_TO_WAIT for f in frames):
            self.found.append(f"{what}: {_where(frames)}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        )
        out = func(*args, **(kwargs or {}))
        if name == "convolution":
            self.conv_dtypes.add(out.dtype)
        if _storages((args, kwargs)) & self.on_host:
            self.on_host |= _storages(out)
        elif name in SYNCING_OPS or bool_index:
            self.flag(str(func))
        return out


class AuditSteadyState(pl.Callback):
    """Activates the audit from the second batch (the first allocates the optimiser state) to the end."""

    def __init__(self, audit: SyncAudit) -> None:
        self.audit = audit
        self.batches = 0
        self.state_dtypes: set[torch.dtype] = set()  # the image's and the optimiser's floating tensors

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        state = trainer.optimizers[0].state[pl_module.image]
        self.state_dtypes |= {pl_module.image.dtype} | {t.dtype for t in state.values() if torch.is_tensor(t)}
        if batch_idx == 1 and not self.audit.active:
            self.audit.__enter__()
            self.audit.active = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.audit.active:
            self.audit.__exit__(None, None, None)
            self.audit.active = False


@pytest.fixture()
def audit(monkeypatch: pytest.MonkeyPatch) -> SyncAudit:
    """A SyncAudit that also watches ``tolist``/``cpu``/``numpy`` and knows HostCopy's results."""
    audit = SyncAudit()
    original_get = nst_module.HostCopy.get

    def get_on_host(self: nst_module.HostCopy) -> torch.Tensor:
        value = original_get(self)
        audit.on_host |= _storages(value)
        return value

    monkeypatch.setattr(nst_module.HostCopy, "get", get_on_host)
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def watched(self: torch.Tensor, *args: Any, _original: Any = original, _method: str = method, **kwargs: Any) -> Any:
            if audit.active and not _storages(self) <= audit.on_host:
                audit.flag(f"Tensor.{_method}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, watched)
    return audit


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # CUDA's defaults, run on the CPU: 4 iterations per Lightning batch, fp32 (precision=auto on CUDA),
        # progress bar on, scalars flushed every 3 steps, snapshots every 4 (also written as PNGs), a checkpoint every 5.
        [
            "trainer.iters_per_step=4",
            "trainer.precision=32-true",
            "logging.progress_bar=true",
            "logging.save_snapshots=true",
            "trainer.checkpoint_every=5",
        ],
        # One iteration per batch (the CPU default), bf16 autocast.
        ["trainer.iters_per_step=1", "trainer.precision=bf16-mixed"],
        # swd with its directions redrawn every other step (loss.swd_redraw_every), 2 iterations per batch.
        ["trainer.iters_per_step=2", "trainer.precision=32-true", "loss.style_loss=swd", "loss.swd_redraw_every=2"],
    ],
    ids=["cuda-defaults", "per-step-bf16", "swd-redraw"],
)
def test_step_loop_never_waits_for_the_device(tmp_path, overrides, audit):
    """Also: bf16 autocast runs the convolutions in bf16 while the image and L-BFGS's state stay fp32 (fp64)."""
    # optimizer.impl=compact: the sync-free L-BFGS that optimizer.impl=auto picks on CUDA (on the CPU auto
    # picks torch's, which reads the loss back every step: harmless there, nothing to wait for).
    cfg = compose_config(
        ["image.size=32", "trainer.max_steps=16", "logging.flush_every=3", "logging.image_every=4", "optimizer.impl=compact", *overrides]
    )
    watcher = AuditSteadyState(audit)
    result = runner.run(cfg, tmp_path / "run", extra_callbacks=(watcher,))
    assert result.status == "completed", result.error
    assert watcher.batches >= 4  # the audit covered several batches, flushes, snapshots and checkpoints
    assert not audit.found, "host syncs in the step loop:\n" + "\n".join(dict.fromkeys(audit.found))
    bf16 = "trainer.precision=bf16-mixed" in overrides
    assert audit.conv_dtypes == ({torch.bfloat16} if bf16 else {torch.float32})
    assert watcher.state_dtypes == {torch.float32, torch.float64}


@pytest.mark.slow
def test_the_audit_sees_a_sync(tmp_path, audit):
    """The audit is not blind: a callback that reads the loss history every batch is caught."""

    class ReadsLoss(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            float(pl_module.history.sum())

    cfg = compose_config(["image.size=32", "trainer.max_steps=4", "logging.progress_bar=false", "logging.image_every=0"])
    runner.run(cfg, tmp_path / "run", extra_callbacks=(ReadsLoss(), AuditSteadyState(audit)))
    assert any("_local_scalar_dense" in f and "on_train_batch_end" in f for f in audit.found), audit.found
