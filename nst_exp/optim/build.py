"""The optimiser over the one image tensor, from plain typed arguments (shared by the module and the bench's bare loop).

``auto`` is not decided here: ``nst_exp.settings`` resolves ``optimizer.impl`` for the device and hands an
``OptimizerSpec`` down. A bad argument is a ``ValueError``; the entry points turn it into one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nst_exp.config import LBFGSImpl, OptimizerName
from nst_exp.optim.lbfgs import CompactLBFGS


@dataclass(frozen=True)
class OptimizerSpec:
    """What to build: ``impl`` is L-BFGS's implementation as resolved (compact or torch, never auto)."""

    name: OptimizerName
    lr: float
    history_size: int = 50
    line_search: str | None = None
    impl: LBFGSImpl = LBFGSImpl.torch
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.impl == LBFGSImpl.auto:
            raise ValueError("OptimizerSpec.impl must be compact or torch (auto is resolved per device by nst_exp.settings)")
        if self.line_search is not None and self.impl == LBFGSImpl.compact:
            raise ValueError("optimizer.line_search=strong_wolfe needs torch's L-BFGS; fix: add optimizer.impl=torch")


def build_optimizer(image: Tensor, spec: OptimizerSpec, cuda_graph: bool = False) -> torch.optim.Optimizer:
    """``cuda_graph``: capture and replay the whole step (the compact L-BFGS does, for a CUDA image; others ignore it)."""
    if spec.name == OptimizerName.adam:
        return torch.optim.Adam([image], lr=spec.lr, betas=tuple(spec.betas))
    if spec.impl == LBFGSImpl.compact:
        return CompactLBFGS([image], lr=spec.lr, history_size=spec.history_size, cuda_graph=cuda_graph)
    return torch.optim.LBFGS([image], lr=spec.lr, max_iter=1, history_size=spec.history_size, line_search_fn=spec.line_search)
