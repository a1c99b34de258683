"""Experiment trackers: what a run logs to TensorBoard (``RUN/tb``, on by default) and to MLflow (``run.mlflow_uri``).

:class:`~fastlesion.engine.rundir.RunDir` owns one :class:`Tracker` on rank 0 (other ranks have none) and calls it
from its own ``start`` / ``record`` / ``finish``, plus :meth:`Tracker.step` at the loop's loss reads (every
``check_every`` steps, where the progress bar already has the loss on the CPU: no extra CPU-GPU sync). The epoch loop
never sees a tracker. Both packages are imported only when a run logs to them.

TensorBoard (``tensorboard --logdir runs``: one run per run folder, ``<run>/tb``):

* per epoch (step = epoch): ``train/loss``, ``train/lr``, ``val/loss``, ``val/<metric>`` for every validation column
  of ``metrics.csv``, ``speed/images_per_s``, ``time/{epoch,train,val,data}_seconds``;
* per loss read (step = optimizer step): ``step/train_loss`` (mean since the previous read), ``step/lr``;
* at the end: ``summary/<key>`` (the best epoch's metrics, best epoch, median images/s, ...), the plots as images
  ``plots/{curves,roc,confusion}``; the resolved config as text (``config``, at the start);
* HParams: a session per run whose hyperparameters are the flattened config (``run.*`` left out) and whose metrics
  are the run's scalars; no experiment tag is written, so TensorBoard builds the HParams table from every run below
  ``--logdir``.

MLflow: params = the flattened config, metrics = every number of the ``metrics.csv`` row (step = epoch) and
``summary/<key>`` at the end, artifacts = ``config.yaml``, ``metrics.csv``, ``summary.json``, ``best.pt``,
``plots/``. A resumed run continues its MLflow run (found by the ``fastlesion.run_dir`` tag).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

from fastlesion.config import Config, to_dict
from fastlesion.errors import FastlesionError

TB_DIR = "tb"
"""TensorBoard's folder inside the run folder."""
SUMMARY_KEYS = ("val_auc", "val_accuracy", "val_balanced_accuracy", "val_f1", "val_loss", "best_value", "best_epoch",
                "epochs_run", "images_per_s", "epoch_seconds", "train_seconds")
"""The numbers of ``summary.json`` logged at the end as ``summary/<key>``."""
MLFLOW_EXPERIMENT = "fastlesion"
"""MLflow experiment of the runs, unless ``MLFLOW_EXPERIMENT_NAME`` names another."""
MLFLOW_ARTIFACTS = ("config.yaml", "metrics.csv", "summary.json", "best.pt")
RUN_DIR_TAG = "fastlesion.run_dir"
MLFLOW_MISSING = ("run.mlflow_uri is set but the mlflow package is not installed: pip install 'fastlesion[mlflow]' "
                  "(or pip install mlflow), or leave run.mlflow_uri unset")
TENSORBOARD_MISSING = ("run.tensorboard is on but the tensorboard package is not installed: pip install tensorboard, "
                       "or --run.tensorboard false")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(cfg: Config) -> None:
    """Refuse up front (before the run folder is made) a tracker whose package is missing: one line saying how to
    install it."""
    if cfg.run.tensorboard and not _installed("tensorboard"):
        raise FastlesionError(TENSORBOARD_MISSING)
    if cfg.run.mlflow_uri and not _installed("mlflow"):
        raise FastlesionError(MLFLOW_MISSING)


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 0.001, ...}``: every key of the resolved config."""
    return {f"{section}.{k}": v for section, keys in to_dict(cfg).items() for k, v in keys.items()}


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a ``metrics.csv`` column: ``train/loss``, ``val/auc``, ``speed/images_per_s``, ..."""
    if column.endswith("_seconds"):
        return "time/" + column
    if column in ("train_loss", "lr"):
        return "train/" + column.removeprefix("train_")
    if column.startswith("val_"):
        return "val/" + column[4:]
    return "speed/" + column


def _numbers(row: dict[str, Any], skip: tuple[str, ...] = ("epoch", "steps")) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    return {f"summary/{k}": float(summary[k]) for k in SUMMARY_KEYS if isinstance(summary.get(k), (int, float))}


