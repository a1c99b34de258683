"""Optimizers, a pure learning-rate schedule and the reduce-on-plateau state.

The schedule is a pure function of the step (``lr_at``); reduce-on-plateau multiplies it by a factor kept in
:class:`Plateau`, whose state goes into checkpoints. Each parameter group carries an ``lr_mult`` (the body's
``optim.backbone_lr_mult``, 1 for the head) that :func:`set_lr` applies, so the schedule scales every group alike
and the body-to-head ratio holds at every step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastlesion.config import OptimConfig


def _decay_groups(params: list[nn.Parameter], weight_decay: float, no_decay_norm_bias: bool,
                  lr_mult: float) -> list[dict]:
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay, "lr_mult": lr_mult}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "lr_mult": lr_mult},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": lr_mult}]


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool,
                 backbone_lr_mult: float | None = None) -> list[dict]:
    """Decayed weights, and (optionally) norms and biases (ndim <= 1) without weight decay.

    With ``backbone_lr_mult`` (a fine-tuning run: ``optim.backbone_lr_mult != 1`` or ``model.freeze_epochs > 0``)
    these groups are made for the body (``lr_mult = backbone_lr_mult``) and for the classifier head
    (``lr_mult = 1``) apart, body first (:func:`fastlesion.models.split_head`); empty groups are left out. Every
    parameter is listed, also one frozen at the time (a frozen parameter gets no gradient, so the optimizer leaves it
    and its state alone until it is unfrozen); without it only those that require gradients, as always.
    """
    if backbone_lr_mult is None:
        params = [p for p in model.parameters() if p.requires_grad]
        return _decay_groups(params, weight_decay, no_decay_norm_bias, 1.0)
    from fastlesion.models import split_head

    body, head = split_head(model)
    groups = [*_decay_groups(body, weight_decay, no_decay_norm_bias, backbone_lr_mult),
              *_decay_groups(head, weight_decay, no_decay_norm_bias, 1.0)]
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module, cfg: OptimConfig, fine_tune: bool = False) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s parameters; ``fine_tune`` splits body and head (see :func:`param_groups`),
    which is implied by ``optim.backbone_lr_mult != 1``."""
    split = fine_tune or cfg.backbone_lr_mult != 1.0
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias,
                          cfg.backbone_lr_mult if split else None)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, alpha=0.9, eps=1e-3)


def lr_at(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate at optimizer ``step`` (0-based) for the step-wise schedules (pure function).

    * cosine — linear warmup over ``warmup_epochs``, then cosine to ``lr * min_lr_ratio``;
    * onecycle — ramp from lr/25 to lr over the first 30 %, cosine down to lr/1e4 (torch's OneCycleLR shape);
    * step — ``lr * gamma ** (epoch // step_epochs)``;
    * constant / plateau — ``lr`` (plateau multiplies it by :class:`Plateau`'s factor).
    """
    total = max(1, steps_per_epoch * epochs)
    base = cfg.lr
    if cfg.scheduler == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)
        if step < warm:
            return base * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        floor = base * cfg.min_lr_ratio
        return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t))
    if cfg.scheduler == "onecycle":
        up = max(1, int(0.3 * total))
        if step < up:
            return base / 25 + (base - base / 25) * step / up
        t = min(1.0, (step - up) / max(1, total - up))
        return base / 1e4 + 0.5 * (base - base / 1e4) * (1 + math.cos(math.pi * t))
    if cfg.scheduler == "step":
        return base * cfg.gamma ** ((step // max(1, steps_per_epoch)) // max(1, cfg.step_epochs))
    return base


@dataclass
class Plateau:
    """Reduce-on-plateau state: multiply the lr by ``gamma`` after ``patience`` epochs without improvement."""

    mode: str = "max"
    patience: int = 2
    gamma: float = 0.1
    factor: float = 1.0
    best: float | None = None
    bad_epochs: int = 0

    def update(self, value: float) -> None:
        if value != value:  # NaN: no information this epoch
            return
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.factor *= self.gamma
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the schedule's ``lr``: each group gets ``lr * lr_mult`` (1 for groups without one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
