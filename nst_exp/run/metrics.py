"""What a run reports: the final metrics every run logs (the same keys, so TensorBoard's HPARAMS
table is complete in any sweep), the sweep objective, and the divergence message."""

from __future__ import annotations

from typing import Any

# Every run logs exactly these HPARAMS metrics, so TensorBoard's table is complete in any sweep.
HPARAM_METRICS = (
    "hp/loss_total",
    "hp/loss_content",
    "hp/loss_style",
    "hp/eval_content",
    "hp/eval_style",
    "hp/objective",
    "hp/wall_time_s",
    "hp/steps",
)


def objective(cfg: Any, metrics: dict[str, float]) -> float:
    """Style distance, penalised for content distance above the budget (see conf/hparams_search)."""
    over = max(0.0, metrics["hp/eval_content"] - cfg.objective.content_budget)
    return metrics["hp/eval_style"] + cfg.objective.penalty * over


def final_metrics(latest: dict[str, float], wall: float, steps: int) -> dict[str, float]:
    nan = float("nan")
    return {
        "hp/loss_total": latest.get("loss/total", nan),
        "hp/loss_content": latest.get("loss/content", nan),
        "hp/loss_style": latest.get("loss/style", nan),
        "hp/wall_time_s": wall,
        "hp/steps": float(steps),
    }


def divergence_message(step: int | None) -> str | None:
    if step is None:
        return None
    return (
        f"the loss became NaN/inf at step {step}; stopped and kept the last good image. "
        "fix: lower optimizer.lr, loss.style_weight or use optimizer.impl=torch optimizer.line_search=strong_wolfe"
    )
