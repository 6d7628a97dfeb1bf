"""``image.tile=auto``: the measured footprint predicts what autograd keeps, and the plan is the whole
image when it fits the budget, else the cheapest tiles (and kept graphs) that fit; a run under a
small ``image.memory_mib`` tiles by itself and paints the image of the whole pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nst_exp import stylize
from nst_exp.api import compose_config
from nst_exp.config import validate
from nst_exp.errors import UserError
from nst_exp.model.layers import GATYS_CONTENT_LAYERS, GATYS_STYLE_LAYERS
from nst_exp.run import setup
from nst_exp.settings import resolve
from nst_exp.tiling import plan as tile_plan
from nst_exp.tiling.exact import tiled_loss_and_grad
from nst_exp.tiling.plan import Footprint, plan_step, plan_targets

LAYERS = [*GATYS_CONTENT_LAYERS, *GATYS_STYLE_LAYERS]
MIB = 2**20
FP = Footprint(graph=1400.0, backward=512.0, no_grad=1024.0)  # about fp32's, bytes per pixel


def _loss(size: int, overrides: list[str] = ()):
    cfg = compose_config([f"image.size={size}", "trainer.accelerator=cpu", "trainer.precision=32-true", *overrides])
    device = torch.device("cpu")
    settings = resolve(cfg, device)
    encoder, _ = setup.build_network(settings)
    loss, content = setup.build_loss(settings, encoder, setup.Inputs(cfg), setup.Stage(size, 1))
    return cfg, loss, content


def _saved_bytes_of_whole(loss, image: torch.Tensor, bf16: bool) -> int:
    """What autograd keeps for the whole image's graph, each storage once (the loss's buffers not)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        maps, other = tile_plan.saved_storage_bytes(
            lambda: loss(image.clone().requires_grad_(True)), [*loss.buffers(), *loss.encoder.buffers(), image]
        )
    return maps + other


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.memory=lean", "model.padding=zeros", "loss.style_loss=mean_cov"],
        ["loss.style_layers=[relu1_1,relu2_1]", "loss.content_layers=[relu2_2]"],
    ],
)
def test_the_probe_predicts_what_the_whole_images_graph_keeps(overrides, bf16):
    """Two small crops, measured, extrapolated to a 320 px image: within a few percent of what autograd
    keeps for the whole image, and not below it (a shallow content layer: much of it grows with the
    owned pixels only)."""
    _, loss, content = _loss(320, overrides)
    fp = tile_plan.measure(loss, content, bf16)
    actual = _saved_bytes_of_whole(loss, content, bf16)
    predicted = fp.kept(content.shape[-2] * content.shape[-1])
    assert actual <= predicted <= 1.12 * actual, (predicted, actual)
    assert fp.backward == 2 * 64 * (2 if bf16 else 4)


def test_measuring_leaves_no_graph_behind():
    """The probes' graphs are freed with them: a stage's plan must not keep tensors for the rest of the
    run (a pack hook returning the tensor itself leaked ~85 MiB per plan through a reference cycle)."""
    import gc

    _, loss, content = _loss(128)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no proxy's __class__

    for bf16 in (True, False):  # anything made once per precision (caches) is made here
        tile_plan.measure(loss, content, bf16)
    before = live_tensors()
    for bf16 in (True, False, True):
        tile_plan.measure(loss, content, bf16)
    # Not growing, not "unchanged": tensors made before this test (another test's, a cache's) may be
    # freed meanwhile; a leaked graph is dozens of saved tensors per probe.
    after = live_tensors()
    assert after <= before, f"{after - before} tensors outlived three footprint measurements"


def test_the_whole_image_when_it_fits():
    plan = plan_step("auto", None, (1000, 1500), LAYERS, FP, 10_000 * MIB)
    assert plan.tile is None and plan.need_bytes == int(1000 * 1500 * FP.loss_pass)
    assert plan_step(None, None, (4000, 6000), LAYERS, FP, 10 * MIB).tile is None  # null: always whole


@pytest.mark.parametrize("budget_mib", [300, 800, 1500, 2500])
def test_tiles_that_fit_when_it_does_not(budget_mib):
    """1000x1500 needs ~2.7 GiB whole: under smaller budgets the plan tiles on the pooling grid and its
    peak fits (that more budget never costs more: the next test)."""
    plan = plan_step("auto", None, (1000, 1500), LAYERS, FP, budget_mib * MIB)
    assert plan.tile is not None and plan.tile % 16 == 0 and plan.auto
    assert plan.need_bytes <= budget_mib * MIB and 1 <= plan.keep <= plan.crops
    assert "the whole image would not fit" in plan.describe()


