"""The installed package is the whole package: a wheel built from this checkout holds every
subpackage, the config groups and the bundled images (an editable install would hide a missing one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(dest: Path) -> Path:
    """The checkout's tracked files only: no stale ``build/`` of an earlier build, nothing written here."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_holds_every_package_the_configs_and_the_images(tmp_path):
    source = _tracked_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("nst_exp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT) for p in (ROOT / "nst_exp").rglob("__init__.py")]
    packages += [p.parent.relative_to(ROOT) for p in (ROOT / "hydra_plugins").rglob("__init__.py")]
    missing = [str(p) for p in packages if f"{p.as_posix()}/__init__.py" not in names]
    assert not missing, f"not in the wheel: {missing}; add them to [tool.setuptools] packages in pyproject.toml"
    for config in (ROOT / "conf").rglob("*.yaml"):
        assert f"nst_exp/conf/{config.relative_to(ROOT / 'conf').as_posix()}" in names
    for image in (ROOT / "nst_exp" / "assets").iterdir():
        if image.suffix in (".png", ".jpg", ".md"):
            assert f"nst_exp/assets/{image.name}" in names
