"""``logging.loggers``: the ecosystem's loggers beside (or instead of) TensorBoard, all inside the run folder.

``tensorboard`` (the default) is the run's own event file (``run/logger.py``); ``csv`` and ``mlflow`` are
Lightning's ``CSVLogger`` and ``MLFlowLogger``. Each gets the same things: the hyperparameters (the
HPARAMS keys: config, provenance, resolved autos), every step's losses, the final ``result/*`` metrics and
the images (csv: the PNGs in the run folder; mlflow: final.png and the snapshots as artifacts).

- csv: ``<run>/csv/metrics.csv`` and ``hparams.yaml``.
- mlflow: a SQLite tracking store ``<run>/mlflow/mlflow.db`` with artifacts in ``<run>/mlflow/artifacts``,
  or ``logging.mlflow_tracking_uri``. A resumed run continues its MLflow run (its id is kept in
  ``<run>/mlflow/run_id``). MLflow is an optional extra: ``pip install 'nst_exp[mlflow]'``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any

from nst_exp.errors import UserError
from nst_exp.files import write_text

CSV_DIR = "csv"
CSV_METRICS = "metrics.csv"
MLFLOW_DIR = "mlflow"
MLFLOW_RUN_ID = "run_id"
# How a run ended -> the MLflow run status.
MLFLOW_STATUS = {"completed": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}


def check_available(names: Any) -> None:
    """Before any work: an optional logger that is not installed is a one-line error."""
    if "mlflow" in list(names) and importlib.util.find_spec("mlflow") is None:
        raise UserError(
            "logging.loggers has mlflow, which is not installed; fix: pip install 'nst_exp[mlflow]' (or drop mlflow from logging.loggers)"
        )


def make_loggers(cfg: Any, run_dir: Path, experiment: str | None) -> list[Any]:
    """The Lightning loggers ``logging.loggers`` asks for besides TensorBoard, writing into ``run_dir``."""
    names = list(cfg.logging.loggers)
    check_available(names)
    made: list[Any] = []
    if "csv" in names:
        made.append(_csv_logger(run_dir))
    if "mlflow" in names:
        made.append(_mlflow_logger(cfg, run_dir, experiment))
    return made


def _csv_logger(run_dir: Path) -> Any:
    """Lightning's CSVLogger in ``<run>/csv``; the rows a resumed run keeps (``trim_csv``) are carried over
    (its writer would otherwise start the file anew)."""
    from pytorch_lightning.loggers import CSVLogger

    kept = _read_rows(run_dir / CSV_DIR / CSV_METRICS)
    logger = CSVLogger(str(run_dir), name=CSV_DIR, version="")
    for step, row in kept:
        logger.experiment.log_metrics(row, step)
    if kept:
        logger.experiment.save()
    return logger


def _mlflow_logger(cfg: Any, run_dir: Path, experiment: str | None) -> Any:
    from pytorch_lightning.loggers import MLFlowLogger

    folder = run_dir / MLFLOW_DIR
    folder.mkdir(parents=True, exist_ok=True)
    uri = cfg.logging.mlflow_tracking_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    artifacts = None if cfg.logging.mlflow_tracking_uri else (folder / "artifacts").resolve().as_uri()
    id_file = folder / MLFLOW_RUN_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    logger = MLFlowLogger(
        experiment_name=cfg.logging.mlflow_experiment or experiment or "nst_exp",
        tracking_uri=uri,
        run_name=run_dir.name,
        run_id=run_id,
        artifact_location=artifacts,
    )
    id_file.write_text(logger.run_id)
    return logger


def log_hyperparams(loggers: list[Any], hparams: dict[str, Any]) -> None:
    """The same flat hyperparameters as the HPARAMS session. MLflow refuses to change a logged value, so a
    resumed MLflow run gets only the keys it lacks (its earlier values stand)."""
    for logger in loggers:
        params = dict(hparams)
        if _is_mlflow(logger):
            have = logger.experiment.get_run(logger.run_id).data.params
            params = {k: v for k, v in params.items() if k not in have}
        if params:
            logger.log_hyperparams(params)
        logger.save()


def log_artifacts(loggers: list[Any], paths: list[Path]) -> None:
    """Images as artifacts: files and folders (snapshots/) into each MLflow run; csv keeps them in the run folder."""
    for logger in loggers:
        if not _is_mlflow(logger):
            continue
        for path in paths:
            if path.is_file():
                logger.experiment.log_artifact(logger.run_id, str(path))
            elif path.is_dir() and any(path.iterdir()):
                logger.experiment.log_artifacts(logger.run_id, str(path), artifact_path=path.name)


def finalize(loggers: list[Any], status: str) -> None:
    """End each logger; an MLflow run is FINISHED, FAILED or KILLED (interrupted: a resumed run goes on)."""
    for logger in loggers:
        logger.save()
        logger.finalize(MLFLOW_STATUS.get(status, "KILLED") if _is_mlflow(logger) else "success")


def _is_mlflow(logger: Any) -> bool:
    return type(logger).__name__ == "MLFlowLogger"


def _read_rows(path: Path) -> list[tuple[int, dict[str, float]]]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return []
    out = []
    for row in rows:
        step = int(float(row.pop("step")))
        out.append((step, {k: float(v) for k, v in row.items() if v not in ("", None)}))
    return out


def trim_csv(run_dir: Path, step: int) -> None:
    """Keep the CSV rows before ``step`` (a resumed run writes the rest again); 0: the folder starts over."""
    path = run_dir / CSV_DIR / CSV_METRICS
    if not path.is_file():
        return
    if step <= 0:
        for stale in (run_dir / CSV_DIR).iterdir():
            if stale.is_file():
                stale.unlink()
        return
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames or [], [r for r in reader if int(float(r["step"])) < step]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue(), "CSV log")  # atomic: a full disk keeps the old file whole
