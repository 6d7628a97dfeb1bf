"""TensorBoard's HPARAMS records: a session per run, one experiment per sweep.

Each run writes its hyperparameters as a session (``session_start_info``, no metric values:
placeholders would draw NaN points at step 0 in the SCALARS charts) and, when it completes, its
final metrics as plain ``result/*`` scalars and a ``session_end_info``. No run writes an experiment:
given none, TensorBoard builds one from every session under the logdir and lists the
hyperparameters that differ between them first, which is what a sweep varied. When a sweep ends,
its ``_summary`` run receives the sweep's experiment: the keys that differ, and the final metrics as
the table's metric columns (the objective and the evaluator's distances first) rather than every curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from nst_exp.run.metrics import HPARAM_METRICS


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)])


def _file_writer(writer: Any) -> Any:
    return writer._get_file_writer() if hasattr(writer, "_get_file_writer") else writer.file_writer


def write_session_start(writer: Any, hparams: Mapping[str, Any]) -> None:
    """The run's hyperparameters (a flat dict of str, number or bool) as an HPARAMS session."""
    info = plugin_data_pb2.SessionStartInfo()
    for key, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = float(value)
        else:
            info.hparams[key].string_value = str(value)
    _file_writer(writer).add_summary(_summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info)))


def write_session_end(writer: Any, completed: bool) -> None:
    status = api_pb2.STATUS_SUCCESS if completed else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status)
    _file_writer(writer).add_summary(_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)))


def _hparam_info(name: str, values: Sequence[Any]) -> api_pb2.HParamInfo:
    distinct = {repr(v) for v in values}
    if all(isinstance(v, bool) for v in values):
        kind = api_pb2.DATA_TYPE_BOOL
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        kind = api_pb2.DATA_TYPE_FLOAT64
    else:
        kind = api_pb2.DATA_TYPE_STRING
    return api_pb2.HParamInfo(name=name, type=kind, differs=len(distinct) > 1)


def experiment(sessions: Sequence[Mapping[str, Any]]) -> api_pb2.Experiment:
    """The experiment of a set of runs: the hyperparameters that differ between them (all of them when
    none does), and the final metrics in ``HPARAM_METRICS`` order (the objective first).

    TensorBoard's HPARAMS tab ticks the first five hyperparameter columns and the first five metric
    columns it is given, whatever they are: constant keys (``experiment``, ``image.color``...) are left
    out so that only what the sweep varied is ticked; every run's config.yaml still holds them all.
    """
    keys = list(dict.fromkeys(k for s in sessions for k in s))
    infos = [_hparam_info(k, [s[k] for s in sessions if k in s]) for k in keys]
    infos = sorted((i for i in infos if i.differs), key=lambda i: i.name) or sorted(infos, key=lambda i: i.name)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS]
    return api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)


def write_experiment(log_dir: Path, sessions: Sequence[Mapping[str, Any]]) -> None:
    """Write the sweep's experiment into the run ``log_dir`` (the sweep's ``_summary``)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        data = plugin_data_pb2.HParamsPluginData(experiment=experiment(sessions))
        _file_writer(writer).add_summary(_summary(metadata.EXPERIMENT_TAG, data))
    finally:
        writer.close()
