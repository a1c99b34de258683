"""The run folder: every file a training run leaves, and every line it prints, goes through :class:`RunDir`::

    config.yaml  metrics.csv  metrics_per_class.csv  best.pt  last.pt  predictions_val.csv  plots/*.png
    summary.json  tb/

Only rank 0 writes and prints. Other ranks hold an inactive :class:`RunDir` whose methods do nothing (a no-op
switch, as nanoGPT's ``nullcontext``), so the epoch loop never asks which rank it runs on. The folder is made, locked
for the one live run that owns it (``.lock``: a second run on it is refused, naming the owner's pid), and an existing
run refused or replaced (only the files a run writes are deleted) by :meth:`RunDir.prepare` before any worker
starts; :meth:`RunDir.release` unlocks it when the run ends. A resume is checked against the run's own
``config.yaml`` by :func:`check_resume`. TensorBoard (``tb/``) and MLflow are told through the run's
:class:`~fastlesion.engine.tracking.Tracker`, which :class:`RunDir` owns and calls from ``start`` / ``record`` /
``finish`` (and :meth:`RunDir.step_hook` at the loop's loss reads).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fastlesion import locks
from fastlesion.config import Config, changed_keys, load_config, lookup, save_config
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.loop import EvalResult
from fastlesion.engine.progress import console, epoch_line
from fastlesion.engine.state import Session, checkpoint_state
from fastlesion.engine.tasks import TASKS, get_task
from fastlesion.engine.tracking import TB_DIR, Tracker, check_trackers, make_tracker
from fastlesion.errors import FastlesionError
from fastlesion.metrics import VAL_METRICS, per_class_columns
from fastlesion.report import PLOT_FILES


def metric_columns(task: str = "classification") -> list[str]:
    """The columns of a ``metrics.csv``, in order: the same for every dataset of a task (``train.task``)."""
    return ["epoch", "train_loss", "val_loss", *get_task(task).val_metrics, "lr", "epoch_seconds", "train_seconds",
            "val_seconds", "data_seconds", "images_per_s", "steps"]


METRIC_COLUMNS = metric_columns("classification")
"""The columns of a classification run's ``metrics.csv``, in order: the same for every dataset. The per-class
columns, which depend on the class names (``val_recall_mel``, ...: :func:`fastlesion.metrics.per_class_columns`), go
to ``metrics_per_class.csv`` (``epoch`` first), one row per epoch as well. A segmentation run's columns have
:data:`fastlesion.metrics.SEG_VAL_METRICS` in place of the classification metrics, and no per-class file."""
RUN_MARKERS = ("last.pt", "best.pt", "metrics.csv", "summary.json")  # a folder with these holds a run
RUN_FILES = ("config.yaml", "metrics.csv", "metrics_per_class.csv", "best.pt", "last.pt", "predictions_val.csv",
             "summary.json")
"""The files a run writes (plots under ``plots/``, TensorBoard's ``events.out.tfevents.*`` under ``tb/``):
``--overwrite`` deletes these and nothing else."""
LOCK_FILE = ".lock"
"""Held (``flock``) by the live run that owns the folder; says its pid, host and start time."""
RESUME_MAY_CHANGE = ("train.epochs", "train.patience", "train.ddp", "train.device", "train.compile",
                     "train.compile_mode", "train.cudnn_benchmark", "train.steps_per_epoch", "loader.workers",
                     "loader.prefetch", "loader.backend", "loader.device", "loader.eval_batch_size")
"""Settings a resumed run may change; everything else is the run's own (model, data, optimizer, schedule, ...)."""
log = logging.getLogger(__name__)
ReportFn = Callable[[dict[str, Any], Path], None]
"""Called on rank 0 after each epoch's files are written, with the metrics row and the run folder (Ray Tune)."""


# --------------------------------------------------------------------------------------------------- the folder
def default_out(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.data.dataset}-f{cfg.data.fold}-{stamp}"


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Create the run folder and lock it for this process (:func:`release_run_dir` unlocks it); refuse a folder
    that another live run holds, or that holds a different run unless resuming or overwriting."""
    check_trackers(cfg)  # a tracker's missing package is one line now, not a failure after the first epoch
    out = Path(cfg.run.out) if cfg.run.out else default_out(cfg)
    if out.exists() and not out.is_dir():
        raise FastlesionError(f"{out}: is a file, not a run folder; choose another --out")
    if resume and not (out / "last.pt").is_file():
        raise FastlesionError(f"{out}: nothing to resume (no last.pt)")
    out.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out)
    try:
        if resume:
            if not (out / "last.pt").is_file():  # a run that held the folder until now replaced it
                raise FastlesionError(f"{out}: nothing to resume (no last.pt)")
        elif any((out / m).exists() for m in RUN_MARKERS):
            if not cfg.run.overwrite:
                raise FastlesionError(f"{out}: already holds a run; use --resume {out} to continue it or "
                                      "--overwrite to replace it")
            remove_run_files(out)
    except BaseException:
        release_run_dir(out)
        raise
    return out


def remove_run_files(out: Path) -> None:
    """``--overwrite``: delete the files a run writes (:data:`RUN_FILES`, :data:`PLOT_FILES` and their temp files),
    TensorBoard's event files, nothing else; ``plots/`` and ``tb/`` go only when that leaves them empty."""
    names = [*RUN_FILES, *(f"plots/{p}" for p in PLOT_FILES)]
    for name in names + [n + ".tmp" for n in names]:
        (out / name).unlink(missing_ok=True)
    for events in (out / TB_DIR).glob("events.out.tfevents.*"):
        events.unlink(missing_ok=True)
    for folder in ("plots", TB_DIR):
        with contextlib.suppress(OSError):  # not empty (the user's own files), or not there
            (out / folder).rmdir()


# --------------------------------------------------------------------------------------------------- the lock
_held: dict[Path, locks.Lock] = {}  # run folders this process holds


def lock_run_dir(out: Path) -> None:
    """Lock ``out/.lock`` for this process, or refuse in one line naming the live run (its pid) that holds it.

    A lock file left by a run that died (``kill -9``, a crash, a lost node) is taken over with a warning: the
    kernel drops the lock of a dead process, so only a live run can hold one.
    """
    try:
        lock = locks.acquire(out / LOCK_FILE)
    except locks.LockBusy as e:
        raise FastlesionError(f"{out}: in use by another fastlesion run ({locks.describe(e.owner)}); wait for it "
                              "to end, or choose another --out") from None
    except OSError as e:
        raise FastlesionError(f"{out}: cannot lock the run folder ({e.strerror or e})") from None
    if lock.previous:
        log.warning("%s: taking over the lock left by a run that is gone (%s)", out,
                    locks.describe(lock.previous))
    _held[out.resolve()] = lock


def release_run_dir(out: str | Path | None) -> None:
    """Unlock a run folder this process locked (and remove its ``.lock``); any other folder is left alone."""
    lock = _held.pop(Path(out).resolve(), None) if out else None
    if lock is not None:
        locks.release(lock)


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Refuse a resume whose settings differ from the run's ``config.yaml`` in what the checkpoint depends on."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = load_config(saved_file)
    changed = [k for k in changed_keys(saved, cfg) if not k.startswith("run.") and k not in RESUME_MAY_CHANGE]
    if changed:
        what = ", ".join(f"{k} ({lookup(saved, k)!r} -> {lookup(cfg, k)!r})" for k in changed[:5])
        raise FastlesionError(f"--resume {run_dir}: a resumed run keeps its settings, but {what} differ from its "
                              f"config.yaml; start a new run with --out instead (a resume may change "
                              f"{', '.join(RESUME_MAY_CHANGE)} and run.*)")


# --------------------------------------------------------------------------------------------------- file forms
def write_metrics_csv(out: Path, rows: list[dict], classes: list[str] | None = None,
                      task: str = "classification") -> None:
    """``metrics.csv`` (:func:`metric_columns`) and, given the class names, ``metrics_per_class.csv`` (``epoch`` and
    the per-class columns; a row of a run from before they existed leaves its cells empty)."""
    files = [("metrics.csv", metric_columns(task))]
    if classes is not None:
        files.append(("metrics_per_class.csv", ["epoch", *per_class_columns(classes)]))
    for name, columns in files:
        tmp = out / f"{name}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out / name)


def predictions_frame(table: pd.DataFrame, res: EvalResult, classes: list[str]) -> pd.DataFrame:
    """One row per evaluated image: identifiers, label, predicted class and class probabilities."""
    return TASKS["classification"].predictions(table, res, classes)


def roc_from_predictions(csv_path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels and class probabilities back from a ``predictions_val.csv`` (None when its columns do not fit)."""
    df = pd.read_csv(csv_path)
    cols = [f"prob_{c}" for c in classes]
    if "label" not in df.columns or not set(cols) <= set(df.columns):
        return None
    return df["label"].to_numpy(), df[cols].to_numpy()


def write_plots(out: Path, roc: tuple[np.ndarray, np.ndarray] | None, classes: list[str],
                confusion: list | None) -> None:
    """``plots/``: curves.png; roc.png and pr.png from the best epoch's (labels, probs); confusion.png from its
    matrix."""
    from fastlesion import report

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    report.plot_curves(out / "metrics.csv", plots / "curves.png")
    if roc is not None and len(np.unique(roc[0])) > 1:
        report.plot_roc(roc[0], roc[1], classes, plots / "roc.png")
        report.plot_pr(roc[0], roc[1], classes, plots / "pr.png")
    if confusion is not None:
        report.plot_confusion(confusion, classes, plots / "confusion.png")


def summarize(s: Session, run_dir: Path, stopped_early: bool, best_metrics: dict,
              train_seconds: float) -> dict[str, Any]:
    """``summary.json``: the best epoch's metrics (every ``val_*`` column of metrics.csv and
    metrics_per_class.csv, NaN where its row lacks one), throughput (first epoch left out), and what ran where."""
    rows, cfg, split = s.rows, s.cfg, s.data.split
    steady = rows[1:] if len(rows) > 1 else rows  # the first epoch includes compilation and warm-up
    best_row = next((r for r in rows if r["epoch"] == s.early.best_epoch), rows[-1])
    seg = cfg.train.task == "segmentation"
    headline = s.task.val_metrics if seg else ("val_auc", "val_accuracy", "val_balanced_accuracy", "val_f1")
    return {
        "model": cfg.model.name, "params": s.params, "dataset": cfg.data.dataset, "task": cfg.train.task,
        "classes": s.classes, "fold": cfg.data.fold, "num_folds": cfg.data.num_folds,
        **{k: best_row[k] for k in headline},
        "val_loss": best_row["val_loss"], "best_metric": cfg.train.early_stop_metric,
        "best_value": s.early.best, "best_epoch": s.early.best_epoch, "epochs_run": len(rows),
        "stopped_early": stopped_early,
        "images_per_s": float(np.median([r["images_per_s"] for r in steady])),
        "epoch_seconds": float(np.median([r["epoch_seconds"] for r in steady])),
        "train_seconds": train_seconds, "n_train": len(split.train), "n_val": len(split.val),
        "world_size": s.info.world_size, "device": str(s.rt.device), "amp": s.rt.amp_name,
        "compile": s.rt.compile, "channels_last": s.rt.channels_last, "loader": s.train_loader.backend,
        "loader_device": s.train_loader.device_name, "folds_file": str(split.folds_file),
        "confusion": best_metrics.get("confusion"), "run_dir": str(run_dir),
        **{k: best_row.get(k, float("nan")) for k in (s.task.val_metrics if seg else
                                                         (*VAL_METRICS, *per_class_columns(s.classes)))},
    }


def oversample_line(loader: Any, classes: list[str]) -> str:
    """The class ratio oversampling gives an epoch, next to the dataset's own ratio."""
    from fastlesion.data.sampling import class_ratio

    labels = np.asarray(loader.labels)
    natural = class_ratio(labels, np.arange(len(labels)), len(classes))
    parts = [f"{c} {d:.2f} (was {n:.2f})" for c, d, n in zip(classes, loader.effective_class_ratio, natural)]
    return "oversampling: class ratio per epoch " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------- the object
class RunDir:
    """Rank 0's view of the run folder: writes checkpoints, metrics, predictions, plots and the summary, prints the
    run's lines, tells the trackers (TensorBoard, MLflow) and calls the ``report`` callback. Inactive
    (``active=False``) on every other rank. Used as a context manager, it closes the trackers however the run ends.

    Args:
        path: the run folder (already made by :meth:`prepare`).
        active: whether this process writes (rank 0) or not.
        report: called after every epoch once its files are written (:data:`ReportFn`).
        quiet: no progress bars (``run.quiet``).
    """

    prepare = staticmethod(prepare_run_dir)
    release = staticmethod(release_run_dir)

    def __init__(self, path: str | Path, active: bool = True, report: ReportFn | None = None,
                 quiet: bool = False) -> None:
        self.path, self.active, self.report, self.quiet = Path(path), active, report, quiet
        self.best_metrics: dict = {}  # metrics (with the confusion matrix) of the best epoch seen by this process
        self.best_roc: tuple[np.ndarray, np.ndarray] | None = None  # the best epoch's validation labels, probs
        self.tracker = Tracker()  # the no-op one until start (and on other ranks)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.tracker.close("FINISHED" if exc_type is None else
                           "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    @property
    def shows_progress(self) -> bool:
        return self.active and not self.quiet

    def log(self, text: str) -> None:
        if self.active:
            console.print(text)

    def step_hook(self, s: Session) -> Callable[[float], None] | None:
        """The loop's ``on_loss`` callback (a loss read: the mean loss since the previous one), or None when no
        tracker wants it (then the loop calls nothing)."""
        tracker = self.tracker
        if not (self.active and tracker.wants_steps):
            return None
        return lambda loss: tracker.step(s.global_step, loss, s.current_lr())

    def start(self, s: Session, resumed: bool) -> None:
        """Write the resolved ``config.yaml`` (only now: a failed resume leaves the run's own as it was), print
        what runs where and start the trackers. Call after the first epoch's order is drawn, so the oversampling
        line shows its ratio."""
        if not self.active:
            return
        if resumed:
            console.print(f"resuming {self.path} after epoch {s.epoch}")
        save_config(s.cfg, self.path / "config.yaml")
        cfg, split, loader = s.cfg, s.data.split, s.train_loader
        console.print(f"[bold]fastlesion[/] {cfg.model.name} ({s.params / 1e6:.2f}M params) on {cfg.data.dataset} "
                      f"fold {cfg.data.fold}/{cfg.data.num_folds}: {len(split.train)} train / {len(split.val)} "
                      f"val images, {len(s.classes)} classes; {s.rt.describe()} loader={loader.backend}"
                      f"({loader.device_name}) world={s.info.world_size} -> {self.path}")
        if cfg.loader.oversample:
            console.print(oversample_line(loader, s.classes))
        self.tracker = make_tracker(cfg, self.path)
        self.tracker.start(s, resumed)

    def record(self, s: Session, row: dict[str, Any], metrics: dict[str, Any], res: Any,
               improved: bool) -> None:
        """An epoch's files: best.pt (+ predictions) when it improved, last.pt, metrics.csv; its line; the report."""
        if not self.active:
            return
        state = checkpoint_state(s, metrics)  # one state for both files: best.pt is last.pt plus the task's extras
        task = s.task
        if improved:
            self.best_metrics = metrics
            if task.name == "classification":
                self.best_roc = (res.labels, res.probs)
            ckpt.save_atomic({**state, **task.best_extras(res)}, self.path / "best.pt")
            if s.cfg.run.save_predictions:
                task.predictions(s.data.split.val, res, s.classes).to_csv(self.path / "predictions_val.csv",
                                                                          index=False)
            task.on_best(self.path, res, s.cfg.run.plots)
        ckpt.save_atomic(state, self.path / "last.pt")
        write_metrics_csv(self.path, s.rows, s.classes if task.name == "classification" else None, task.name)
        self.tracker.epoch(row["epoch"], row)  # after last.pt: a resume never repeats an epoch it logged
        console.print(epoch_line(row, s.cfg.train.epochs, improved))
        if self.report is not None:
            self.report(dict(row, best_value=s.early.best, best_epoch=s.early.best_epoch), self.path)

    def finish(self, s: Session, stopped_early: bool, train_seconds: float) -> dict[str, Any]:
        """Plots, ``summary.json`` and the trackers' end; returns the summary (``{}`` on other ranks)."""
        if not self.active:
            return {}
        best_metrics, roc = self.best_metrics, self.best_roc
        if roc is None and (self.path / "best.pt").is_file():  # resumed after the best epoch: best.pt has it
            best = ckpt.load(self.path / "best.pt")
            best_metrics = best.get("metrics", {})
            if best.get("val_labels") is not None:
                roc = (best["val_labels"].numpy(), best["val_probs"].numpy())
            elif (self.path / "predictions_val.csv").is_file():  # a best.pt written before it kept them
                roc = roc_from_predictions(self.path / "predictions_val.csv", s.classes)
        summary = summarize(s, self.path, stopped_early, best_metrics, train_seconds)
        if s.cfg.run.plots:
            write_plots(self.path, roc if s.task.name == "classification" else None, s.classes,
                        best_metrics.get("confusion"))
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        self.tracker.finish(s, summary, self.path)
        self.tracker.close()
        headline = "  ".join(f"{k} {summary[k]:.4f}" for k in s.task.headline)
        console.print(f"best {s.cfg.train.early_stop_metric} {s.early.best:.4f} at epoch {s.early.best_epoch}; "
                      f"{headline}; run folder {self.path}")
        return summary

    def read_summary(self) -> dict[str, Any]:
        """The summary a finished run wrote (``--ddp``: the launcher reads what rank 0 wrote)."""
        return json.loads((self.path / "summary.json").read_text())
