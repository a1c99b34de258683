"""``train(cfg) -> dict``: the one training entry that the CLI, Ray Tune trials, benchmarks and tests call.

It is a plain function with no globals: it reads the dataset through the catalog, splits by group, builds the model
(``create_model -> to(device) -> channels_last -> torch.compile -> DDP``), trains with AMP, validates every epoch on
the whole validation set gathered from all ranks, stops early on a metric and leaves a run folder::

    config.yaml  metrics.csv  best.pt  last.pt  predictions_val.csv  plots/*.png  summary.json

Only rank 0 prints and writes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fastlesion import dist
from fastlesion.config import Config, config_from_dict, save_config, to_dict
from fastlesion.data.catalog import Dataset, load_dataset
from fastlesion.data.loader import build_loader
from fastlesion.data.splits import Split, split_dataset
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.loop import EvalResult, NonFiniteLossError, evaluate, train_epoch
from fastlesion.engine.losses import create_loss
from fastlesion.engine.optim import Plateau, create_optimizer, lr_at, set_lr
from fastlesion.engine.progress import EpochBar, console, epoch_line
from fastlesion.engine.runtime import Runtime, resolve_runtime
from fastlesion.errors import FastlesionError

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_balanced_accuracy",
                  "val_precision", "val_recall", "val_specificity", "val_f1", "val_f1_macro", "val_f1_weighted",
                  "lr", "epoch_seconds", "train_seconds", "val_seconds", "data_seconds", "images_per_s", "steps"]
RUN_MARKERS = ("last.pt", "best.pt", "metrics.csv", "summary.json")  # a folder with these holds a run
ReportFn = Callable[[dict[str, Any], Path], None]


# --------------------------------------------------------------------------------------------------- run folder
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


def _on_main(info: dist.DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and give its result (or its user error) to every rank, so no rank waits forever."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except FastlesionError as e:
            error = str(e)
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise FastlesionError(error)
    return result


# --------------------------------------------------------------------------------------------------- state
@dataclass
class EarlyStop:
    """Best value of the watched metric, its epoch, and epochs since it improved."""

    mode: str = "max"
    patience: int = 5
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value``; True when it is a new best (the first epoch always is)."""
        if self.best_epoch == 0 or (not math.isnan(value) and (
                math.isnan(self.best) or (value > self.best if self.mode == "max" else value < self.best))):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience


@dataclass
class Session:
    """Everything a training run holds; built by :func:`build_session`."""

    cfg: Config
    info: dist.DistInfo
    rt: Runtime
    out: Path
    ds: Dataset
    split: Split
    raw: nn.Module
    model: nn.Module  # compiled and/or DDP-wrapped view of ``raw`` used for training
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    ema: ckpt.Ema | None = None
    plateau: Plateau = field(default_factory=Plateau)
    early: EarlyStop = field(default_factory=EarlyStop)
    epoch: int = 0
    global_step: int = 0
    rows: list[dict] = field(default_factory=list)
    params: int = 0


def early_stop_mode(cfg: Config) -> str:
    """``train.early_stop_mode`` with ``auto`` resolved: a loss is minimised, every other metric maximised."""
    mode = cfg.train.early_stop_mode
    if mode == "auto":
        return "min" if cfg.train.early_stop_metric.endswith("loss") else "max"
    return mode


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_data(cfg: Config) -> None:
    split_dataset(load_dataset(cfg.data, progress=not cfg.run.quiet), cfg.data)


def build_session(cfg: Config, info: dist.DistInfo, rt: Runtime, out: Path) -> Session:
    from fastlesion.models import count_params, create_model

    seed_everything(cfg.train.seed)
    ds = load_dataset(cfg.data, progress=False)
    split = split_dataset(ds, cfg.data)
    raw = create_model(cfg.model.name, num_classes=ds.num_classes, drop_rate=cfg.model.drop_rate,
                       drop_path_rate=cfg.model.drop_path_rate, pretrained_path=cfg.model.pretrained_path)
    raw = raw.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    ema = ckpt.Ema(raw, cfg.optim.ema_decay) if cfg.optim.ema else None
    model = torch.compile(raw, mode=cfg.train.compile_mode) if rt.compile else raw
    eval_model = model
    if info.enabled:  # compile first, then DDP: DDP stays out of the compiled graph
        model = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank]
                                                    if rt.device.type == "cuda" else None)
    common = {"rank": info.rank, "world_size": info.world_size, "device": rt.device,
              "channels_last": rt.channels_last}
    train_loader = build_loader(split.train, cfg.loader, cfg.data.image_size, train=True, **common)
    val_loader = build_loader(split.val, cfg.loader, cfg.data.image_size, train=False, **common)
    steps = len(train_loader) if cfg.train.steps_per_epoch is None else min(len(train_loader),
                                                                            cfg.train.steps_per_epoch)
    labels = split.train["label"].to_numpy()
    s = Session(cfg=cfg, info=info, rt=rt, out=out, ds=ds, split=split, raw=raw, model=model, eval_model=eval_model,
                optimizer=create_optimizer(raw, cfg.optim), scaler=rt.grad_scaler(),
                loss_fn=create_loss(cfg.optim, labels, ds.num_classes).to(rt.device), train_loader=train_loader,
                val_loader=val_loader, steps_per_epoch=steps, ema=ema,
                plateau=Plateau(early_stop_mode(cfg), cfg.optim.plateau_patience, cfg.optim.gamma),
                early=EarlyStop(early_stop_mode(cfg), cfg.train.patience), params=count_params(raw))
    return s


