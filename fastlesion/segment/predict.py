"""Segmentation inference: flip test-time augmentation and PNG masks at the image's original size.

The masks are written in the ISIC 2018 Task 1 submission form: one single-channel PNG per image, named
``<image stem>_segmentation.png``, as large as the image, 0 for background and 255 for lesion. The model's
probabilities (at its input size) are resized bilinearly to the original size and then thresholded, so the
outline is smooth rather than a blown-up staircase of input pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fastlesion.engine.runtime import Runtime

MASK_SUFFIX = "_segmentation.png"
"""ISIC 2018 Task 1: ``ISIC_0000000.jpg`` -> ``ISIC_0000000_segmentation.png``."""
_LOGIT_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before going back to logits (|logit| <= 13.8)


def mask_filename(image_path: str | Path) -> str:
    """The submission name of an image's mask: ``<stem>_segmentation.png``."""
    return Path(image_path).stem + MASK_SUFFIX


@torch.no_grad()
def tta_logits(model: nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mask logits (float32, ``N x C x H x W``) from the mean probability over the identity, the horizontal and the
    vertical flip of ``x``, each prediction flipped back onto the original pixels first.

    The mean is taken over sigmoid probabilities (as :func:`fastlesion.engine.loop.predict_logits` averages softmax
    probabilities) and returned as logits, so thresholds, losses and metrics apply unchanged.
    """
    with rt.autocast():
        probs = torch.sigmoid(model(x).float())
        probs = probs + torch.sigmoid(model(x.flip(3)).float()).flip(3)
        probs = probs + torch.sigmoid(model(x.flip(2)).float()).flip(2)
    return torch.logit(probs / 3, eps=_LOGIT_EPS)


@torch.no_grad()
def predict_mask_logits(model: nn.Module, x: torch.Tensor, rt: Runtime, tta: bool = False) -> torch.Tensor:
    """Mask logits in float32: one forward pass, or with ``tta`` the flip mean of :func:`tta_logits`."""
    if tta:
        return tta_logits(model, x, rt)
    with rt.autocast():
        return model(x).float()


def resize_probs(prob_or_logits: torch.Tensor, size: tuple[int, int], from_logits: bool = True) -> torch.Tensor:
    """Lesion probabilities ``H' x W'`` (float32, CPU) of one mask ``1 x H x W`` (or ``H x W``) resized bilinearly
    to ``size`` = ``(width, height)``; ``from_logits`` applies the sigmoid first (resizing probabilities, not
    logits, keeps the 0.5 contour where the probabilities put it)."""
    t = torch.as_tensor(prob_or_logits).detach().float().cpu()
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"one mask must be 1 x H x W or H x W, got shape {tuple(t.shape)}")
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"original size must be (width, height) >= 1, got {size}")
    p = torch.sigmoid(t) if from_logits else t
    if tuple(p.shape) == (h, w):
        return p
    return F.interpolate(p[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def binary_mask(prob_or_logits: torch.Tensor, original_size: tuple[int, int], threshold: float = 0.5,
                from_logits: bool = True) -> np.ndarray:
    """One predicted mask as uint8 0/255 ``height x width`` at ``original_size`` = ``(width, height)``: the
    probabilities resized bilinearly (:func:`resize_probs`), then thresholded."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    p = resize_probs(prob_or_logits, original_size, from_logits=from_logits)
    return np.where(p.numpy() > threshold, 255, 0).astype(np.uint8)


def write_mask(prob_or_logits: torch.Tensor, original_size: tuple[int, int], out_path: str | Path,
               threshold: float = 0.5, from_logits: bool = True) -> Path:
    """Write one predicted mask as a 0/255 single-channel PNG at the image's original size.

    Args:
        prob_or_logits: The model's output for one image, ``1 x H x W`` (or ``H x W``), at the input size.
        original_size: ``(width, height)`` of the original image (PIL's ``Image.size``).
        out_path: The PNG to write (its folder is created); the submission form names it
            ``<image stem>_segmentation.png`` (:func:`mask_filename`).
        threshold: Lesion where the resized probability is above this.
        from_logits: ``prob_or_logits`` holds logits (True) or probabilities in [0, 1] (False).

    Returns:
        ``out_path`` as a Path.
    """
    from PIL import Image

    mask = binary_mask(prob_or_logits, original_size, threshold=threshold, from_logits=from_logits)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(out)  # 2-D uint8: mode L
    return out
