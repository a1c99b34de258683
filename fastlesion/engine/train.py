"""``train(cfg) -> dict``: the one training entry that the CLI, Ray Tune trials, benchmarks and tests call.

The story, top to bottom (read it in this order):

1. :func:`train` — checks a resume, then either starts ``--ddp`` workers (the dataset prepared once, here, and
   handed to them) or runs this process as the only worker;
2. :func:`run_worker` — one process: join the process group, prepare the dataset (rank 0, shared with the others),
   build the :class:`~fastlesion.engine.state.Session`, restore it when resuming, then :func:`fit`;
3. :func:`build_session` — model through :func:`~fastlesion.engine.runtime.wrap_model`, loaders, optimizer, loss;
4. :func:`fit` — the epoch loop: set epoch, train one epoch, evaluate, record, stop early.

Everything written to disk (config.yaml, metrics.csv, best.pt / last.pt, predictions, plots, summary.json) and
every line printed goes through :class:`~fastlesion.engine.rundir.RunDir`, which is a no-op on ranks other than 0.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastlesion import dist
from fastlesion.config import Config, replace
from fastlesion.data.catalog import load_dataset
from fastlesion.data.loader import build_loader
from fastlesion.data.splits import add_extra_train, split_dataset
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.loop import EpochResult, EvalResult, NonFiniteLossError, train_epoch
from fastlesion.engine.losses import create_loss
from fastlesion.engine.optim import Plateau, create_optimizer, set_lr
from fastlesion.engine.progress import EpochBar
from fastlesion.engine.rundir import METRIC_COLUMNS, ReportFn, RunDir, check_resume, oversample_line
from fastlesion.engine.runtime import Runtime, resolve_runtime, wrap_model
from fastlesion.engine.state import EarlyStop, Session, TrainData, early_stop_mode, restore
from fastlesion.engine.tasks import SegEvalResult, get_task
from fastlesion.errors import FastlesionError

__all__ = ["METRIC_COLUMNS", "build_session", "early_stop_mode", "fit", "oversample_line", "prepare_data",
           "run_worker", "train"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(cfg: Config) -> TrainData:
    """Load the dataset (generating the synthetic set on first use), drop excluded files, split it (writing the
    folds file on first use). Done once per run: by the ``--ddp`` launcher, or by rank 0 for every rank."""
    ds = load_dataset(cfg.data, task=cfg.train.task, progress=not cfg.run.quiet)
    return TrainData(ds=ds, split=add_extra_train(split_dataset(ds, cfg.data), ds, cfg.data))


# --------------------------------------------------------------------------------------------------- one process
def build_session(cfg: Config, info: dist.DistInfo, rt: Runtime, data: TrainData,
                  resume_state: dict[str, Any] | None = None) -> Session:
    """Model, EMA, loaders, optimizer, scaler, loss and schedule state of one process. ``resume_state`` (a last.pt)
    replaces the starting weights, so they are not loaded; the network takes its shape (a pruned one's) from it."""
    from fastlesion.models import count_params, create_model, model_task
    from fastlesion.prune import apply_checkpoint_structure

    seed_everything(cfg.train.seed)  # before create_model: the initial weights are the seed's
    m, resume, task = cfg.model, resume_state is not None, get_task(cfg.train.task)
    if model_task(m.name) != task.name:
        raise FastlesionError(f"model.name: {m.name!r} is a {model_task(m.name)} model, but train.task is "
                              f"{task.name} (`fastlesion models` lists both kinds)")
    raw = create_model(m.name, num_classes=task.outputs(data.ds.num_classes), drop_rate=m.drop_rate,
                       drop_path_rate=m.drop_path_rate,
                       pretrained_path=None if resume else m.pretrained_path, pretrained=m.pretrained and not resume,
                       pretrained_strict=m.pretrained_strict)
    if resume:
        apply_checkpoint_structure(raw, resume_state)  # before wrapping: compile and DDP see the final shapes
    net = wrap_model(raw, rt, ddp=info.enabled)
    shard = {"rank": info.rank, "world_size": info.world_size, "device": rt.device, "channels_last": rt.channels_last}
    train_loader = build_loader(data.split.train, cfg.loader, cfg.data.image_size, train=True, **shard)
    val_loader = build_loader(data.split.val, cfg.loader, cfg.data.image_size, train=False, **shard)
    steps = len(train_loader) if cfg.train.steps_per_epoch is None else min(len(train_loader),
                                                                            cfg.train.steps_per_epoch)
    mode = early_stop_mode(cfg)
    optimizer = create_optimizer(net.raw, cfg.optim, fine_tune=m.freeze_epochs > 0)
    return Session(cfg=cfg, info=info, rt=rt, data=data, net=net, optimizer=optimizer,
                   scaler=rt.grad_scaler(), loss_fn=create_loss(cfg.optim, train_loader.labels,
                                                                data.ds.num_classes).to(rt.device),
                   train_loader=train_loader, val_loader=val_loader, steps_per_epoch=steps,
                   ema=ckpt.Ema(net.raw, cfg.optim.ema_decay) if cfg.optim.ema else None,
                   plateau=Plateau(mode, cfg.optim.plateau_patience, cfg.optim.gamma),
                   early=EarlyStop(mode, cfg.train.patience, min_delta=cfg.train.min_delta),
                   params=count_params(net.raw))


def train_one_epoch(s: Session, epoch: int, progress: EpochBar,
                    on_loss: Callable[[float], None] | None = None) -> EpochResult:
    """:func:`~fastlesion.engine.loop.train_epoch` with the run's settings; after every optimizer step the next lr
    is set and the EMA updated; ``on_loss`` gets the loss at the loop's loss reads (:meth:`RunDir.step_hook`)."""
    def after_step() -> None:
        s.global_step += 1
        set_lr(s.optimizer, s.current_lr())
        if s.ema is not None:
            s.ema.update(s.net.raw)

    return train_epoch(s.net.model, s.train_loader, s.loss_fn, s.optimizer, s.scaler, s.rt, epoch,
                       accum=s.cfg.optim.grad_accum, clip_grad=s.cfg.optim.clip_grad, max_steps=s.steps_per_epoch,
                       on_optimizer_step=after_step, progress=progress, world_size=s.info.world_size,
                       on_loss=on_loss)


def epoch_row(s: Session, epoch: int, lr: float, tr: EpochResult, res: EvalResult | SegEvalResult,
              seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``metrics.csv`` row of an epoch and its full metrics (with the confusion matrix).

    Refuses a diverged model (NaN/inf validation loss) before anything could save it as best.pt or last.pt.
    """
    cells, m = s.task.metrics(res, s.classes)
    row = {"epoch": epoch, "train_loss": tr.loss, "val_loss": res.loss, "lr": lr,
           **{f"val_{k}": v for k, v in cells.items()},
           "epoch_seconds": seconds, "train_seconds": tr.seconds, "val_seconds": res.seconds,
           "data_seconds": tr.data_seconds, "images_per_s": tr.images / max(tr.seconds, 1e-9), "steps": tr.steps}
    if not math.isfinite(res.loss):
        kept = f"last.pt holds the last good epoch ({s.epoch})" if s.epoch else "no checkpoint was written"
        raise NonFiniteLossError(f"validation loss is {res.loss} at epoch {epoch}: the weights diverged; stopped "
                                 f"(lower optim.lr, set optim.clip_grad, or try train.amp=bf16); {kept}")
    metric = s.cfg.train.early_stop_metric
    if metric not in row:  # e.g. val_specificity of a multiclass model
        choices = ", ".join(k for k in row if k.startswith("val_"))
        raise FastlesionError(f"train.early_stop_metric: {metric!r} is not computed for this {s.task.name} run "
                              f"({len(s.classes)} classes; choose from {choices})")
    return row, m


def fit(s: Session, run: RunDir, resumed: bool = False) -> dict[str, Any]:
    """The epoch loop, from ``s.epoch`` (0, or the resumed epoch) to ``train.epochs``; returns the summary."""
    cfg, metric = s.cfg, s.cfg.train.early_stop_metric
    s.train_loader.set_epoch(s.epoch + 1)  # the first epoch's order, so that run.start can show its class ratio
    run.start(s, resumed)
    set_lr(s.optimizer, s.current_lr())
    stopped_early = False
    s.start_clock()  # train_seconds adds to the time a resumed run's last.pt recorded
    for epoch in range(s.epoch + 1, cfg.train.epochs + 1):
        s.train_loader.set_epoch(epoch)
        s.freeze_for(epoch)  # model.freeze_epochs: the head alone first, then the whole model
        lr, t0 = s.current_lr(), time.perf_counter()
        with EpochBar(epoch, cfg.train.epochs, s.steps_per_epoch, enabled=run.shows_progress) as bar:
            tr = train_one_epoch(s, epoch, bar, run.step_hook(s))
        res = s.task.evaluate(s.ema.module if s.ema else s.net.eval_model, s.val_loader, s.rt, cfg)  # each image once
        row, m = epoch_row(s, epoch, lr, tr, res, time.perf_counter() - t0)
        improved = s.early.update(float(row[metric]), epoch)
        if cfg.optim.scheduler == "plateau":
            s.plateau.update(float(row[metric]))
        s.rows.append(row)
        s.epoch = epoch
        run.record(s, row, m, res, improved)
        if s.early.should_stop and epoch < cfg.train.epochs:
            stopped_early = True
            run.log(f"early stop: {metric} did not improve for {s.early.patience} epochs "
                    f"(best {s.early.best:.4f} at epoch {s.early.best_epoch})")
            break
    return run.finish(s, stopped_early, s.train_seconds())


def run_worker(cfg: Config, data: TrainData | None = None, resume: bool = False, report: ReportFn | None = None,
               prepared: bool = False) -> dict[str, Any]:
    """The body of one process (single process, a ``--ddp`` worker, or a torchrun rank).

    Args:
        data: the prepared dataset (``--ddp``: the launcher's); None: rank 0 prepares it and shares it.
        prepared: the launcher already made (and locked) ``cfg.run.out`` (``--ddp``), so the workers only use it.
    """
    rt = resolve_runtime(cfg.train, dist.env_info().local_rank)
    info = dist.setup(rt.device.type)
    owned = None  # the folder RunDir.prepare locked for this process: unlocked however the run ends
    try:
        # rank 0 checks the dataset (generating the synthetic set, writing the folds file) before any folder is
        # made and hands the split to the others: every rank trains on the very same split
        if data is None:
            data = dist.on_main(info, lambda: prepare_data(cfg))
        out = cfg.run.out if prepared else dist.on_main(info, lambda: str(RunDir.prepare(cfg, resume)))
        owned = None if prepared else out
        cfg = replace(cfg, **{"run.out": str(out)})
        with RunDir(out, active=info.is_main, report=report, quiet=cfg.run.quiet) as run:  # closes the trackers
            last = ckpt.load(run.path / "last.pt") if resume else None
            s = build_session(cfg, info, rt, data, resume_state=last)
            if last is not None:
                restore(s, last)
            return fit(s, run, resumed=resume)
    finally:
        RunDir.release(owned)
        dist.teardown()


def _ddp_entry(cfg: Config, data: TrainData, resume: bool) -> None:
    run_worker(cfg, data, resume, prepared=True)


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
        cfg = replace(cfg, **{"run.out": str(resume)})
        check_resume(cfg, Path(resume))
    if cfg.train.ddp > 1 and not dist.env_info().enabled:
        if report is not None:
            raise FastlesionError("a report callback cannot cross into --ddp worker processes; use torchrun")
        dist.check_world(cfg.train.ddp, resolve_runtime(cfg.train).device.type)
        data = prepare_data(cfg)  # once, before any folder or worker: the workers get it with their arguments
        cfg = replace(cfg, **{"run.out": str(RunDir.prepare(cfg, resume is not None))})
        try:  # the launcher holds the folder's lock for its workers
            dist.launch(_ddp_entry, (cfg, data, resume is not None), cfg.train.ddp)
        finally:
            RunDir.release(cfg.run.out)
        return RunDir(cfg.run.out).read_summary()
    return run_worker(cfg, resume=resume is not None, report=report)
