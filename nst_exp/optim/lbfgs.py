"""L-BFGS without host syncs: the compact (matrix) form of the two-loop recursion.

``torch.optim.LBFGS`` reads tensors back to Python many times per step (``float(loss)``,
the tolerance checks, ``ys > 1e-10``, and ``alpha=-al[i]`` twice per history entry), and
launches ~8 small kernels per history entry. On a GPU that makes the optimiser, not VGG19,
the cost of a step. This class takes the same steps as ``torch.optim.LBFGS(max_iter=1,
line_search_fn=None)`` (same first step, same curvature test, same scaling ``H0 = s'y/y'y``)
but computes the direction with the compact representation of Byrd, Nocedal and Schnabel
(1994): two matrix products over the stored pairs and two m x m triangular solves, all on
the device, so the host never waits.

The decisions torch takes on the host are taken on the device: a rejected pair
(``s'y <= 1e-10``) is written to a scratch slot that is never used, so the kept pairs are
exactly torch's; a non-descent direction or a vanishing gradient make the step a zero step,
where torch returns early (the point is the same). With no host syncs the whole step can be
captured as a CUDA graph (``cuda_graph=True``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_CURVATURE_EPS = 1e-10  # torch.optim.LBFGS's test for keeping a pair


class CompactLBFGS(torch.optim.Optimizer):
    """One L-BFGS iteration per ``step(closure)`` for a single tensor parameter (the image)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        history_size: int = 100,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        cuda_graph: bool = False,
    ) -> None:
        defaults = dict(lr=lr, history_size=history_size, tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1 or len(self.param_groups[0]["params"]) != 1:
            raise ValueError("CompactLBFGS optimises exactly one tensor")
        self.cuda_graph = cuda_graph and self._param.is_cuda
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_loss: Tensor | None = None
        self.replays = 0  # steps run by replaying the graph (their closure ran only at capture)
        self._graph_warm = False

    @property
    def _param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _state(self) -> dict[str, Any]:
        """The optimiser's buffers, created on first use (and re-typed after ``load_state_dict``)."""
        p = self._param
        state = self.state[p]
        m, n = self.defaults["history_size"], p.numel()
        f64 = dict(device=p.device, dtype=torch.float64)
        if not state:
            state.update(
                # Slots 0..m-1 hold (s, y) pairs, filled in index order; slot m is scratch for rejected pairs.
                pairs=torch.zeros(m + 1, 2, n, device=p.device, dtype=p.dtype),
                sy=torch.zeros(m + 1, m + 1, **f64),  # s_i . y_j
                yy=torch.zeros(m + 1, m + 1, **f64),  # y_i . y_j
                # Write order: -1 for a slot never written (it holds no pair), inf for the scratch slot.
                # Only kept pairs reach slots 0..m-1, so a slot holds a pair exactly when its age >= 0.
                age=torch.full((m + 1,), -1.0, **f64),
                last_step=torch.zeros(n, device=p.device, dtype=p.dtype),  # s of the next pair
                clock=torch.zeros((), **f64),  # pairs offered, on the device (graph-safe ages)
                prev_grad=torch.zeros(n, device=p.device, dtype=p.dtype),
                n_iter=0,  # host-side: steps taken, so pairs offered; never read from the device
            )
            state["age"][m] = torch.inf
        # Optimizer.load_state_dict casts every tensor to the parameter's dtype; restore ours.
        for key in ("sy", "yy", "age", "clock"):
            if state[key].dtype != torch.float64:
                state[key] = state[key].to(torch.float64)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Evaluate ``closure`` (loss and gradient at the current point), then move the parameter.

        With ``cuda_graph``, once the memory is full (the step's work no longer changes shape),
        one step runs on a side stream, the next is captured as a CUDA graph, and every later
        step replays it: one launch instead of ~530. ``closure`` then runs only at capture, so
        everything it does per step must happen on the device.
        """
        st = self._state()
        if self._graph is not None:
            self._graph.replay()
            self.replays += 1
            st["n_iter"] += 1
            return self._graph_loss  # type: ignore[return-value]
        if self.cuda_graph and st["n_iter"] > self.defaults["history_size"]:
            return self._capture(closure)
        return self._eager_step(closure)

    def _capture(self, closure: Callable[[], Tensor]) -> Tensor:
        """First call: a normal step on a side stream (warms cuBLAS/cuDNN for it); second: capture, then replay."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if not self._graph_warm:
            with torch.cuda.stream(side):
                loss = self._eager_step(closure)
            torch.cuda.current_stream().wait_stream(side)
            self._graph_warm = True
            return loss
        n_iter = self._state()["n_iter"]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._graph_loss = self._eager_step(closure)
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: stay eager
            warnings.warn(
                f"CUDA graph capture failed, running eagerly (trainer.cuda_graph=false hides this): {exc}".splitlines()[0], stacklevel=2
            )
            self.cuda_graph = False
            self._state()["n_iter"] = n_iter
            return self._eager_step(closure)
        self._state()["n_iter"] = n_iter  # capture ran the host code but no kernels
        self._graph = graph
        graph.replay()
        self.replays += 1
        self._state()["n_iter"] += 1
        return self._graph_loss

    def _eager_step(self, closure: Callable[[], Tensor]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        p = self._param
        group = self.param_groups[0]
        st = self._state()
        grad = p.grad.reshape(-1).to(p.dtype)
        n_iter = int(st["n_iter"])
        # Pairs fill slots 0, 1, 2, ... so after n_iter offers only the first min(n_iter, m) can hold one.
        used = min(n_iter, group["history_size"])
        if n_iter > 0:
            self._remember_pair(st, grad, used)
            direction = self._direction(st, grad, used)
            size = torch.full((), group["lr"], dtype=torch.float64, device=p.device)
        else:  # torch's first step: steepest descent scaled by 1/|g|_1
            direction = grad.neg()
            size = torch.clamp(1.0 / grad.abs().sum().double(), max=1.0) * group["lr"]
        # A non-descent direction or a vanishing gradient leave the point where it is (torch returns early).
        descent = grad.dot(direction).double() <= -group["tolerance_change"]
        moving = grad.abs().max().double() > group["tolerance_grad"]
        size = torch.where(descent & moving, size, torch.zeros_like(size))
        torch.mul(direction, size.to(p.dtype), out=st["last_step"])
        p.view(-1).add_(st["last_step"])
        st["prev_grad"].copy_(grad)
        st["n_iter"] = n_iter + 1
        return loss

    @staticmethod
    def _remember_pair(st: dict[str, Any], grad: Tensor, used: int) -> None:
        """Store s = last step, y = change of gradient, if s'y > 1e-10, over the oldest pair.

        The slot is chosen on the device: the first unused one, else the oldest, when the pair
        is kept; the scratch slot (never valid) when it is not. So every write is unconditional.
        """
        pairs, age = st["pairs"], st["age"]
        m = age.numel() - 1
        s = st["last_step"]
        y = grad - st["prev_grad"]
        keep = s.dot(y).double() > _CURVATURE_EPS
        slot = torch.where(keep, torch.argmin(age), m).view(1)
        pairs.index_copy_(0, slot, torch.stack((s, y))[None])
        # One pass over the used slots: s_i.y, y_i.y, s_i.s, y_i.s (rows interleave s_i, y_i).
        dots = torch.zeros(m + 1, 2, 2, dtype=torch.float64, device=grad.device)
        dots[:used] = (pairs[:used].reshape(2 * used, -1) @ torch.stack((y, s), dim=1)).view(used, 2, 2).double()
        sy, yy = st["sy"], st["yy"]
        sy.index_copy_(1, slot, dots[:, 0, 0, None])  # s_i . y_new
        sy.index_copy_(0, slot, dots[None, :, 1, 1])  # s_new . y_j = y_j . s_new
        yy.index_copy_(1, slot, dots[:, 1, 0, None])
        yy.index_copy_(0, slot, dots[None, :, 1, 0])
        st["clock"].add_(1)
        age.index_copy_(0, slot, torch.where(keep, st["clock"], torch.inf).view(1))

    @staticmethod
    def _direction(st: dict[str, Any], grad: Tensor, used: int) -> Tensor:
        """-H g with H = gamma I + [S gamma Y] M [S' ; gamma Y'] (Byrd, Nocedal, Schnabel 1994, eq. 3.1).

        In time order, with R = triu(S'Y), D = diag(S'Y), u = S'g, v = gamma Y'g:
        w = R^-1 u, p = R^-T ((D + gamma Y'Y) w - v), and H g = gamma g + S p - gamma Y w.
        Slots not written yet get an identity row in R and zeros elsewhere.
        """
        k = used
        pairs = st["pairs"][:k].reshape(2 * k, -1)
        age = st["age"][:k]
        order = torch.argsort(age)  # oldest first
        v = (age[order] >= 0).double()  # 1 where the slot holds a pair
        vv = v[:, None] * v[None, :]
        sy = st["sy"][:k, :k][order][:, order] * vv
        yy = st["yy"][:k, :k][order][:, order] * vv
        r = torch.triu(sy) + torch.diag(1.0 - v)
        d = torch.diagonal(sy)
        # gamma = s'y / y'y of the newest kept pair (the last valid one in time order); 1 if none.
        newest = torch.argmax(torch.where(v > 0, torch.arange(k, device=v.device, dtype=v.dtype), -1.0))
        # index_select, not d[newest]: indexing with a tensor would read it back to the host.
        d_new = d.index_select(0, newest.view(1))[0]
        yy_new = torch.diagonal(yy).index_select(0, newest.view(1))[0]
        gamma = torch.where(v.sum() > 0, d_new / yy_new.clamp_min(1e-300), 1.0)
        proj = (pairs @ grad).double().view(k, 2)  # s_i.g, y_i.g in slot order
        u = proj[:, 0][order] * v
        yg = proj[:, 1][order] * v
        w = torch.linalg.solve_triangular(r, u[:, None], upper=True)[:, 0]
        z = (torch.diag(d) + gamma * yy) @ w - gamma * yg
        p = torch.linalg.solve_triangular(r.T, z[:, None], upper=False)[:, 0]
        coef = torch.empty(k, 2, dtype=p.dtype, device=p.device)
        coef[order, 0] = p
        coef[order, 1] = -gamma * w
        hg = torch.addmv(grad * gamma.to(grad.dtype), pairs.T, coef.view(-1).to(pairs.dtype))
        return hg.neg_()
