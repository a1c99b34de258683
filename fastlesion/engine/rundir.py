"""The run folder: every file a training run leaves, and every line it prints, goes through :class:`RunDir`::

    config.yaml  metrics.csv  best.pt  last.pt  predictions_val.csv  plots/*.png  summary.json

Only rank 0 writes and prints. Other ranks hold an inactive :class:`RunDir` whose methods do nothing (a no-op
switch, as nanoGPT's ``nullcontext``), so the epoch loop never asks which rank it runs on. The folder is made (and
an existing run refused or replaced) by :meth:`RunDir.prepare` before any worker starts; a resume is checked
against the run's own ``config.yaml`` by :func:`check_resume`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fastlesion.config import Config, changed_keys, load_config, lookup, save_config
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.loop import EvalResult
from fastlesion.engine.progress import console, epoch_line
from fastlesion.engine.state import Session, checkpoint_state
from fastlesion.errors import FastlesionError
from fastlesion.metrics import VAL_METRICS

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", *VAL_METRICS, "lr", "epoch_seconds", "train_seconds",
                  "val_seconds", "data_seconds", "images_per_s", "steps"]
"""The columns of ``metrics.csv``, in order."""
RUN_MARKERS = ("last.pt", "best.pt", "metrics.csv", "summary.json")  # a folder with these holds a run
RESUME_MAY_CHANGE = ("train.epochs", "train.patience", "train.ddp", "train.device", "train.compile",
                     "train.compile_mode", "train.cudnn_benchmark", "train.steps_per_epoch", "loader.workers",
                     "loader.prefetch", "loader.backend", "loader.device", "loader.eval_batch_size")
"""Settings a resumed run may change; everything else is the run's own (model, data, optimizer, schedule, ...)."""
ReportFn = Callable[[dict[str, Any], Path], None]
"""Called on rank 0 after each epoch's files are written, with the metrics row and the run folder (Ray Tune)."""


