"""Several processes for one run: ``trainer.devices=N`` with ``image.tile`` shares every loss pass's
tiles over N processes (one per GPU, or N CPU processes) through ``torch.distributed``.

Process 0 is the run: Lightning, the optimiser, logging and the run folder. The others, the
helpers, only run loss passes. For each pass process 0 broadcasts a header (stage, image size, tile,
kept graphs) and the image; then every process runs ``exact.tiled_loss_and_grad`` on its share of
the tiles with ``Collective`` as its reduction, whose all-reduces give each of them the whole loss and
gradient. A helper's losses come from a ``HelperSetup`` the caller hands over (built the runner's
way, from the same config and images); helpers write nothing. Process 0 tells them to stop when its
stages are over (or it fails).

Who starts them: alone (``python -m nst_exp run``, ``nst_exp.stylize``), process 0 spawns the
others with ``torch.multiprocessing`` and a TCP rendezvous on 127.0.0.1; in a submitit job with
several tasks (``hydra.launcher.tasks_per_node``, which follows ``trainer.devices``) the tasks are
the processes, joined through submitit's ``TorchDistributedEnvironment`` (SLURM or local).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from nst_exp.errors import UserError
from nst_exp.model.losses import StyleTransferLoss
from nst_exp.tiling.exact import Backward, TiledPass, WholePass, loss_pass, tiled_loss_and_grad

LOSS_PASS, STOP = 1, 0
# A helper waits for process 0 between loss passes, through target computation at a new stage (minutes
# for a print-size image on a CPU) and logging: the rendezvous and every collective may wait this long.
WAIT = timedelta(hours=2)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def threads_per_process(world_here: int) -> int:
    """CPU threads for each of ``world_here`` processes on this machine: SLURM's cpus-per-task where
    it says, else this process's cores shared out (N processes with every core each would thrash)."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_here)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_tasks() -> tuple[int, int, int] | None:
    """(rank, world, local world) when this process is one of several tasks of a submitit job, else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return None
    return env.global_rank, env.num_tasks, env.num_tasks // env.num_nodes


def join_job_tasks(device: torch.device) -> None:
    """Initialise ``torch.distributed`` over the job's tasks (submitit's rendezvous: the first node, a
    port from the job id)."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group(backend(device), timeout=WAIT)


class Collective:
    """The reduction over the initialised ``torch.distributed`` group (``exact.Reduction``)."""

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return dist.get_world_size()

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, 0)


@dataclass
class TileGroup:
    """Process 0's side of the group: it starts each loss pass and ends the group."""

    device: torch.device
    world: int
    children: list[Any] = field(default_factory=list)  # the helpers this process spawned (none for job tasks)
    threads_before: int = 0
    closed: bool = False
    in_pass: bool = False  # True from a loss pass's header to its end: the helpers are inside it

    def loss_pass(self, stage: int, loss: StyleTransferLoss, tile: int | None, keep: int, shape: Sequence[int]) -> WholePass | TiledPass:
        """Stage ``stage``'s pass with the stage's plan: tiles shared with the helpers (process 0's tile
        and keep for all), or the whole image here alone where it is not larger than one tile."""
        alone = loss_pass(loss, tile, keep, shape)
        return SharedPass(loss, alone.tile, alone.keep, Collective(), self, stage) if isinstance(alone, TiledPass) else alone

    def close(self) -> None:
        """Tell the helpers to stop, wait for those spawned here, leave the group.

        A pass cut short (Ctrl-C, an error) leaves the helpers inside one of its collectives, where
        a stop message would never be matched: then the spawned helpers are ended instead, and job tasks
        end when this process does (their collectives fail once its connections close)."""
        if self.closed:
            return
        self.closed = True
        if not self.in_pass:
            try:
                _send_header(STOP, 0, 0, 0, self.device)
            except Exception:  # noqa: BLE001 - a helper died (its error is what the run reports): just leave
                pass
        for child in self.children:
            child.join(timeout=0 if self.in_pass else 30)
            if child.is_alive():
                child.terminate()
                child.join()
        try:
            dist.destroy_process_group()  # also after a cut-short pass: nothing may send on this group again
        except Exception:  # noqa: BLE001 - leaving is all that is left to do
            pass
        if self.threads_before:
            torch.set_num_threads(self.threads_before)
        failed = [c.exitcode for c in self.children if c.exitcode and c.exitcode > 0]
        if failed:  # process 0's own error (a broken collective) is what the run reports
            print(f"error: a tile helper process exited with status {failed[0]} (its error is printed above)", file=sys.stderr)


@dataclass
class SharedPass(TiledPass):
    """Process 0's tiled pass: the header and the image to the helpers, then its own share of the tiles."""

    group: TileGroup | None = None
    stage: int = 0

    def __call__(self, image: Tensor, backward: Backward) -> dict[str, Tensor]:
        assert self.group is not None
        self.group.in_pass = True
        _send_header(LOSS_PASS, self.stage, image.shape[-2], image.shape[-1], self.group.device, self.tile, self.keep)
        dist.broadcast(image.detach().float().contiguous(), 0)
        terms = tiled_loss_and_grad(self.loss, image, self.tile, self.keep, self.reduction)
        self.group.in_pass = False
        return terms


HEADER = 6  # command, stage, height, width, tile, keep


