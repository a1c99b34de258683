"""One trial: a ``train(cfg)`` run in its own folder that reports every epoch to Ray Tune with a checkpoint.

ASHA's unit is the epoch: after each one the trial reports its metrics and a checkpoint of its run folder
(``last.pt``, ``config.yaml``, ``metrics.csv``, ...), so ASHA can stop it at a rung, and a trial retried after a
failure or restored with an interrupted experiment continues from its last epoch instead of from scratch.

The metric a search follows depends on the base config's ``train.task`` (:func:`tune_metric`, the one place that
chooses it): ``val_auc`` for classification, ``val_iou`` for segmentation. ASHA ranks trials on its finite form
(:func:`score_key`: ``val_auc_finite``, ``val_iou_finite``): the epoch's value where it is a number and 0.0 where it
is undefined (NaN: a diverged model, or an AUC over a validation fold with a single class), so that such trials are
the first ones stopped instead of breaking the scheduler's comparisons. The metric itself is reported unchanged
next to it.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastlesion.config import Config, config_from_dict, replace
from fastlesion.errors import ConfigError

TUNE_METRICS: dict[str, str] = {"classification": "val_auc", "segmentation": "val_iou"}
"""``train.task`` -> the validation metric a search follows (read through :func:`tune_metric`)."""
METRIC_LABELS: dict[str, str] = {"val_auc": "validation AUC", "val_iou": "validation IoU"}
"""Axis and table titles of the followed metrics."""
TUNE_METRIC = f"{TUNE_METRICS['classification']}_finite"  # classification's ranked metric (:func:`score_key`)
MODE = "max"
# the files of a run folder that a checkpoint carries (enough for train(resume=...) plus the best model)
CHECKPOINT_FILES = ("last.pt", "config.yaml", "metrics.csv", "metrics_per_class.csv", "best.pt",
                    "predictions_val.csv")
CHECKPOINT_DIRS = ("tb",)
"""Folders copied into each epoch's checkpoint too (TensorBoard appends to its event files, so they are copied, not
linked): a trial retried on another node keeps its curves."""


def tune_metric(cfg: Config | dict[str, Any] | str) -> str:
    """The validation metric a search on ``cfg`` follows: ``val_auc`` (classification) or ``val_iou``
    (segmentation).

    ``cfg`` is the base config, its dict form (``fastlesion_tune.json``'s ``base``: an experiment written before
    ``train.task`` existed is classification) or a task name.
    """
    if isinstance(cfg, Config):
        task = cfg.train.task
    elif isinstance(cfg, dict):
        task = (cfg.get("train") or {}).get("task", "classification")
    else:
        task = cfg
    if task not in TUNE_METRICS:
        raise ConfigError(f"unknown train.task {task!r}; choose one of {tuple(TUNE_METRICS)}")
    return TUNE_METRICS[task]


def score_key(metric: str) -> str:
    """What ASHA ranks on for ``metric``: ``val_auc`` -> ``val_auc_finite`` (:func:`finite_metric` of it)."""
    return f"{metric}_finite"


def metric_label(metric: str) -> str:
    """``val_auc`` -> ``validation AUC`` (plot axis, table title)."""
    return METRIC_LABELS.get(metric, metric)


def trial_dirname(trial: Any) -> str:
    """Ray trial folder name: ``trial_<id>`` (short; the run folder is ``<experiment>/trial_<id>/run``)."""
    return f"trial_{trial.trial_id}"


def trial_run_dir(experiment_dir: str | Path, trial_id: str) -> Path:
    return Path(experiment_dir) / f"trial_{trial_id}" / "run"


def trial_config(base: dict[str, Any], params: dict[str, Any], run_dir: str | Path, gpus_per_trial: float,
                 cpus_per_trial: float, max_t: int, overwrite: bool = True) -> Config:
    """The config one trial trains: base + sampled keys, in its own quiet single-process run folder.

    ``train.patience`` is 0 (ASHA does the early stopping), ``loader.workers`` at most the trial's CPUs, and a
    trial without GPUs trains and decodes on the CPU.
    """
    forced: dict[str, Any] = {"run.out": str(run_dir), "run.quiet": True, "run.overwrite": overwrite,
                              "train.ddp": 0, "train.epochs": max_t, "train.patience": 0}
    if gpus_per_trial <= 0:
        forced.update({"train.device": "cpu", "loader.device": "cpu"})
    cfg = replace(config_from_dict(base, "trial config"), {**params, **forced})
    workers = min(cfg.loader.resolved_workers(), max(int(cpus_per_trial), 0))
    return replace(cfg, **{"loader.workers": workers}) if workers != cfg.loader.workers else cfg


def finite_metric(value: Any) -> float:
    """The ranked value (:func:`score_key`): the metric where it is a number, 0.0 where it is undefined."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


