"""CUDA-only paths: CUDA-graph replay, channels-last, bf16. Skipped without a GPU (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nst_exp
from nst_exp.optim.lbfgs import CompactLBFGS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return ((1 - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()


def test_graph_replay_takes_the_eager_steps():
    x0 = torch.randn(64, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 0.5
    paths = []
    for graph in (False, True):
        x = x0.clone().requires_grad_(True)
        opt = CompactLBFGS([x], lr=0.5, history_size=5, cuda_graph=graph)

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            x.grad = None
            loss = rosenbrock(x)
            loss.backward()
            return loss

        paths.append(torch.stack([(opt.step(closure), x.detach().clone())[1] for _ in range(30)]))
        if graph:
            assert opt.replays == 30 - 7  # 6 eager steps fill the memory, 1 warms the side stream
    torch.testing.assert_close(paths[1], paths[0], rtol=1e-5, atol=1e-6)


def test_host_copy_holds_the_value_when_it_was_queued():
    from nst_exp.run.module import HostCopy

    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    copy = HostCopy(x)
    x.mul_(2)  # queued after the copy: must not show in it
    assert copy.get().is_pinned() and torch.equal(copy.get(), torch.arange(1 << 20, dtype=torch.float32))


def run(tmp_path, name, photo, painting, *overrides):
    result = nst_exp.stylize(
        photo,
        painting,
        output_dir=tmp_path / name,
        return_result=True,
        overrides=[
            "image.size=96",
            "trainer.max_steps=40",
            "optimizer.history_size=8",
            "logging.flush_every=5",
            "logging.progress_bar=false",
            "trainer.accelerator=gpu",
            *overrides,
        ],
    )
    assert result.status == "completed", result.error
    return result


def test_graph_run_matches_eager_run(tmp_path, photo, painting):
    eager = run(tmp_path, "eager", photo, painting, "trainer.cuda_graph=false")
    graph = run(tmp_path, "graph", photo, painting, "trainer.cuda_graph=true")
    diff = np.abs(np.asarray(eager.image, dtype=float) - np.asarray(graph.image, dtype=float)).mean()
    assert diff < 1.0
    # The per-step curve is written from the device-side history, replayed steps included.
    assert graph.metrics["result/loss_total"] == pytest.approx(eager.metrics["result/loss_total"], rel=1e-3)
    assert graph.metrics["result/steps"] == 40


def test_graph_replay_sees_redrawn_swd_directions(tmp_path, photo, painting):
    """loss.swd_redraw_every writes the new directions and targets in place: a replayed graph (from step
    history_size + 2 on) uses them as the eager run does, redraws after the capture included."""
    swd = ["loss.style_loss=swd", "loss.swd_redraw_every=4", "trainer.precision=32-true"]
    eager = run(tmp_path, "eager", photo, painting, "trainer.cuda_graph=false", *swd)
    graph = run(tmp_path, "graph", photo, painting, "trainer.cuda_graph=true", *swd)
    diff = np.abs(np.asarray(eager.image, dtype=float) - np.asarray(graph.image, dtype=float)).mean()
    assert diff < 1.0
    assert graph.metrics["result/loss_total"] == pytest.approx(eager.metrics["result/loss_total"], rel=1e-3)


def test_bf16_channels_last_multiscale_run(tmp_path, photo, painting):
    plain = run(tmp_path, "fp32", photo, painting)
    fast = run(
        tmp_path, "bf16", photo, painting, "trainer.precision=bf16-mixed", "image.multiscale_sizes=[48]", "image.multiscale_steps=[20]"
    )
    assert fast.metrics["result/eval_style"] < 1.5 * plain.metrics["result/eval_style"]
