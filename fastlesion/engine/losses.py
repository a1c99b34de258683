"""Losses: cross-entropy (with label smoothing), class-weighted cross-entropy, focal loss; the segmentation losses
(Dice + BCE) live in :mod:`fastlesion.segment.losses`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastlesion.config import SEG_LOSSES, OptimConfig


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C * count_c)`` (1 for every class when balanced)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Multiclass focal loss ``-(1 - p_t) ** gamma * log p_t`` (Lin et al. 2017), mean over the batch."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


def create_loss(cfg: OptimConfig, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    """The training loss of ``optim.loss``: a segmentation loss (dice_bce, dice, bce) takes mask logits and masks."""
    if cfg.loss in SEG_LOSSES:
        from fastlesion.segment.losses import create_seg_loss

        return create_seg_loss(cfg)
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma)
    weight = class_weights(train_labels, num_classes) if cfg.loss == "weighted_ce" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