def optimizer_steps_per_epoch(s: Session) -> int:
    return -(-s.steps_per_epoch // s.cfg.optim.grad_accum)


def current_lr(s: Session) -> float:
    return lr_at(s.global_step, s.cfg.optim, optimizer_steps_per_epoch(s), s.cfg.train.epochs) * s.plateau.factor


def checkpoint_state(s: Session, metrics: dict | None = None) -> dict[str, Any]:
    return {"model": ckpt.unwrap(s.raw).state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "plateau": s.plateau.state_dict(), "early": vars(s.early).copy(),
            "ema": s.ema.module.state_dict() if s.ema else None, "epoch": s.epoch, "global_step": s.global_step,
            "rng": ckpt.rng_state(), "classes": list(s.ds.classes), "model_name": s.cfg.model.name,
            "config": to_dict(s.cfg), "metrics": metrics or {}, "rows": s.rows}


def restore(s: Session, state: dict[str, Any]) -> None:
    """Continue from a ``last.pt``: model, optimizer, scaler, schedule, early stopping, EMA, epoch, RNG."""
    if state.get("classes") != list(s.ds.classes):
        raise FastlesionError(f"checkpoint classes {state.get('classes')} do not match the dataset's {s.ds.classes}")
    s.raw.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    s.plateau.load_state_dict(state["plateau"])
    for k, v in state["early"].items():
        setattr(s.early, k, v)
    if s.ema is not None and state.get("ema") is not None:
        s.ema.module.load_state_dict(state["ema"])
    s.epoch, s.global_step, s.rows = int(state["epoch"]), int(state["global_step"]), list(state.get("rows", []))
    ckpt.set_rng_state(state["rng"])


# --------------------------------------------------------------------------------------------------- outputs
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


def summarize(s: Session, stopped_early: bool, best_metrics: dict, train_seconds: float) -> dict[str, Any]:
    rows = s.rows
    steady = rows[1:] if len(rows) > 1 else rows  # the first epoch includes compilation and warm-up
    best_row = next((r for r in rows if r["epoch"] == s.early.best_epoch), rows[-1])
    return {
        "model": s.cfg.model.name, "params": s.params, "dataset": s.cfg.data.dataset,
        "classes": list(s.ds.classes), "fold": s.cfg.data.fold, "num_folds": s.cfg.data.num_folds,
        "val_auc": best_row["val_auc"], "val_accuracy": best_row["val_accuracy"],
        "val_balanced_accuracy": best_row["val_balanced_accuracy"], "val_f1": best_row["val_f1"],
        "val_loss": best_row["val_loss"], "best_metric": s.cfg.train.early_stop_metric,
        "best_value": s.early.best, "best_epoch": s.early.best_epoch, "epochs_run": len(rows),
        "stopped_early": stopped_early,
        "images_per_s": float(np.median([r["images_per_s"] for r in steady])),
        "epoch_seconds": float(np.median([r["epoch_seconds"] for r in steady])),
        "train_seconds": train_seconds, "n_train": len(s.split.train), "n_val": len(s.split.val),
        "world_size": s.info.world_size, "device": str(s.rt.device), "amp": s.rt.amp_name,
        "compile": s.rt.compile, "channels_last": s.rt.channels_last, "loader": s.train_loader.backend,
        "loader_device": getattr(s.train_loader, "device_name", "cpu"), "folds_file": str(s.split.folds_file),
        "confusion": best_metrics.get("confusion"), "run_dir": str(s.out),
    }


# --------------------------------------------------------------------------------------------------- the loop
def oversample_line(loader: Any, classes: list[str]) -> str:
    """The class ratio oversampling gives an epoch, next to the dataset's own ratio."""
    from fastlesion.data.sampling import class_ratio

    labels = np.asarray(loader.labels)
    natural = class_ratio(labels, np.arange(len(labels)), len(classes))
    drawn = getattr(loader, "effective_class_ratio", natural)
    parts = [f"{c} {d:.2f} (was {n:.2f})" for c, d, n in zip(classes, drawn, natural)]
    return "oversampling: class ratio per epoch " + ", ".join(parts)


def fit(s: Session, report: ReportFn | None = None) -> dict[str, Any]:
    from fastlesion.metrics import classification_metrics

    cfg, main = s.cfg, s.info.is_main
    show_bar = main and not cfg.run.quiet
    if main:
        console.print(f"[bold]fastlesion[/] {cfg.model.name} ({s.params / 1e6:.2f}M params) on {cfg.data.dataset} "
                      f"fold {cfg.data.fold}/{cfg.data.num_folds}: {len(s.split.train)} train / {len(s.split.val)} "
                      f"val images, {s.ds.num_classes} classes; {s.rt.describe()} loader={s.train_loader.backend}"
                      f"({getattr(s.train_loader, 'device_name', 'cpu')}) world={s.info.world_size} -> {s.out}")
    best_metrics: dict = {}
    best_res: EvalResult | None = None
    metric = cfg.train.early_stop_metric
    stopped_early = False
    t_start = time.perf_counter()

    def after_step() -> None:
        s.global_step += 1
        set_lr(s.optimizer, current_lr(s))
        if s.ema is not None:
            s.ema.update(s.raw)

    set_lr(s.optimizer, current_lr(s))
    start_epoch = s.epoch
    while s.epoch < cfg.train.epochs:
        epoch = s.epoch + 1
        s.train_loader.set_epoch(epoch)
        if main and cfg.loader.oversample and epoch == start_epoch + 1:
            console.print(oversample_line(s.train_loader, s.ds.classes))
        lr = current_lr(s)
        t0 = time.perf_counter()
        with EpochBar(epoch, cfg.train.epochs, s.steps_per_epoch, enabled=show_bar) as bar:
            tr = train_epoch(s.model, s.train_loader, s.loss_fn, s.optimizer, s.scaler, s.rt, epoch,
                             accum=cfg.optim.grad_accum, clip_grad=cfg.optim.clip_grad, max_steps=s.steps_per_epoch,
                             on_optimizer_step=after_step, progress=bar, world_size=s.info.world_size)
        res = evaluate(s.ema.module if s.ema else s.eval_model, s.val_loader, s.rt)
        m = classification_metrics(res.labels, res.probs, s.ds.classes)
        row = {"epoch": epoch, "train_loss": tr.loss, "val_loss": res.loss, "lr": lr,
               **{f"val_{k}": v for k, v in m.items() if k not in ("confusion", "n")},
               "epoch_seconds": time.perf_counter() - t0, "train_seconds": tr.seconds, "val_seconds": res.seconds,
               "data_seconds": tr.data_seconds, "images_per_s": tr.images / max(tr.seconds, 1e-9),
               "steps": tr.steps}
        if not math.isfinite(res.loss):  # diverged weights: stop before they become best.pt or last.pt
            kept = f"last.pt holds the last good epoch ({s.epoch})" if s.epoch else "no checkpoint was written"
            raise NonFiniteLossError(f"validation loss is {res.loss} at epoch {epoch}: the weights diverged; stopped "
                                     f"(lower optim.lr, set optim.clip_grad, or try train.amp=bf16); {kept}")
        if metric not in row:  # e.g. val_specificity of a multiclass model
            raise FastlesionError(f"train.early_stop_metric: {metric!r} is not computed for this "
                                  f"{s.ds.num_classes}-class dataset (choose from "
                                  f"{', '.join(k for k in row if k.startswith('val_'))})")
        improved = s.early.update(float(row[metric]), epoch)
        if cfg.optim.scheduler == "plateau":
            s.plateau.update(float(row[metric]))
        s.rows.append(row)
        s.epoch = epoch
        if main:
            if improved:
                best_metrics, best_res = m, res
                ckpt.save_atomic(checkpoint_state(s, m), s.out / "best.pt")
                if cfg.run.save_predictions:
                    predictions_frame(s.split.val, res, s.ds.classes).to_csv(s.out / "predictions_val.csv",
                                                                             index=False)
            ckpt.save_atomic(checkpoint_state(s, m), s.out / "last.pt")
            write_metrics_csv(s.out, s.rows)
            console.print(epoch_line(row, cfg.train.epochs, improved))
            if report is not None:
                report(dict(row, best_value=s.early.best, best_epoch=s.early.best_epoch), s.out)
        if s.early.should_stop and epoch < cfg.train.epochs:
            stopped_early = True
            if main:
                console.print(f"early stop: {metric} did not improve for {s.early.patience} epochs "
                              f"(best {s.early.best:.4f} at epoch {s.early.best_epoch})")
            break
    summary: dict[str, Any] = {}
    if main:
        if best_res is None and (s.out / "predictions_val.csv").is_file():  # resumed after the best epoch
            best_metrics = ckpt.load(s.out / "best.pt").get("metrics", {})
        summary = summarize(s, stopped_early, best_metrics, time.perf_counter() - t_start)
        if cfg.run.plots:
            write_plots(s.out, best_res, s.ds.classes, best_metrics.get("confusion"))
        (s.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        console.print(f"best {metric} {s.early.best:.4f} at epoch {s.early.best_epoch}; val_auc "
                      f"{summary['val_auc']:.4f}  val_accuracy {summary['val_accuracy']:.4f}; run folder {s.out}")
    return summary


def with_out(cfg: Config, out: str | Path) -> Config:
    d = to_dict(cfg)
    d["run"]["out"] = str(out)
    return config_from_dict(d)


def run_worker(cfg: Config, resume: bool = False, report: ReportFn | None = None,
               prepared: bool = False) -> dict[str, Any]:
    """The body of one process (single process, a ``--ddp`` worker, or a torchrun rank).

    ``prepared``: the launcher already made ``cfg.run.out`` (``--ddp``), so the workers only use it.
    """
    rt = resolve_runtime(cfg.train, dist.env_info().local_rank)
    info = dist.setup(rt.device.type)
    try:
        # rank 0 checks the dataset (generating the synthetic set, writing the folds file) before any folder is
        # made, then the others read them
        _on_main(info, lambda: _prepare_data(cfg))
        out = cfg.run.out if prepared else _on_main(info, lambda: str(prepare_run_dir(cfg, resume)))
        cfg = with_out(cfg, out)
        s = build_session(cfg, info, rt, Path(out))
        if resume:
            restore(s, ckpt.load(Path(out) / "last.pt"))
            if info.is_main:
                console.print(f"resuming {out} after epoch {s.epoch}")
        if info.is_main:  # after a successful restore: a failed resume leaves the run's config.yaml as it was
            save_config(cfg, Path(out) / "config.yaml")
        return fit(s, report)
    finally:
        dist.teardown()


RESUME_MAY_CHANGE = ("train.epochs", "train.patience", "train.ddp", "train.device", "train.compile",
                     "train.compile_mode", "train.cudnn_benchmark", "train.steps_per_epoch", "loader.workers",
                     "loader.prefetch", "loader.backend", "loader.device", "loader.eval_batch_size")
"""Settings a resumed run may change; everything else is the run's own (model, data, optimizer, schedule, ...)."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Refuse a resume whose settings differ from the run's ``config.yaml`` in what the checkpoint depends on."""
    from fastlesion.config import load_config

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = _flat(to_dict(load_config(saved_file)))
    new = _flat(to_dict(cfg))
    changed = [k for k in new if not k.startswith("run.") and k not in RESUME_MAY_CHANGE
               and new[k] != saved.get(k) and str(new[k]) != str(saved.get(k))]
    if changed:
        what = ", ".join(f"{k} ({saved.get(k)!r} -> {new[k]!r})" for k in changed[:5])
        raise FastlesionError(f"--resume {run_dir}: a resumed run keeps its settings, but {what} differ from its "
                              f"config.yaml; start a new run with --out instead (a resume may change "
                              f"{', '.join(RESUME_MAY_CHANGE)} and run.*)")


def _ddp_entry(cfg: Config, resume: bool) -> None:
    run_worker(cfg, resume, prepared=True)


def train(cfg: Config, resume: str | Path | None = None, report: ReportFn | None = None) -> dict[str, Any]:
    """Train one fold as configured and return the summary (also written to ``<run>/summary.json``).

    Args:
        cfg: the resolved configuration (the CLI builds it from the run's config.yaml when resuming).
        resume: a run folder to continue from its ``last.pt`` with the epoch, optimizer, scaler, schedule, RNG and
            early-stopping state restored; ``cfg.train.epochs`` may be larger than the original run's.
        report: called on rank 0 after every epoch with the metrics row and the run folder (Ray Tune uses it).

    With ``cfg.train.ddp > 1`` outside torchrun, ``ddp`` local worker processes are started (gloo on CPU, NCCL on
    GPUs) and this returns rank 0's summary.
    """
    if resume is not None:
        cfg = with_out(cfg, resume)
        check_resume_config(cfg, Path(resume))
    if cfg.train.ddp > 1 and not dist.env_info().enabled:
        if report is not None:
            raise FastlesionError("a report callback cannot cross into --ddp worker processes; use torchrun")
        dist.check_world(cfg.train.ddp, resolve_runtime(cfg.train).device.type)
        _prepare_data(cfg)  # check the data (and generate a synthetic set) once, before any folder or worker
        cfg = with_out(cfg, prepare_run_dir(cfg, resume is not None))
        dist.launch(_ddp_entry, (cfg, resume is not None), cfg.train.ddp)
        return json.loads((Path(cfg.run.out) / "summary.json").read_text())
    return run_worker(cfg, resume is not None, report)
