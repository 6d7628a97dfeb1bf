"""What a run reports: the final metrics every run logs (the same keys, so TensorBoard's HPARAMS
table is complete in any sweep), the sweep objective, and the divergence message."""

from __future__ import annotations

from typing import Any

# Every run logs exactly these HPARAMS metrics, so TensorBoard's table is complete in any sweep. The
# order is the sweep table's column order (TensorBoard shows its first five): what compares runs
# first (the objective, the evaluator's distances), the loss values (not comparable across weights) last.
# Their prefix sorts after "loss": TensorBoard opens its tag groups in name order, loss curves first.
RESULT_PREFIX = "result/"
HPARAM_METRICS = (
    "result/objective",
    "result/eval_style",
    "result/eval_content",
    "result/wall_time_s",
    "result/steps",
    "result/loss_total",
    "result/loss_content",
    "result/loss_style",
)
LEGACY_PREFIX = "hp/"  # the same metrics in result.json files written before the rename


def current_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with names of older result.json files (``hp/steps``) as they are now (``result/steps``)."""
    return {RESULT_PREFIX + k[len(LEGACY_PREFIX) :] if k.startswith(LEGACY_PREFIX) else k: v for k, v in metrics.items()}


def objective(cfg: Any, metrics: dict[str, float]) -> float:
    """Style distance, penalised for content distance above the budget (see conf/hparams_search)."""
    over = max(0.0, metrics["result/eval_content"] - cfg.objective.content_budget)
    return metrics["result/eval_style"] + cfg.objective.penalty * over


def final_metrics(latest: dict[str, float], wall: float, steps: int) -> dict[str, float]:
    nan = float("nan")
    return {
        "result/loss_total": latest.get("loss/total", nan),
        "result/loss_content": latest.get("loss/content", nan),
        "result/loss_style": latest.get("loss/style", nan),
        "result/wall_time_s": wall,
        "result/steps": float(steps),
    }


def divergence_message(step: int | None) -> str | None:
    if step is None:
        return None
    return (
        f"the loss became NaN/inf at step {step}; stopped and kept the last good image. "
        "fix: lower optimizer.lr, loss.style_weight or use optimizer.impl=torch optimizer.line_search=strong_wolfe"
    )
