"""Every preset look (conf/experiment), every ready sweep (with -m) and both Optuna searches
(conf/hparams_search) run end to end, at a tiny size so that the whole set takes about a minute."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli

from nst_exp.api import compose_config
from nst_exp.config import CONF_DIR, validate
from nst_exp.run import runner
from nst_exp.run.stages import stages_of
from nst_exp.sweep.summary import collect_jobs

TINY = ["image.size=32", "trainer.max_steps=2", "logging.progress_bar=false", "logging.image_every=0", "trainer.accelerator=cpu"]


def experiments() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))}


def sweep_params(name: str) -> dict[str, str]:
    return ((experiments()[name].get("hydra") or {}).get("sweeper") or {}).get("params") or {}


FIXED = [name for name in experiments() if not sweep_params(name)]
SWEEPS = [name for name in experiments() if sweep_params(name)]


def test_the_two_kinds_are_both_there():
    assert {"plain", "fast", "gatys2016", "hires", "multiscale", "color_luminance"} <= set(FIXED)
    assert {"style_ratio", "layers", "optimizers", "sizes"} <= set(SWEEPS)


def tiny_stages(cfg) -> list[str]:
    """A preset's coarse-to-fine stages shrunk below image.size=48, as many as it has (32 px at least:
    a smaller image has no pixel left for VGG19's deepest pooling)."""
    if cfg.image.get("scale_from"):  # automatic scales: one coarse stage, 32 px
        return ["image.scale_from=32", "image.scale_ratio=1.5", "image.scale_steps=1"]
    n = len(cfg.image.multiscale_sizes)
    if not n:
        return []
    sizes = [32 + 2 * i for i in range(n)]
    return [f"image.multiscale_sizes=[{','.join(map(str, sizes))}]", f"image.multiscale_steps=[{','.join(['1'] * n)}]"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXED)
def test_fixed_experiment_runs(tmp_path, name):
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)  # at its own size first
    cfg = compose_config([f"experiment={name}", *TINY, "image.size=48", *tiny_stages(cfg)])
    result = runner.run(cfg, tmp_path / name)
    assert result.status == "completed", result.error
    stages = len(stages_of(cfg)) - 1
    assert result.metrics["result/steps"] == 2 + stages  # every coarse stage ran its step, then the final stage
    assert max(result.image.size) == 48


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_experiment_runs(tmp_path, name):
    params = sweep_params(name)
    expected = 1
    for values in params.values():
        expected *= len(yaml.safe_load("[" + values + "]")) if not values.startswith("[") else values.count("],") + 1
    size = ["image.size=32"]
    if "image.size" in params:  # `sizes`: each of its own sizes composes and validates; the sweep runs as many tiny ones
        own = [int(v) for v in params["image.size"].split(",")]
        for value in own:
            validate(compose_config([f"experiment={name}", f"image.size={value}"]))
        size = ["image.size=" + ",".join(str(32 + 8 * i) for i in range(len(own)))]  # the command line wins over the preset
    proc = run_cli(["run", "-m", f"experiment={name}", *size, *TINY[1:], "trainer.max_steps=1"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = [p for p in (tmp_path / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    jobs = collect_jobs([sweep])
    assert len(jobs) == expected and {j.status for j in jobs} == {"completed"}
    assert all(j.config["image"]["size"] <= 64 for j in jobs)  # tiny, whatever the preset says
    assert (sweep / "summary.csv").is_file() and (sweep / "contact_sheet.png").is_file()


SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("search", SEARCHES)
def test_optuna_search_composes_for_the_projects_sweeper(search):
    """Each search names the nst_optuna sweeper; its space, sampler and pruner build, its fixed keys fit the schema."""
    pytest.importorskip("optuna")
    from omegaconf import OmegaConf

    from nst_exp.sweep.optuna_sweeper import search_space
    from nst_exp.sweep.study import build

    cfg = compose_config([f"hparams_search={search}"], with_hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.nst_exp_sweepers.NstOptunaSweeper" and sweeper.storage is None
    fixed, space = search_space(OmegaConf.to_container(sweeper.params), [])
    assert space and not fixed
    assert type(build(sweeper.sampler)).__name__ == "TPESampler" and type(build(sweeper.pruner)).__name__ == "MedianPruner"
    for key, distribution in space.items():  # every searched key exists, and its first value composes and validates
        value = distribution.choices[0] if hasattr(distribution, "choices") else distribution.low
        validate(compose_config([f"hparams_search={search}", f"{key}={value}"]))


@pytest.mark.slow
@pytest.mark.parametrize("search", [s for s in SEARCHES if s != "adam_optuna"])  # adam_optuna runs in tests/test_optuna.py
def test_optuna_search_runs(tmp_path, search):
    pytest.importorskip("optuna")
    proc = run_cli(["run", f"hparams_search={search}", "hydra.sweeper.n_trials=2", "image.size=32", *TINY[1:]], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best trial:" in proc.stdout
    (sweep,) = [p for p in (tmp_path / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    jobs = collect_jobs([sweep])
    assert len(jobs) == 2 and all(j.status == "completed" and j.metrics["result/objective"] >= 0 for j in jobs)