def test_more_budget_keeps_more_graphs_and_never_costs_more():
    """A fixed tile: 6 crops of up to 1160x1160 px (~1.8 GB of graph each); each doubling of the budget
    keeps more graphs for pass 2, down to the halo's overlap alone once all are kept."""
    plans = [plan_step(1000, None, (2000, 3000), LAYERS, FP, mib * MIB) for mib in (3000, 6000, 12000, 24000)]
    for mib, plan in zip((3000, 6000, 12000, 24000), plans):
        assert plan.need_bytes <= mib * MIB and plan.crops == 6
    assert [p.keep for p in plans] == sorted(p.keep for p in plans) and plans[0].keep < plans[-1].keep == 6
    assert [p.work for p in plans] == sorted((p.work for p in plans), reverse=True)
    assert 1.0 < plans[-1].work < 1.3 < plans[0].work
    auto = [plan_step("auto", None, (2000, 3000), LAYERS, FP, mib * MIB) for mib in (3000, 6000, 12000, 24000)]
    assert [p.work for p in auto] == sorted((p.work for p in auto), reverse=True)
    assert all(a.work <= p.work for a, p in zip(auto, plans))  # auto may choose another tile, never a costlier one


def test_several_processes_share_an_image_that_fits_one():
    one = plan_step("auto", None, (1000, 1500), LAYERS, FP, 10_000 * MIB, world=1)
    four = plan_step("auto", None, (1000, 1500), LAYERS, FP, 10_000 * MIB, world=4)
    assert one.tile is None and four.tile is not None and four.crops >= 4
    assert "shared by 4 processes" in four.describe()


def test_nothing_fits_is_one_line_with_the_fixes():
    with pytest.raises(UserError, match=r"even tiles of 80 px need ~\d+ MiB .* budget is 10 MiB; fix: .*image.memory_mib"):
        plan_step("auto", None, (1000, 1500), LAYERS, FP, 10 * MIB)


def test_targets_tile_only_when_the_largest_input_does_not_fit():
    assert plan_targets("auto", [(1000, 1500), (800, 800)], LAYERS, 1024, 4000 * MIB) is None
    tile = plan_targets("auto", [(1000, 1500), (3000, 4000)], LAYERS, 1024, 1000 * MIB)
    assert tile is not None and tile % 16 == 0
    assert plan_targets(256, [(1000, 1500)], LAYERS, 1024, None) == 256


@pytest.mark.slow
def test_keeping_every_graph_is_still_exact():
    """Pass 2 from pass 1's graphs alone (keep = every crop) gives the terms and gradient of the whole image."""
    _, loss, content = _loss(160, ["loss.content_layers=[relu2_2]", "loss.style_layers=[relu1_1,relu2_1,relu3_1]"])
    image = (0.9 * content + 0.1 * torch.rand(content.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    whole = loss(image)
    whole["loss/total"].backward()
    expected, image.grad = image.grad.clone(), None
    scale = expected.abs().max()
    for keep in (1, 3, 100):
        terms = tiled_loss_and_grad(loss, image, 32, keep)
        torch.testing.assert_close(terms["loss/total"], whole["loss/total"].detach(), rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(image.grad / scale, expected / scale, rtol=0, atol=1e-5)  # elementwise, as in test_tiling_exact
        image.grad = None


def test_bad_tile_settings_are_one_line():
    with pytest.raises(UserError, match=r"image.tile='big' is not a tile size; fix: image.tile=auto"):
        validate(compose_config(["image.tile=big"]))
    with pytest.raises(UserError, match=r"image.tile_keep must be a positive number"):
        validate(compose_config(["image.tile_keep=0"]))
    with pytest.raises(UserError, match=r"image.memory_mib must be a positive number"):
        validate(compose_config(["image.memory_mib=-5"]))
    validate(compose_config(["image.tile=null"]))
    validate(compose_config(["image.tile=AUTO"]))


@pytest.mark.slow
def test_a_run_under_a_small_budget_tiles_itself_and_paints_the_same_image(tmp_path, capsys):
    settings = dict(
        trainer={"max_steps": 3, "accelerator": "cpu", "precision": "32-true"}, logging={"progress_bar": False, "image_every": 0}
    )
    whole = stylize(output_dir=tmp_path / "whole", return_result=True, image={"size": 384}, **settings)
    small = stylize(output_dir=tmp_path / "small", return_result=True, image={"size": 384, "memory_mib": 150}, **settings)
    assert whole.status == small.status == "completed"
    plans = [json.loads((tmp_path / name / "result.json").read_text())["tile_plans"] for name in ("whole", "small")]
    (whole_plan,), (small_plan,) = plans
    assert whole_plan["tile"] is None and whole_plan["line"].startswith("whole image") and whole_plan["size"] == 384
    assert small_plan["tile"] < 384 and small_plan["auto"] and small_plan["budget_mib"] == 150
    assert small_plan["need_mib"] <= 150 < small_plan["whole_mib"] and 1 <= small_plan["keep"] <= small_plan["crops"]
    assert "of a 150 MiB budget" in small_plan["line"] and small_plan["line"] in capsys.readouterr().out
    a, b = (np.asarray(r.image, dtype=np.int16) for r in (whole, small))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    assert "result/eval_style" in whole.metrics and "result/eval_style" not in small.metrics  # the evaluator runs whole images
