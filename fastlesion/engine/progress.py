"""Rich progress per epoch (images/s, ETA, loss) and one-line epoch summaries; silent on ranks other than 0."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False, soft_wrap=True)  # log lines stay whole in files and CI


class EpochBar:
    """A bar for one epoch; ``advance(step, images, loss)`` is called every few steps by the loop."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool = True) -> None:
        self.enabled, self.steps, self.t0 = enabled, steps, time.perf_counter()
        self.progress: Progress | None = None
        if enabled:
            self.progress = Progress(
                TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>7.1f} img/s  loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
            self.task = self.progress.add_task("train", total=steps, rate=0.0, loss=math.nan)

    def __enter__(self) -> EpochBar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, step: int, images: int, loss: float) -> None:
        if self.progress is not None:
            rate = images / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, completed=step, rate=rate, loss=loss)


def fmt(v: float | None, spec: str = ".4f") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def epoch_line(row: dict, epochs: int, best: bool) -> str:
    """``epoch  3/10  train_loss 0.412  val_loss 0.398  val_auc 0.8123  acc 0.912  512.3 img/s  12.1s *``"""
    if "val_dice" in row:  # segmentation
        metrics = (f"  val_dice {fmt(row['val_dice'])}  val_iou {fmt(row['val_iou'])}"
                   f"  val_jaccard65 {fmt(row['val_jaccard65'])}")
    else:
        metrics = (f"  val_auc {fmt(row['val_auc'])}  val_acc {fmt(row['val_accuracy'])}"
                   f"  val_bacc {fmt(row['val_balanced_accuracy'])}")
    return (f"epoch {row['epoch']:>3}/{epochs}  train_loss {fmt(row['train_loss'])}  val_loss {fmt(row['val_loss'])}"
            f"{metrics}  lr {row['lr']:.2e}"
            f"  {row['images_per_s']:.1f} img/s  {row['epoch_seconds']:.1f}s" + ("  *best" if best else ""))