# --------------------------------------------------------------------------------------------------- the protocol
class Tracker:
    """What a run tells a tracker; this base does nothing (the tracker of a run that logs nowhere)."""

    wants_steps = False  # whether :meth:`step` is worth calling (the loop passes no callback otherwise)

    def start(self, s: Any, resumed: bool) -> None:
        """The run starts (or resumes after ``s.epoch``): params, config."""

    def step(self, step: int, loss: float, lr: float) -> None:
        """A loss read of the step loop: the mean loss since the previous read, at optimizer step ``step``."""

    def epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """An epoch's ``metrics.csv`` row, after its files are written."""

    def finish(self, s: Any, summary: dict[str, Any], run_dir: Path) -> None:
        """The run ended normally: summary, plots, artifacts (called after ``summary.json`` and the plots)."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release (idempotent); ``status`` FAILED or KILLED when the run ends with an exception."""


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.wants_steps = any(t.wants_steps for t in trackers)

    def start(self, s: Any, resumed: bool) -> None:
        for t in self.trackers:
            t.start(s, resumed)

    def step(self, step: int, loss: float, lr: float) -> None:
        for t in self.trackers:
            if t.wants_steps:
                t.step(step, loss, lr)

    def epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for t in self.trackers:
            t.epoch(epoch, row)

    def finish(self, s: Any, summary: dict[str, Any], run_dir: Path) -> None:
        for t in self.trackers:
            t.finish(s, summary, run_dir)

    def close(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.close(status)


def plot_files(run_dir: Path) -> list[Path]:
    """The run's own figures that exist (never a file the user put into ``plots/``)."""
    from fastlesion.report import PLOT_FILES

    return [p for p in (run_dir / "plots" / name for name in PLOT_FILES) if p.is_file()]


def make_tracker(cfg: Config, run_dir: Path) -> Tracker:
    """The trackers ``cfg.run`` asks for (the no-op :class:`Tracker` when none)."""
    trackers: list[Tracker] = []
    if cfg.run.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / TB_DIR))
    if cfg.run.mlflow_uri:
        trackers.append(MlflowTracker(cfg.run.mlflow_uri, run_dir))
    return trackers[0] if len(trackers) == 1 else Trackers(trackers) if trackers else Tracker()


# --------------------------------------------------------------------------------------------------- TensorBoard
def hparams_value(v: Any) -> Any:
    """A config value as an HParams value: bool, number or string (None and lists as their text)."""
    if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)):
        return v
    return str(v) if not isinstance(v, (list, tuple)) else str(list(v))


def hparams_summaries(hparams: dict[str, Any], status: str | None = None) -> Any:
    """The HParams plugin's session-start summary of ``hparams`` (or, with ``status``, its session-end summary).

    No experiment summary: TensorBoard then builds the HParams table from the sessions of every run it reads (with
    an experiment summary per run it would show only one run's columns).
    """
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    if status is None:
        info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for k, v in hparams.items():
            v = hparams_value(v)
            info.hparams[k].CopyFrom(struct_pb2.Value(bool_value=v) if isinstance(v, bool) else
                                     struct_pb2.Value(number_value=v) if isinstance(v, (int, float)) else
                                     struct_pb2.Value(string_value=v))
        data, tag = plugin_data_pb2.HParamsPluginData(session_start_info=info), metadata.SESSION_START_INFO_TAG
    else:
        info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(f"STATUS_{status}"),
                                              end_time_secs=time.time())
        data, tag = plugin_data_pb2.HParamsPluginData(session_end_info=info), metadata.SESSION_END_INFO_TAG
    data.version = metadata.PLUGIN_DATA_VERSION
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                  content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


