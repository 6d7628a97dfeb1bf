"""Config composition for every preset, the typed schema, and the autos resolved for the device (bad values: tests/test_bad_input.py)."""

from __future__ import annotations

import hashlib
import re

import pytest
from PIL import Image

from nst_exp.api import compose_config
from nst_exp.cli.checks import check_overrides_compose, presets
from nst_exp.config import CONF_DIR, validate
from nst_exp.images import resolve_path

GROUPS = ["content", "style", "model", "loss", "optimizer", "trainer", "logging"]


def notice_hashes() -> dict[str, str]:
    """file name -> sha256, as ``nst_exp/assets/NOTICE.md`` records the bundled images."""
    from nst_exp.images import ASSETS_DIR

    text = (ASSETS_DIR / "NOTICE.md").read_text()
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)", text, re.M)}


@pytest.mark.parametrize("group", GROUPS)
def test_every_preset_composes_and_validates(group):
    names = presets(group)
    assert names, f"no presets in conf/{group}"
    for name in names:
        cfg = compose_config([f"{group}={name}"])
        validate(cfg)
        if group in ("content", "style"):  # the very file the notice describes, and an image
            path = resolve_path(cfg[group].path, group)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == notice_hashes()[path.name], path
            with Image.open(path) as img:
                img.verify()


def test_experiments_compose():
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        cfg = compose_config([f"experiment={path.stem}"])
        validate(cfg)


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "image.size=32,48", "loss.style_weight=range(1,3)", "optimizer=glob(*)"],
        ["-m", "loss.style_weight=tag(log, interval(1.0, 10.0))", "hydra.sweep.dir=x"],
        ["loss.style_layers=[relu1_1,relu2_1]", "experiment=fast", "hydra/launcher=joblib"],
        ["--cfg", "job", "no.such=key"],  # Hydra's own flags: Hydra decides (tests/test_cli.py runs them)
    ],
)
def test_good_overrides_and_sweeps_compose(argv):
    check_overrides_compose(argv)


def test_auto_precision_is_bf16_only_on_a_cpu_whose_bf16_is_fast(tmp_path):
    import torch

    from nst_exp import settings as precision

    cpus = {
        "amx": ("GenuineIntel", "fpu sse avx512f avx512_bf16 amx_tile amx_bf16", True),
        "amd_avx512_bf16": ("AuthenticAMD", "fpu sse avx512f avx512_bf16", True),
        "intel_avx512_bf16_no_amx": ("GenuineIntel", "fpu sse avx512f avx512_bf16 avx512_fp16", False),
        "emulated": ("GenuineIntel", "fpu sse avx2 avx512f", False),
    }
    for name, (vendor, flags, fast) in cpus.items():
        info = tmp_path / name
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: X\nflags\t\t: {flags}\n")
        assert precision.cpu_has_fast_bf16(info) is fast, name
    assert not precision.cpu_has_fast_bf16(tmp_path / "missing")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve_precision("auto", cuda) == "32-true"
    assert precision.resolve_precision("32-true", cpu) == "32-true" and precision.resolve_precision("bf16-mixed", cuda) == "bf16-mixed"
    expected = "bf16-mixed" if precision.cpu_has_fast_bf16() else "32-true"
    assert precision.resolve_precision("auto", cpu) == expected


def test_auto_lbfgs_impl_is_compact_only_on_cuda_without_line_search():
    import torch

    from nst_exp.config import LBFGSImpl, OptimizerConfig
    from nst_exp.settings import resolve_impl

    assert resolve_impl(OptimizerConfig(), torch.device("cuda")) == LBFGSImpl.compact
    assert resolve_impl(OptimizerConfig(), torch.device("cpu")) == LBFGSImpl.torch
    assert resolve_impl(OptimizerConfig(line_search="strong_wolfe"), torch.device("cuda")) == LBFGSImpl.torch
    assert resolve_impl(OptimizerConfig(impl=LBFGSImpl.compact), torch.device("cpu")) == LBFGSImpl.compact
