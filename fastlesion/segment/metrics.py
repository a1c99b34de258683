"""Segmentation metrics of binary lesion masks: per-image pixel counts, then means over images.

:func:`mask_stats` reduces a batch to four numbers per image (true/false positive/negative pixel counts), so an
evaluation gathers ``4 x N`` numbers across ranks, never masks; :func:`segmentation_metrics` turns the counts of the
whole set into the means over images of (per image, ``tp, fp, fn, tn`` its pixel counts):

- ``dice`` = 2 tp / (2 tp + fp + fn); ``iou`` (Jaccard) = tp / (tp + fp + fn); both 1 when truth and prediction are
  both empty (nothing to find, nothing found) and 0 when only one of them is;
- ``jaccard65``: the ISIC 2018 Task 1 score, the image's IoU where it is at least 0.65 and 0 below;
- ``pixel_accuracy`` = (tp + tn) / all pixels;
- ``sensitivity`` = tp / (tp + fn), over the images that have lesion pixels (undefined for the others);
- ``specificity`` = tn / (tn + fp), over the images that have background pixels.

A mean over no images (an empty set, or sensitivity where no image has a lesion) is NaN. Per-image means follow the
ISIC 2018 challenge (each image weighs the same whatever its lesion's size), not pixel totals over the set.

Example:
    >>> import torch
    >>> masks = torch.zeros(1, 1, 4, 4); masks[..., :2, :] = 1  # 8 lesion pixels
    >>> logits = torch.full((1, 1, 4, 4), -5.0); logits[..., :1, :] = 5  # 4 of them found, nothing else
    >>> m = segmentation_metrics(mask_stats(logits, masks))
    >>> round(m["dice"], 4), m["iou"], m["jaccard65"], m["pixel_accuracy"], m["n"]
    (0.6667, 0.5, 0.0, 0.75, 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fastlesion.metrics import SEG_METRIC_KEYS

JACCARD_THRESHOLD = 0.65
"""ISIC 2018 Task 1: an image whose IoU is below this scores 0 (the challenge's thresholded Jaccard index)."""
STAT_KEYS = ("tp", "fp", "fn", "tn")


def mask_stats(logits: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-image pixel counts of a thresholded prediction against the true masks.

    Args:
        logits: Mask logits ``N x 1 x H x W`` (or ``N x H x W``); a pixel is predicted lesion where
            ``sigmoid(logit) > threshold``.
        masks: True masks of the same shape; lesion where ``> 0.5`` (values in {0, 1}).
        threshold: Probability threshold in (0, 1).

    Returns:
        ``{"tp", "fp", "fn", "tn"}``: 1-D float64 numpy arrays of length N (one copy to the host per call; the
        counting runs on the tensors' device).

    Raises:
        ValueError: Shapes differ or the threshold is outside (0, 1).
    """
    if logits.shape != masks.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} differ in shape")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    n = logits.shape[0]
    pred = (logits.detach().float() > math.log(threshold / (1 - threshold))).reshape(n, -1)  # sigmoid(z) > t
    true = (masks.detach() > 0.5).reshape(n, -1)
    tp = (pred & true).sum(1)
    fp = (pred & ~true).sum(1)
    fn = (~pred & true).sum(1)
    tn = true.shape[1] - tp - fp - fn
    counts = torch.stack([tp, fp, fn, tn]).cpu().numpy().astype(np.float64)  # the one device-to-host copy
    return dict(zip(STAT_KEYS, counts, strict=True))


def concat_stats(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The per-image counts of several batches as one set (in the order given)."""
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) if parts else np.zeros(0)
            for k in STAT_KEYS}


def _ratio(num: np.ndarray, den: np.ndarray, when_empty: float) -> np.ndarray:
    out = np.full(num.shape, when_empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_image_metrics(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each image's value of every :data:`fastlesion.metrics.SEG_METRIC_KEYS` metric (arrays of length N);
    sensitivity is NaN for an image without lesion pixels, specificity for one without background pixels."""
    tp, fp, fn, tn = (np.asarray(stats[k], np.float64).reshape(-1) for k in STAT_KEYS)
    dice = _ratio(2 * tp, 2 * tp + fp + fn, 1.0)
    iou = _ratio(tp, tp + fp + fn, 1.0)
    return {
        "dice": dice,
        "iou": iou,
        "jaccard65": np.where(iou >= JACCARD_THRESHOLD, iou, 0.0),
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn, math.nan),
        "sensitivity": _ratio(tp, tp + fn, math.nan),
        "specificity": _ratio(tn, tn + fp, math.nan),
    }


def segmentation_metrics(stats: Mapping[str, np.ndarray]) -> dict[str, float | int]:
    """Means over images of the per-image metrics of :func:`per_image_metrics`.

    Args:
        stats: Per-image counts ``{"tp", "fp", "fn", "tn"}`` of the whole set (:func:`mask_stats`, concatenated).

    Returns:
        ``{dice, iou, jaccard65, pixel_accuracy, sensitivity, specificity}`` as floats (NaN where no image has the
        metric defined) and ``n``, the number of images.
    """
    per = per_image_metrics(stats)
    n = len(per["dice"])
    out: dict[str, float | int] = {}
    for k in SEG_METRIC_KEYS:
        v = per[k][~np.isnan(per[k])]
        out[k] = float(v.mean()) if len(v) else math.nan
    out["n"] = n
    return out