class TensorBoardTracker(Tracker):
    """Event files in ``RUN/tb`` (see the module's docstring for the tags)."""

    wants_steps = True

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.writer, self.last_step = Path(log_dir), None, 0

    def start(self, s: Any, resumed: bool) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what the killed process logged after its last.pt (its step scalars past that step;
        # epoch scalars at step = epoch <= global_step stay)
        purge = s.global_step + 1 if resumed and s.global_step else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge, flush_secs=30)
        self.last_step = s.global_step
        text = yaml.safe_dump(to_dict(s.cfg), sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), s.epoch)
        hp = {k: v for k, v in flat_config(s.cfg).items() if not k.startswith("run.")}
        self.writer._get_file_writer().add_summary(hparams_summaries(hp), s.global_step)
        self.writer.flush()

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/train_loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(scalar_tag(k), v, epoch)
        self.writer.flush()  # an epoch is on disk before Ray Tune's report (which may end the process)

    def finish(self, s: Any, summary: dict[str, Any], run_dir: Path) -> None:
        import numpy as np
        from PIL import Image

        for k, v in summary_metrics(summary).items():
            self.writer.add_scalar(k, v, s.epoch)
        for png in plot_files(run_dir):
            with Image.open(png) as im:
                self.writer.add_image(f"plots/{png.stem}", np.asarray(im.convert("RGB")), s.epoch,
                                      dataformats="HWC")

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is None:
            return
        # TensorBoard's session statuses are UNKNOWN/SUCCESS/FAILURE/RUNNING: an interrupted run (KILLED, to be
        # resumed) writes no end, so it shows as still running until its resume finishes it
        if status != "KILLED":
            tb_status = "SUCCESS" if status == "FINISHED" else "FAILURE"
            self.writer._get_file_writer().add_summary(hparams_summaries({}, tb_status))
        self.writer.close()
        self.writer = None


# --------------------------------------------------------------------------------------------------- MLflow
def mlflow_uri(uri: str) -> str:
    """A tracking URI as MLflow takes it: a bare folder becomes an absolute ``file:`` URI."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for the tracking URI ``uri`` (as :func:`mlflow_uri` gives it); MLflow missing is the one
    line of :data:`MLFLOW_MISSING`."""
    if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked for it; this run asks
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FastlesionError(MLFLOW_MISSING) from None
    return MlflowClient(tracking_uri=uri)


def mlflow_experiment_name() -> str:
    """The MLflow experiment runs go to: ``$MLFLOW_EXPERIMENT_NAME``, else :data:`MLFLOW_EXPERIMENT`."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT


def run_dir_filter(run_dir: Path) -> str:
    """MLflow's search filter for the runs of the run folder ``run_dir`` (its :data:`RUN_DIR_TAG`)."""
    return f"tags.`{RUN_DIR_TAG}` = '{Path(run_dir).resolve()}'"


class MlflowTracker(Tracker):
    """A run in the MLflow tracking store at ``uri`` (experiment :data:`MLFLOW_EXPERIMENT`)."""

    def __init__(self, uri: str, run_dir: Path) -> None:
        self.uri, self.run_dir = mlflow_uri(uri), Path(run_dir)
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, s: Any, resumed: bool) -> None:
        self.client = client = mlflow_client(self.uri)
        name = mlflow_experiment_name()
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run_dir = str(self.run_dir.resolve())
        old = client.search_runs([exp_id], run_dir_filter(self.run_dir), max_results=1,
                                 order_by=["attributes.start_time DESC"]) if resumed else []
        if old:
            self.run_id, logged = old[0].info.run_id, old[0].data.params
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name="/".join(self.run_dir.resolve().parts[-2:]),
                                    tags={RUN_DIR_TAG: run_dir})
            self.run_id, logged = run.info.run_id, {}
        from mlflow.entities import Param

        # a resumed run keeps the params it logged (MLflow refuses to change one; run.*/epochs may differ)
        params = [Param(k, str(v)) for k, v in flat_config(s.cfg).items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i:i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def epoch(self, epoch: int, row: dict[str, Any]) -> None:
        self._metrics(_numbers(row, skip=("epoch",)), epoch)

    def finish(self, s: Any, summary: dict[str, Any], run_dir: Path) -> None:
        self._metrics(summary_metrics(summary), s.epoch)
        for name in MLFLOW_ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for png in plot_files(run_dir):
            self.client.log_artifact(self.run_id, str(png), "plots")

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None
