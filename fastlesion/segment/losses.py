"""Segmentation losses: soft Dice, binary cross-entropy and their weighted sum, on mask logits.

Example:
    >>> import torch
    >>> loss = DiceBCELoss(dice_weight=0.5)
    >>> masks = torch.zeros(2, 1, 8, 8); masks[:, :, 2:6, 2:6] = 1
    >>> float(loss(masks * 20 - 10, masks)) < 0.05  # confident and right: near 0
    True

The Dice term is the soft Dice of each image, ``1 - (2 * sum(p * m) + 1) / (sum(p) + sum(m) + 1)`` with ``p`` the
sigmoid of the logits, averaged over the images of the batch; the BCE term is the mean over pixels. Both are computed
in float32 whatever the autocast dtype. With the smoothing constant 1 an image without lesion pixels is defined too:
its Dice loss is ``sum(p) / (sum(p) + 1)``, which pushes false positives down. segmentation-models-pytorch's
``DiceLoss(mode="binary")`` is not used: it pools the whole batch into one Dice (a large lesion outweighs a small
one) and sets the Dice loss of a batch without lesion pixels to 0; on one image with a lesion it equals this one
with its ``smooth=0.5`` (tested). A batch's loss is the mean of :func:`per_image_seg_loss`, the very definition
validation averages over images, so ``train_loss`` and ``val_loss`` are comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlesion.config import SEG_LOSSES, OptimConfig
from fastlesion.errors import ConfigError

DICE_SMOOTH = 1.0
"""Added to the numerator and denominator of the soft Dice (an empty mask predicted empty scores 1, not 0/0)."""


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Per-image soft Dice loss ``[N]`` of logits and {0, 1} masks of the same shape (``N x 1 x H x W``), float32."""
    p = torch.sigmoid(logits.float().flatten(1))
    m = masks.float().flatten(1)
    return 1 - (2 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)


def per_image_seg_loss(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """``dice_weight * soft Dice loss + (1 - dice_weight) * mean pixel BCE`` of each image ``[N]``, in float32."""
    logits, masks = logits.float(), masks.float()
    total = torch.zeros(logits.shape[0], device=logits.device)
    if dice_weight > 0:
        total = total + dice_weight * soft_dice_loss(logits, masks)
    if dice_weight < 1:
        bce = F.binary_cross_entropy_with_logits(logits.flatten(1), masks.flatten(1), reduction="none").mean(1)
        total = total + (1 - dice_weight) * bce
    return total


class DiceBCELoss(nn.Module):
    """``dice_weight * Dice + (1 - dice_weight) * BCEWithLogits``, the mean over the batch's images.

    ``dice_weight`` 1 is the Dice loss alone, 0 the BCE alone (then the term not used is not computed).

    Args:
        dice_weight: Share of the Dice term, in [0, 1].
    """

    def __init__(self, dice_weight: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= dice_weight <= 1.0:
            raise ConfigError(f"optim.dice_weight must be in [0, 1], got {dice_weight}")
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Scalar float32 loss of mask logits and masks (both ``N x 1 x H x W``; masks in {0, 1})."""
        if logits.shape != masks.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} differ in shape")
        with torch.autocast(logits.device.type, enabled=False):
            return per_image_seg_loss(logits, masks, self.dice_weight).mean()

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}"


def loss_dice_weight(loss: str, dice_weight: float) -> float:
    """The Dice share of a segmentation ``optim.loss``: ``dice`` 1, ``bce`` 0, ``dice_bce`` ``dice_weight``."""
    return {"dice": 1.0, "bce": 0.0}.get(loss, dice_weight)


def create_seg_loss(cfg: OptimConfig) -> nn.Module:
    """The training loss of a segmentation ``optim.loss``: ``dice_bce`` (weighted by ``optim.dice_weight``), ``dice``
    or ``bce``, taking ``(logits N x 1 x H x W, masks N x 1 x H x W float in {0, 1})``.

    Raises:
        ConfigError: ``optim.loss`` is not a segmentation loss.
    """
    if cfg.loss not in SEG_LOSSES:
        raise ConfigError(f"optim.loss: {cfg.loss!r} is not a segmentation loss; choose from {SEG_LOSSES}")
    return DiceBCELoss(loss_dice_weight(cfg.loss, cfg.dice_weight))