finite_auc = finite_metric  # the name of classification's days, kept for scripts that import it


def release_gpu_memory() -> None:
    """Give cached CUDA memory back (the trial's process ends too when ASHA stops it: actors are not reused)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - cleanup must never mask the trial's own outcome
        pass


# --------------------------------------------------------------------------------------------------- checkpoints
def _put(src: Path, dst: Path) -> None:
    """Hard link (cheap; train replaces its files atomically, so the link keeps this epoch's bytes) or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _restore(checkpoint: Any, run_dir: Path) -> Path | None:
    """The run folder to resume from: a retry after a failure, or a restored experiment, continues from the last
    epoch it checkpointed; a fresh trial (no checkpoint) starts from scratch (None)."""
    if checkpoint is None:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        for name in CHECKPOINT_FILES:
            if (Path(d) / name).is_file():
                shutil.copy2(Path(d) / name, run_dir / name)
        for name in CHECKPOINT_DIRS:
            if (Path(d) / name).is_dir():
                shutil.copytree(Path(d) / name, run_dir / name, dirs_exist_ok=True)
    return run_dir


def _report_epoch(row: dict[str, Any], out: Path, metric: str = "val_auc") -> None:
    """Send one epoch's numbers (with ``metric``'s finite form, what ASHA ranks) and a checkpoint of the run folder
    ``out`` to Ray Tune."""
    from ray import tune

    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics[score_key(metric)] = finite_metric(row.get(metric))
    # the checkpoint is a folder next to the run folder (same file system, so _put can hard link); Ray copies it
    # into the trial's storage before report() returns, so it can go right after
    with tempfile.TemporaryDirectory(prefix=".checkpoint-", dir=out.parent) as tmp:
        for name in CHECKPOINT_FILES:
            if (out / name).is_file():
                _put(out / name, Path(tmp) / name)
        for name in CHECKPOINT_DIRS:
            if (out / name).is_dir():
                shutil.copytree(out / name, Path(tmp) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# --------------------------------------------------------------------------------------------------- the trainable
def _trainable(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: ``train(cfg)`` reporting every epoch to Ray Tune with a checkpoint of its run folder.

    ``config`` is the trial's sampled keys; ``setup`` what the experiment wrote to ``fastlesion_tune.json`` (base
    config, resources, max_t). Module level, so that Ray can pickle it by name.
    """
    from ray import tune

    from fastlesion.engine.train import train

    run_dir = trial_run_dir(setup["experiment_dir"], tune.get_context().get_trial_id())
    metric = tune_metric(setup["base"])
    resume = _restore(tune.get_checkpoint(), run_dir)
    cfg = trial_config(setup["base"], config, run_dir, setup["gpus_per_trial"], setup["cpus_per_trial"],
                       setup["max_t"])
    last: list[tuple[dict[str, Any], Path]] = []

    def report(row: dict[str, Any], out: Path) -> None:
        # ASHA stops a trial at the report of its last epoch (max_t), which would end the process before train()
        # writes summary.json and the plots: that report is sent once train() has returned.
        if int(row["epoch"]) >= cfg.train.epochs:
            last.append((row, out))
        else:
            _report_epoch(row, out, metric)

    try:
        train(cfg, resume=resume, report=report)
        if last:
            _report_epoch(*last[-1], metric)
    finally:
        release_gpu_memory()
