"""What differs between the two tasks, in one place: ``train.task`` = ``classification`` | ``segmentation``.

The epoch loop, the run folder, checkpoints, early stopping, DDP and the trackers are shared. A :class:`Task` says
what a task's model outputs, how its validation set is evaluated (every image exactly once, over all ranks), which
``val_*`` columns its ``metrics.csv`` has and what it writes next to them. Registry, not if/elif chains:
:data:`TASKS` maps the config's name to the object, :func:`get_task` looks it up.

Segmentation (binary lesion masks): the model maps ``N x 3 x S x S`` to logits ``N x 1 x S x S``; the loader yields
``(images, masks, idx)`` with masks ``N x 1 x S x S`` in {0, 1}; the validation metrics are means over images of
per-image values (:data:`fastlesion.metrics.SEG_METRIC_KEYS`), computed at the model's input size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fastlesion import dist
from fastlesion.engine.loop import EvalResult, evaluate
from fastlesion.engine.runtime import Runtime
from fastlesion.metrics import SEG_METRIC_KEYS, SEG_VAL_METRICS, VAL_METRICS

OVERLAY_IMAGES = 8
"""Validation images kept (rank 0's first) for ``plots/overlays.png``."""


# --------------------------------------------------------------------------------------------------- segmentation
@dataclass
class SegEvalResult:
    """A segmentation evaluation: per-image pixel counts (rows ordered by table index) and the mean per-image loss."""

    stats: dict[str, np.ndarray]  # "tp", "fp", "fn", "tn": [N] each
    idx: np.ndarray  # [N] row indices into the evaluated table
    loss: float
    seconds: float
    losses: np.ndarray | None = None  # [N] per-image loss
    samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # images uint8 NHWC, masks NHW, probs NHW


def _uint8_images(x: torch.Tensor) -> np.ndarray:
    """Normalised ``N x 3 x H x W`` back to uint8 ``N x H x W x 3`` (for the overlay plot)."""
    from fastlesion.data.transforms import MEAN, STD

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    img = (x.float().cpu() * std + mean).clamp(0, 1) * 255
    return img.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, rt: Runtime, tta: bool = False, dice_weight: float = 0.5,
                          keep: int = OVERLAY_IMAGES) -> SegEvalResult:
    """Score every validation image on every rank and gather the per-image counts (each image counted once).

    Only per-image numbers cross between ranks (4 counts and a loss per image), never masks. All ranks return the
    same result; ``samples`` (for the overlay plot) holds this rank's first ``keep`` images.
    """
    from fastlesion.segment.losses import per_image_seg_loss
    from fastlesion.segment.metrics import mask_stats
    from fastlesion.segment.predict import predict_mask_logits

    model.eval()
    t0 = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tp", "fp", "fn", "tn", "loss", "idx")}
    samples = None
    for x, m, i in loader:
        logits = predict_mask_logits(model, x, rt, tta)
        stats = mask_stats(logits, m)
        for k in ("tp", "fp", "fn", "tn"):
            parts[k].append(_numpy(stats[k]))
        parts["loss"].append(per_image_seg_loss(logits, m, dice_weight).cpu().numpy().astype(np.float64))
        parts["idx"].append(_numpy(i).astype(np.int64))
        if samples is None and keep:
            samples = (_uint8_images(x[:keep]), m[:keep, 0].cpu().numpy() > 0.5,
                       torch.sigmoid(logits[:keep, 0]).cpu().numpy())
    local = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    gathered = dist.all_gather_objects(local)
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in local}
    idx, first = np.unique(merged["idx"].astype(np.int64), return_index=True)  # drop padded duplicates
    losses = merged["loss"][first]
    return SegEvalResult(stats={k: merged[k][first] for k in ("tp", "fp", "fn", "tn")}, idx=idx,
                         loss=float(losses.mean()) if len(losses) else math.nan, losses=losses,
                         seconds=time.perf_counter() - t0, samples=samples)


def _numpy(v: Any) -> np.ndarray:
    if torch.is_tensor(v):
        return v.detach().cpu().double().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    return np.asarray(v)


