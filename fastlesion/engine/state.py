"""What a training run holds in memory (:class:`Session`) and the checkpoint form of it.

:class:`Session` is built once by :func:`fastlesion.engine.train.build_session`; the epoch loop mutates its counters
(``epoch``, ``global_step``, ``rows``) and the objects it holds. :func:`checkpoint_state` and :func:`restore` are the
two directions between a session and a ``last.pt`` / ``best.pt``: everything ``--resume`` needs to continue as if
never stopped (model, optimizer, scaler, schedule, early stopping, EMA, epoch, RNG, training time so far).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastlesion import dist
from fastlesion.config import Config, to_dict
from fastlesion.data.catalog import Dataset
from fastlesion.data.loader import Loader
from fastlesion.data.splits import Split
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.optim import Plateau, lr_at
from fastlesion.engine.runtime import Runtime, WrappedModel, wrap_model
from fastlesion.errors import FastlesionError


@dataclass
class TrainData:
    """The dataset of a run, loaded, filtered and split once per process (or once for all ``--ddp`` workers)."""

    ds: Dataset
    split: Split


@dataclass
class EarlyStop:
    """Best value of the watched metric, its epoch, and epochs since it improved.

    An epoch improves when its value beats the best by more than ``min_delta`` (``train.min_delta``): above
    ``best + min_delta`` when maximising, below ``best - min_delta`` when minimising. The first epoch is always the
    best so far; a NaN value never improves, and a NaN best is replaced by the first real value.
    """

    mode: str = "max"
    patience: int = 5
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0
    min_delta: float = 0.0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if math.isnan(value):
            return False
        if math.isnan(self.best):
            return True
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value``; True when it is a new best (the first epoch always is)."""
        if self.best_epoch == 0 or self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience


def early_stop_mode(cfg: Config) -> str:
    """``train.early_stop_mode`` with ``auto`` resolved: a loss is minimised, every other metric maximised."""
    mode = cfg.train.early_stop_mode
    if mode == "auto":
        return "min" if cfg.train.early_stop_metric.endswith("loss") else "max"
    return mode


@dataclass
class Session:
    """Everything a training run holds; built by :func:`fastlesion.engine.train.build_session`."""

    cfg: Config
    info: dist.DistInfo
    rt: Runtime
    data: TrainData
    net: WrappedModel  # raw module, the training view (compiled / DDP) and the evaluation view
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: Loader
    val_loader: Loader
    steps_per_epoch: int
    ema: ckpt.Ema | None = None
    plateau: Plateau = field(default_factory=Plateau)
    early: EarlyStop = field(default_factory=EarlyStop)
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    rows: list[dict] = field(default_factory=list)  # metrics.csv so far
    params: int = 0
    seconds_before: float = 0.0  # training time of the run's earlier processes (restored from last.pt)
    clock: float | None = None  # perf_counter() when this process's epoch loop started (start_clock)
    frozen: bool = False  # the body is frozen (model.freeze_epochs): only the classifier head trains

    @property
    def classes(self) -> list[str]:
        return list(self.data.ds.classes)

    @property
    def task(self):
        """The run's :class:`~fastlesion.engine.tasks.Task` (``train.task``)."""
        from fastlesion.engine.tasks import get_task

        return get_task(self.cfg.train.task)

    def start_clock(self) -> None:
        self.clock = time.perf_counter()

    def train_seconds(self) -> float:
        """Seconds of training so far, over every process of the run (a resume adds to what last.pt recorded)."""
        return self.seconds_before + (time.perf_counter() - self.clock if self.clock is not None else 0.0)

    def freeze_for(self, epoch: int) -> None:
        """``model.freeze_epochs``: epochs 1..N train only the classifier head, later ones the whole model.

        The body's parameters stay in the optimizer and only stop requiring gradients: a parameter without a
        gradient is skipped by every optimizer (no weight decay, no momentum or Adam moments), so the frozen body
        does not move and its optimizer state starts fresh when it is unfrozen. The state follows from the epoch
        alone, so a resumed run freezes or unfreezes exactly as the uninterrupted one. Batch-norm statistics of the
        body keep updating in the frozen epochs (the model stays in train mode). Under DDP the wrapper is built
        again on a change: DDP reduces the gradients of the parameters that required them when it was built.
        """
        frozen = epoch <= self.cfg.model.freeze_epochs
        if frozen == self.frozen:
            return
        from fastlesion.models import split_head

        for p in split_head(self.net.raw)[0]:
            p.requires_grad_(not frozen)
        self.frozen = frozen
        if self.info.enabled:
            self.net = wrap_model(self.net.raw, self.rt, ddp=True)

    def current_lr(self) -> float:
        """The schedule's lr at the current optimizer step (``plateau`` scales it)."""
        opt_steps_per_epoch = -(-self.steps_per_epoch // self.cfg.optim.grad_accum)
        return lr_at(self.global_step, self.cfg.optim, opt_steps_per_epoch, self.cfg.train.epochs) * \
            self.plateau.factor


def checkpoint_state(s: Session, metrics: dict | None = None) -> dict[str, Any]:
    """The checkpoint dict of a session: raw weights (no compile/DDP prefixes), optimizer, schedule, RNG, config."""
    return {"model": ckpt.unwrap(s.net.raw).state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "plateau": s.plateau.state_dict(), "early": vars(s.early).copy(),
            "ema": s.ema.module.state_dict() if s.ema else None, "epoch": s.epoch, "global_step": s.global_step,
            "rng": ckpt.rng_state(), "classes": s.classes, "model_name": s.cfg.model.name,
            "config": to_dict(s.cfg), "metrics": metrics or {}, "rows": s.rows, "train_seconds": s.train_seconds(),
            # a run started from a structurally pruned model (``--pretrained DIR/best.pt``) stays rebuildable
            "pruned_structure": getattr(s.net.raw, "fastlesion_pruned_structure", None)}


def restore(s: Session, state: dict[str, Any]) -> None:
    """Continue from a ``last.pt``: model, optimizer, scaler, schedule, early stopping, EMA, epoch, RNG."""
    if state.get("classes") != s.classes:
        raise FastlesionError(f"checkpoint classes {state.get('classes')} do not match the dataset's {s.classes}")
    s.net.raw.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    s.plateau.load_state_dict(state["plateau"])
    for k, v in state["early"].items():
        setattr(s.early, k, v)
    if s.ema is not None and state.get("ema") is not None:
        s.ema.module.load_state_dict(state["ema"])
    s.epoch, s.global_step, s.rows = int(state["epoch"]), int(state["global_step"]), list(state.get("rows", []))
    # a last.pt written before train_seconds was kept: its epochs' own durations
    s.seconds_before = float(state.get("train_seconds", sum(float(r.get("epoch_seconds", 0.0)) for r in s.rows)))
    ckpt.set_rng_state(state["rng"])
