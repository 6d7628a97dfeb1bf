"""The code base's own checks, run as tests: ruff's rules, the import layers, and the docs site.

Each tool comes with the ``dev`` extra; where one is missing the test says so and skips.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool(module: str, script: str) -> list[str]:
    """The command for a dev tool installed beside this Python (its script, or ``python -m``)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    beside = Path(sys.executable).parent / script
    return [str(beside)] if beside.exists() else [shutil.which(script) or script]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    proc = _run([*_tool("ruff", "ruff"), "check", "--no-cache", "."])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_is_formatted_by_ruff():
    proc = _run([*_tool("ruff", "ruff"), "format", "--check", "--no-cache", "."])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_imports_keep_the_layers_and_have_no_circles():
    proc = _run([*_tool("importlinter", "lint-imports"), "--no-cache"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_docs_site_builds_strictly(tmp_path):
    proc = _run([*_tool("mkdocs", "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
