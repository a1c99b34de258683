"""Validation images with the true lesion outline (green) and the predicted one (magenta).

The outlines are drawn into the pixels (a mask minus its 4-neighbour erosion, thickened to stay visible on large
images), so the figure shows exactly the pixels scored, at the size they were scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastlesion.report import _pyplot, _save

TRUE_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 255)


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(mask: Any) -> np.ndarray:
    """``H x W`` bool of a mask given as bool, {0, 1}, {0, 255} or probabilities (``> 0.5``); ``1 x H x W`` too."""
    m = _array(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"a mask must be H x W (or 1 x H x W), got shape {m.shape}")
    if m.dtype == bool:
        return m
    return m > (127 if m.dtype == np.uint8 and m.max(initial=0) > 1 else 0.5)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a bool mask: the mask minus its erosion by a 4-neighbour cross, applied ``width``
    times (pixels on the image border count as boundary)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, mask: Any, pred: Any, width: int | None = None) -> np.ndarray:
    """``image`` (uint8 ``H x W x 3``) with the outline of ``mask`` in green and of ``pred`` in magenta (drawn last:
    where the two coincide, magenta). ``width`` = outline thickness in pixels (None: 1 per 128 pixels of the
    shorter side, at least 1)."""
    img = _array(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"an image must be H x W x 3, got shape {img.shape}")
    img = img.astype(np.uint8, copy=True)
    true, predicted = _binary(mask), _binary(pred)
    for m in (true, predicted):
        if m.shape != img.shape[:2]:
            raise ValueError(f"mask of shape {m.shape} does not fit the {img.shape[1]}x{img.shape[0]} image")
    w = width or max(1, min(img.shape[:2]) // 128)
    img[outline(true, w)] = TRUE_COLOR
    img[outline(predicted, w)] = PRED_COLOR
    return img


def plot_overlays(images: Any, masks: Any, preds: Any, out_png: str | Path, titles: Sequence[str] | None = None,
                  max_images: int = 8, columns: int = 4) -> Path:
    """A grid of images with the true (green) and predicted (magenta) lesion outlines, written to ``out_png``.

    Args:
        images: uint8 ``N x H x W x 3`` (a list of such images of different sizes works too).
        masks: True masks ``N x H x W`` (or ``N x 1 x H x W``): bool, {0, 1}, {0, 255} or probabilities.
        preds: Predicted masks, the same forms (probabilities are thresholded at 0.5).
        out_png: The PNG to write (its folder is created).
        titles: One line above each image (e.g. its name and Dice); None = none.
        max_images: At most this many images (the first ones).
        columns: Images per row.

    Returns:
        ``out_png`` as a Path.
    """
    n = min(len(images), max_images)
    if len(masks) < n or len(preds) < n or (titles is not None and len(titles) < n):
        raise ValueError(f"{n} images need as many masks, predictions and titles; got {len(masks)}, {len(preds)} "
                         f"and {'no' if titles is None else len(titles)} titles")
    plt = _pyplot()
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(overlay(images[k], masks[k], preds[k]), interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle("lesion outlines: green = truth, magenta = prediction", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)
