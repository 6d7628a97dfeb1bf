"""logging.loggers: TensorBoard (the default), Lightning's CSVLogger and MLFlowLogger, several at once,
each with the same hyperparameters, per-step losses, final metrics and images, all inside the run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import nst_exp
from nst_exp.api import compose_config
from nst_exp.run.metrics import HPARAM_METRICS

STEPS = 4
FAST = [
    "image.size=32",
    f"trainer.max_steps={STEPS}",
    "logging.progress_bar=false",
    "logging.image_every=2",
    "logging.save_snapshots=true",
    "trainer.accelerator=cpu",
]


def session(run_dir: Path) -> dict[str, object]:
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def test_tensorboard_stays_the_default():
    assert list(compose_config().logging.loggers) == ["tensorboard"]


def test_csv_beside_tensorboard_gets_the_same_hparams_steps_and_final_metrics(tmp_path):
    run = tmp_path / "run"
    nst_exp.stylize(overrides=[*FAST, "logging.loggers=[tensorboard,csv]"], output_dir=run)
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["loss/total"]] == list(range(STEPS))  # every step once
    final = [r for r in rows if r["result/loss_total"]]
    metrics = json.loads((run / "result.json").read_text())["metrics"]
    assert len(final) == 1 and int(final[0]["step"]) == STEPS
    assert {m: float(final[0][m]) for m in HPARAM_METRICS} == pytest.approx({m: metrics[m] for m in HPARAM_METRICS})
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams == pytest.approx(session(run))  # the HPARAMS session's keys and values, provenance included
    assert "resolved.trainer.precision" in hparams and hparams["loss.style_weight"] == 20.0
    assert sorted(p.name for p in (run / "snapshots").glob("*.png")) == ["step_000002.png", "step_000004.png"]


def test_csv_alone_writes_no_event_file(tmp_path):
    run = tmp_path / "run"
    nst_exp.stylize(overrides=[*FAST, "logging.loggers=[csv]"], output_dir=run)
    assert not list(run.glob("events.out.tfevents.*")) and (run / "csv" / "metrics.csv").is_file()


def test_mlflow_in_a_real_local_store_inside_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is the optional extra nst_exp[mlflow] (the dev extra installs it)")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    nst_exp.stylize(overrides=[*FAST, "logging.loggers=[tensorboard,csv,mlflow]"], output_dir=run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no mlruns/ or mlflow.db beside it
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    run_id = (run / "mlflow" / "run_id").read_text().strip()
    data = client.get_run(run_id)
    assert data.info.status == "FINISHED" and data.info.run_name == "run"
    sent = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())  # what csv got, the HPARAMS keys
    assert data.data.params == {k: str(v) for k, v in sent.items()} and set(sent) == set(session(run))
    metrics = json.loads((run / "result.json").read_text())["metrics"]
    assert {m: data.data.metrics[m] for m in HPARAM_METRICS} == pytest.approx({m: metrics[m] for m in HPARAM_METRICS})
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == list(range(STEPS))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"final.png", "snapshots"}
    assert {a.path for a in client.list_artifacts(run_id, "snapshots")} == {"snapshots/step_000002.png", "snapshots/step_000004.png"}
    assert Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")).is_relative_to(run)

    # Continued by hand: the same MLflow run goes on, its steps once each.
    nst_exp.stylize(overrides=[*FAST, "logging.loggers=[tensorboard,mlflow]", f"resume={run}", "trainer.max_steps=6"], output_dir=run)
    assert (run / "mlflow" / "run_id").read_text().strip() == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == list(range(6))
    assert client.get_run(run_id).data.metrics["result/steps"] == 6