# --------------------------------------------------------------------------------------------------- the folder
def default_out(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.data.dataset}-f{cfg.data.fold}-{stamp}"


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Create the run folder; refuse one that holds a different run unless resuming or overwriting."""
    out = Path(cfg.run.out) if cfg.run.out else default_out(cfg)
    if out.exists() and not out.is_dir():
        raise FastlesionError(f"{out}: is a file, not a run folder; choose another --out")
    if resume:
        if not (out / "last.pt").is_file():
            raise FastlesionError(f"{out}: nothing to resume (no last.pt)")
        return out
    if out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        if not cfg.run.overwrite:
            raise FastlesionError(f"{out}: already holds a run; use --resume {out} to continue it or --overwrite "
                                  "to replace it")
        for m in (*RUN_MARKERS, "config.yaml", "predictions_val.csv", "plots"):
            p = out / m
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
def write_metrics_csv(out: Path, rows: list[dict]) -> None:
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "metrics.csv")


def predictions_frame(table: pd.DataFrame, res: EvalResult, classes: list[str]) -> pd.DataFrame:
    """One row per evaluated image: identifiers, label, predicted class and class probabilities."""
    rows = table.iloc[res.idx]
    df = pd.DataFrame({"path": rows["path"].values})
    for col in ("image_name", "image_id", "patient_id", "lesion_id", "group"):
        if col in rows.columns:
            df[col] = rows[col].values
    df["label"] = res.labels
    df["pred"] = res.probs.argmax(1)
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = res.probs[:, i]
    return df


def write_plots(out: Path, res: EvalResult | None, classes: list[str], confusion: list | None) -> None:
    from fastlesion import report

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    report.plot_curves(out / "metrics.csv", plots / "curves.png")
    if res is not None and len(np.unique(res.labels)) > 1:
        report.plot_roc(res.labels, res.probs, classes, plots / "roc.png")
    if confusion is not None:
        report.plot_confusion(confusion, classes, plots / "confusion.png")


def summarize(s: Session, run_dir: Path, stopped_early: bool, best_metrics: dict,
              train_seconds: float) -> dict[str, Any]:
    """``summary.json``: the best epoch's metrics, throughput (first epoch left out), and what ran where."""
    rows, cfg, split = s.rows, s.cfg, s.data.split
    steady = rows[1:] if len(rows) > 1 else rows  # the first epoch includes compilation and warm-up
    best_row = next((r for r in rows if r["epoch"] == s.early.best_epoch), rows[-1])
    return {
        "model": cfg.model.name, "params": s.params, "dataset": cfg.data.dataset,
        "classes": s.classes, "fold": cfg.data.fold, "num_folds": cfg.data.num_folds,
        "val_auc": best_row["val_auc"], "val_accuracy": best_row["val_accuracy"],
        "val_balanced_accuracy": best_row["val_balanced_accuracy"], "val_f1": best_row["val_f1"],
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
    run's lines and calls the ``report`` callback. Inactive (``active=False``) on every other rank.

    Args:
        path: the run folder (already made by :meth:`prepare`).
        active: whether this process writes (rank 0) or not.
        report: called after every epoch once its files are written (:data:`ReportFn`).
        quiet: no progress bars (``run.quiet``).
    """

    prepare = staticmethod(prepare_run_dir)

    def __init__(self, path: str | Path, active: bool = True, report: ReportFn | None = None,
                 quiet: bool = False) -> None:
        self.path, self.active, self.report, self.quiet = Path(path), active, report, quiet
        self.best_metrics: dict = {}  # metrics (with the confusion matrix) of the best epoch seen by this process
        self.best_res: EvalResult | None = None

    @property
    def shows_progress(self) -> bool:
        return self.active and not self.quiet

    def log(self, text: str) -> None:
        if self.active:
            console.print(text)

    def start(self, s: Session, resumed: bool) -> None:
        """Write the resolved ``config.yaml`` (only now: a failed resume leaves the run's own as it was) and print
        what runs where. Call after the first epoch's order is drawn, so the oversampling line shows its ratio."""
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

    def record(self, s: Session, row: dict[str, Any], metrics: dict[str, Any], res: EvalResult,
               improved: bool) -> None:
        """An epoch's files: best.pt (+ predictions) when it improved, last.pt, metrics.csv; its line; the report."""
        if not self.active:
            return
        if improved:
            self.best_metrics, self.best_res = metrics, res
            ckpt.save_atomic(checkpoint_state(s, metrics), self.path / "best.pt")
            if s.cfg.run.save_predictions:
                predictions_frame(s.data.split.val, res, s.classes).to_csv(self.path / "predictions_val.csv",
                                                                           index=False)
        ckpt.save_atomic(checkpoint_state(s, metrics), self.path / "last.pt")
        write_metrics_csv(self.path, s.rows)
        console.print(epoch_line(row, s.cfg.train.epochs, improved))
        if self.report is not None:
            self.report(dict(row, best_value=s.early.best, best_epoch=s.early.best_epoch), self.path)

    def finish(self, s: Session, stopped_early: bool, train_seconds: float) -> dict[str, Any]:
        """Plots and ``summary.json``; returns the summary (``{}`` on other ranks)."""
        if not self.active:
            return {}
        best_metrics = self.best_metrics
        if self.best_res is None and (self.path / "predictions_val.csv").is_file():  # resumed after the best epoch
            best_metrics = ckpt.load(self.path / "best.pt").get("metrics", {})
        summary = summarize(s, self.path, stopped_early, best_metrics, train_seconds)
        if s.cfg.run.plots:
            write_plots(self.path, self.best_res, s.classes, best_metrics.get("confusion"))
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        console.print(f"best {s.cfg.train.early_stop_metric} {s.early.best:.4f} at epoch {s.early.best_epoch}; "
                      f"val_auc {summary['val_auc']:.4f}  val_accuracy {summary['val_accuracy']:.4f}; "
                      f"run folder {self.path}")
        return summary

    def read_summary(self) -> dict[str, Any]:
        """The summary a finished run wrote (``--ddp``: the launcher reads what rank 0 wrote)."""
        return json.loads((self.path / "summary.json").read_text())
