"""The quality benchmark (``bench --quality``) and its style judge, the sliced Wasserstein distance."""

from __future__ import annotations

import json

import torch
from conftest import run_cli
from PIL import Image

from nst_exp.evaluate import JUDGE_LAYERS, Evaluator
from nst_exp.images import load_tensor


def test_swd_judge_is_zero_on_the_style_repeats_and_ranks_a_stylised_image_between():
    ev = Evaluator("cpu")
    style = load_tensor("builtin:starry_night.jpg", 96)
    content = load_tensor("builtin:chelsea.png", 96)
    assert ev.style_swd(style, [style]) == 0.0
    far = ev.style_swd(content, [style])
    assert far > 0.1 and ev.style_swd(content, [style]) == far  # fixed directions: the same number every time
    halfway = (0.5 * content + 0.5 * style[..., : content.shape[-2], : content.shape[-1]]).clamp(0, 1)
    assert 0.0 < ev.style_swd(halfway, [style]) < far
    hubble = load_tensor("builtin:hubble_deep_field.jpg", 96)
    blend = ev.style_swd(content, [style, hubble], [0.5, 0.5])
    assert blend != far and blend > 0
    assert JUDGE_LAYERS == ("relu1_1", "relu2_1", "relu3_1", "relu4_1")


def test_quality_bench_judges_every_row_against_the_stock_loop_and_draws_the_sheet(tmp_path):
    proc = run_cli(
        [
            "bench",
            "--quality",
            "--size",
            "48",
            "--stock-steps",
            "3",
            "--presets",
            "default",
            "--overrides",
            "trainer.max_steps=2",
            "--pairs",
            "builtin:chelsea.png,builtin:starry_night.jpg",
            "--json",
            str(tmp_path / "q.json"),
            "--sheet",
            str(tmp_path / "sheet.png"),
        ],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "q.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["stock", "default", "pastiche"]
    assert rows["stock"]["ratios"] == {"style": 1.0, "content": 1.0, "time": 1.0, "cpu": 1.0}
    assert rows["default"]["steps"] == 2 and rows["stock"]["steps"] == 3 and rows["pastiche"]["steps"] >= 1
    for r in rows.values():
        assert r["style"] > 0 and r["content"] >= 0 and r["seconds"] > 0
    assert "| chelsea x starry_night | default | 2 |" in proc.stdout
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (5 * 256, 256 + 30)  # content, style, stock, default, pastiche
    assert torch.tensor(list(sheet.convert("L").getdata())).float().std() > 10  # images, not a blank page
