"""The optimiser a config asks for, over the one image tensor (shared by the module and the bench's bare loop)."""

from __future__ import annotations

import torch
from torch import Tensor

from nst_exp.config import LBFGSImpl, OptimizerConfig, OptimizerName
from nst_exp.optim.lbfgs import CompactLBFGS


def build_optimizer(image: Tensor, cfg: OptimizerConfig, cuda_graph: bool = False) -> torch.optim.Optimizer:
    """``cuda_graph``: capture and replay the whole step (the compact L-BFGS does, for a CUDA image; others ignore it)."""
    if cfg.name == OptimizerName.adam:
        return torch.optim.Adam([image], lr=cfg.lr, betas=tuple(cfg.betas))
    if resolve_impl(cfg, image.device) == LBFGSImpl.compact:
        return CompactLBFGS([image], lr=cfg.lr, history_size=cfg.history_size, cuda_graph=cuda_graph)
    return torch.optim.LBFGS([image], lr=cfg.lr, max_iter=1, history_size=cfg.history_size, line_search_fn=cfg.line_search)


def resolve_impl(cfg: OptimizerConfig, device: torch.device) -> LBFGSImpl:
    """``optimizer.impl=auto``: compact on CUDA (no host syncs, CUDA graphs); torch on the CPU, where
    compact's three passes over the stored pairs per step cost more than torch's two (figures in
    docs/performance.md), and with a line search (only torch's has one)."""
    if cfg.impl != LBFGSImpl.auto:
        return cfg.impl
    return LBFGSImpl.compact if device.type == "cuda" and not cfg.line_search else LBFGSImpl.torch