# --------------------------------------------------------------------------------------------------- the tasks
class Task:
    """Hooks of one task; :class:`Classification` and :class:`Segmentation` fill them."""

    name = ""
    val_metrics: tuple[str, ...] = ()  # the val_* columns of metrics.csv (val_loss stands before them)
    headline: tuple[str, ...] = ()  # summary keys printed at the end of a run

    def outputs(self, num_classes: int) -> int:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, rt: Runtime, cfg, tta: bool = False):
        raise NotImplementedError

    def metrics(self, res, classes: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
        """``(metrics.csv cells without the val_ prefix, the full metrics kept in best.pt)``."""
        raise NotImplementedError

    def predictions(self, table: pd.DataFrame, res, classes: list[str]) -> pd.DataFrame:
        raise NotImplementedError

    def best_extras(self, res) -> dict[str, Any]:
        """What best.pt keeps besides the weights, to draw the plots again after a resume."""
        return {}

    def on_best(self, out: Path, res, plots: bool) -> None:
        """Files written when an epoch improves on the best (after best.pt)."""


class Classification(Task):
    name = "classification"
    val_metrics = VAL_METRICS
    headline = ("val_auc", "val_accuracy")

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def evaluate(self, model: nn.Module, loader, rt: Runtime, cfg, tta: bool = False) -> EvalResult:
        return evaluate(model, loader, rt, tta=tta)

    def metrics(self, res: EvalResult, classes: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
        from fastlesion.metrics import classification_metrics, per_class_metrics

        m = classification_metrics(res.labels, res.probs, classes)
        cells = {k: v for k, v in m.items() if k not in ("confusion", "n")}
        return {**cells, **per_class_metrics(res.labels, res.probs, classes)}, m

    def predictions(self, table: pd.DataFrame, res: EvalResult, classes: list[str]) -> pd.DataFrame:
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

    def best_extras(self, res: EvalResult) -> dict[str, Any]:
        # best.pt keeps the best epoch's labels and probabilities: a resumed run draws the same roc.png
        return {"val_labels": torch.as_tensor(np.asarray(res.labels)),
                "val_probs": torch.as_tensor(np.asarray(res.probs))}


class Segmentation(Task):
    name = "segmentation"
    val_metrics = SEG_VAL_METRICS
    headline = ("val_dice", "val_iou", "val_jaccard65")

    def outputs(self, num_classes: int) -> int:
        return 1  # one lesion-vs-background logit per pixel

    def evaluate(self, model: nn.Module, loader, rt: Runtime, cfg, tta: bool = False) -> SegEvalResult:
        from fastlesion.segment.losses import loss_dice_weight

        return evaluate_segmentation(model, loader, rt, tta=tta,
                                     dice_weight=loss_dice_weight(cfg.optim.loss, cfg.optim.dice_weight))

    def metrics(self, res: SegEvalResult, classes: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
        from fastlesion.segment.metrics import segmentation_metrics

        m = segmentation_metrics(res.stats)
        return {k: float(m[k]) for k in SEG_METRIC_KEYS}, dict(m)

    def predictions(self, table: pd.DataFrame, res: SegEvalResult, classes: list[str]) -> pd.DataFrame:
        """One row per evaluated image: its paths, Dice, IoU, thresholded Jaccard and loss (worst cases first to
        look at: sort by ``iou``)."""
        rows = table.iloc[res.idx]
        df = pd.DataFrame({"path": rows["path"].values, "mask": rows["mask"].values})
        for col in ("image_name", "group"):
            if col in rows.columns:
                df[col] = rows[col].values
        from fastlesion.segment.metrics import per_image_metrics

        scores = per_image_metrics(res.stats)
        for k in ("dice", "iou", "jaccard65"):
            df[k] = scores[k]
        if res.losses is not None:
            df["loss"] = res.losses
        return df

    def on_best(self, out: Path, res: SegEvalResult, plots: bool) -> None:
        if not plots or res.samples is None:
            return
        from fastlesion.segment.plots import plot_overlays

        images, masks, probs = res.samples
        (out / "plots").mkdir(exist_ok=True)
        plot_overlays(images, masks, probs > 0.5, out / "plots" / "overlays.png")


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Segmentation())}


def get_task(name: str) -> Task:
    return TASKS[name]
