"""A compact console log of a Ray Tune search: one line per trial epoch, one when a trial ends.

Ray's own console output (``--ray-verbose 1|2``) prints a status table or a box per result: hundreds of lines for a
few trials. This callback prints what a user follows instead::

    trial 3f2a1_00002 start  model.name=resnet18 optim.lr=0.00032 loader.batch_size=64
    trial 3f2a1_00002 epoch 2/8  val_auc 0.7123  best 0.7123
    trial 3f2a1_00002 stopped by ASHA after epoch 2 (best val_auc 0.7123)

The metric named is the one the search follows (:func:`fastlesion.tune.trial.tune_metric`): ``val_auc`` for
classification, ``val_iou`` for segmentation.

It imports Ray at import time: import it only where Ray is needed (:mod:`fastlesion.tune.search` does so lazily,
inside the function that builds the run configuration), never from ``fastlesion/tune/__init__.py``. A class at
module level, so that Ray can pickle it with the run configuration of a restorable experiment.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class TrialLines(Callback):
    """Print a line per reported epoch and per finished trial (on the driver, so lines never interleave)."""

    metric = "val_auc"  # a class default too: a callback pickled by an older search unpickles without the attribute

    def __init__(self, max_t: int, keys: list[str], metric: str = "val_auc") -> None:
        self.max_t = max_t
        self.keys = list(keys)
        self.metric = metric
        self.best: dict[str, float] = {}
        self.epochs: dict[str, int] = {}

    def _name(self, trial: Any) -> str:
        return f"trial {trial.trial_id}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = "  ".join(f"{k}={_fmt(trial.config.get(k))}" for k in self.keys if k in trial.config)
        print(f"{self._name(trial)} start  {params}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        value = result.get(self.metric)
        value = float(value) if isinstance(value, (int, float)) else math.nan
        tid = trial.trial_id
        if not math.isnan(value) and (tid not in self.best or value > self.best[tid]):
            self.best[tid] = value
        self.epochs[tid] = epoch
        print(f"{self._name(trial)} epoch {epoch}/{self.max_t}  {self.metric} {value:.4f}  "
              f"best {self.best.get(tid, math.nan):.4f}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.trial_id
        epochs = self.epochs.get(tid, 0)
        how = f"stopped by ASHA after epoch {epochs}" if 0 < epochs < self.max_t else f"finished {epochs} epochs"
        print(f"{self._name(trial)} {how} (best {self.metric} {self.best.get(tid, math.nan):.4f})", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        where = getattr(trial, "local_path", None) or getattr(trial, "path", None) or ""
        print(f"{self._name(trial)} failed after epoch {self.epochs.get(trial.trial_id, 0)}; its error.txt is under "
              f"{where}", flush=True)