def _send_header(command: int, stage: int, height: int, width: int, device: torch.device, tile: int = 0, keep: int = 0) -> None:
    dist.broadcast(torch.tensor([command, stage, height, width, tile, keep], dtype=torch.int64, device=device), 0)


def check_group(world: int, tiled: bool, bf16_true: bool, devices: int) -> None:
    """Several processes share tiles: without a tile (``tiled``: ``image.tile`` is not null) there is
    nothing to share; ``bf16_true``: the run's resolved precision is bf16-true, whose pure-bf16 parameters the
    helpers do not mirror. ``devices``: ``trainer.devices``, for the message."""
    if world > 1 and not tiled:
        raise UserError(
            f"{world} processes (trainer.devices={devices} or the job's tasks) share the tiles of "
            "image.tile, which is null; fix: image.tile=auto (or a tile in px, e.g. 1024), or trainer.devices=1"
        )
    if world > 1 and bf16_true:
        raise UserError("trainer.precision=bf16-true is not supported with several processes; fix: trainer.precision=bf16-mixed")


class HelperSetup(Protocol):
    """What a helper needs, made by the caller (the run's layer) and sent to spawned helpers (picklable)."""

    def device(self, local_rank: int) -> torch.device:
        """The helper's device: the GPU ``local_rank`` places after the run's (one GPU per process), or the CPU."""

    def open(self, device: torch.device) -> tuple[Callable[[int], StyleTransferLoss], bool]:
        """Each stage's loss on ``device`` (by stage index, built the runner's way), and whether passes run
        under bf16 autocast (what Lightning's precision plugin does on process 0)."""


def joined_world() -> int | None:
    """The size of the ``torch.distributed`` group this process has joined already (a job's tasks), else None."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def start(device: torch.device, world: int, helper: HelperSetup) -> TileGroup | None:
    """Process 0's group of ``world`` processes (check them first with ``check_group``): the job's
    tasks when this process has joined them already (``cli.run``), else ``world - 1`` spawned helpers;
    None when the run is one process."""
    if joined_world() is not None:
        return TileGroup(device, world) if world > 1 else None
    if world <= 1:
        return None
    if device.type == "cuda" and world > torch.cuda.device_count():  # NCCL takes one GPU per process
        raise UserError(
            f"trainer.devices={world} runs one process per GPU and {torch.cuda.device_count()} GPU(s) are "
            f"visible; fix: trainer.devices={torch.cuda.device_count()}"
        )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads_per_process(world))
    address = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.get_context("spawn")
    ready = context.SimpleQueue()
    children = []
    for rank in range(1, world):
        child = context.Process(
            target=_helper_main, args=(helper, rank, world, address, ready), daemon=True, name=f"nst_exp tile helper {rank}"
        )
        child.start()
        children.append(child)
    _wait_ready(children, ready)
    dist.init_process_group(backend(device), init_method=address, rank=0, world_size=world, timeout=WAIT)
    return TileGroup(device, world, children, threads_before)


def _wait_ready(children: list[Any], ready: Any) -> None:
    """Wait until every helper is about to join the rendezvous; one that died before (say, a script
    without a ``__main__`` guard, which every spawned process imports) is an error here, not a hang."""
    waiting = len(children)
    while waiting:
        if not ready.empty():
            ready.get()
            waiting -= 1
            continue
        dead = [c for c in children if not c.is_alive()]
        if dead:
            for child in children:
                child.terminate()
            raise UserError(
                f"a tile helper process (trainer.devices) exited with status {dead[0].exitcode} before it "
                "started; its error is printed above (a script calling nst_exp.stylize needs `if __name__ == "
                "'__main__':` around it: spawned processes import it); fix that, or trainer.devices=1"
            )
        time.sleep(0.05)


def _helper_main(helper: HelperSetup, rank: int, world: int, address: str, ready: Any) -> None:
    """A spawned helper: join the group, serve until process 0 says stop. Ctrl-C reaches the whole
    terminal's process group: only process 0 acts on it (it saves the run, then stops the helpers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = helper.device(rank)
    torch.set_num_threads(threads_per_process(world))
    ready.put(rank)
    dist.init_process_group(backend(device), init_method=address, rank=rank, world_size=world, timeout=WAIT)
    try:
        serve(device, *helper.open(device))
    finally:
        dist.destroy_process_group()


def serve(device: torch.device, loss_at: Callable[[int], StyleTransferLoss], bf16: bool) -> None:
    """A helper's loop: for each header, the stage's loss (``loss_at(stage)``, once per stage) on
    process 0's image, this process's tiles; until STOP."""
    reduction = Collective()
    loss, built_for, passes = None, -1, 0
    header = torch.zeros(HEADER, dtype=torch.int64, device=device)
    while True:
        dist.broadcast(header, 0)
        command, stage, height, width, tile, keep = header.tolist()
        if command == STOP:
            print(f"tile helper {dist.get_rank()}/{dist.get_world_size()}: {passes} loss passes shared", flush=True)
            return
        if stage != built_for:
            loss = loss_at(stage)
            built_for = stage
        image = torch.empty((1, 3, height, width), device=device)
        dist.broadcast(image, 0)
        image.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            tiled_loss_and_grad(loss, image, tile, keep, reduction)
        passes += 1
