"""``--folds all``: train every fold in turn, report mean ± std and the out-of-fold AUC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fastlesion.config import Config, replace, save_config
from fastlesion.engine.progress import console
from fastlesion.engine.rundir import RunDir
from fastlesion.engine.train import train


def train_folds(cfg: Config) -> dict[str, Any]:
    """Train folds ``0..K-1`` into ``<out>/fold_<k>`` and write ``cv_summary.json`` and ``oof_predictions.csv``.

    The out-of-fold AUC is computed once over the concatenated validation predictions of all folds (every image is
    predicted by the one model that did not see it), which is steadier than the mean of per-fold AUCs.
    """
    out = RunDir.prepare(cfg, resume=False)  # the parent folder is locked by this process, each fold's by its run
    try:
        save_config(replace(cfg, **{"run.out": str(out)}), out / "config.yaml")
        summaries, oof = [], []
        for k in range(cfg.data.num_folds):
            fold_cfg = replace(cfg, **{"data.fold": k, "run.out": str(out / f"fold_{k}")})
            summaries.append(train(fold_cfg))
            preds = pd.read_csv(out / f"fold_{k}" / "predictions_val.csv")
            oof.append(preds.assign(fold=k))
        return _cv_summary(cfg, out, summaries, oof)
    finally:
        RunDir.release(out)


def _cv_summary(cfg: Config, out: Path, summaries: list[dict[str, Any]], oof: list[pd.DataFrame]) -> dict[str, Any]:
    """``cv_summary.json`` and ``oof_predictions.csv`` from the folds' summaries and validation predictions."""
    from fastlesion.metrics import classification_metrics

    oof_df = pd.concat(oof, ignore_index=True)
    oof_df.to_csv(out / "oof_predictions.csv", index=False)
    classes = summaries[0]["classes"]
    probs = oof_df[[f"prob_{c}" for c in classes]].to_numpy()
    oof_metrics = classification_metrics(oof_df["label"].to_numpy(), probs, classes)
    aucs = np.array([s["val_auc"] for s in summaries], dtype=float)
    accs = np.array([s["val_accuracy"] for s in summaries], dtype=float)
    result = {
        "model": cfg.model.name, "dataset": cfg.data.dataset, "num_folds": cfg.data.num_folds,
        "val_auc_mean": float(np.nanmean(aucs)), "val_auc_std": float(np.nanstd(aucs)),
        "val_accuracy_mean": float(np.nanmean(accs)), "val_accuracy_std": float(np.nanstd(accs)),
        "oof_auc": oof_metrics["auc"], "oof_accuracy": oof_metrics["accuracy"],
        "fold_val_auc": aucs.tolist(), "params": summaries[0]["params"],
        "images_per_s": float(np.median([s["images_per_s"] for s in summaries])), "run_dir": str(out),
    }
    (out / "cv_summary.json").write_text(json.dumps(result, indent=2))
    console.print(f"{cfg.data.num_folds}-fold CV: val_auc {result['val_auc_mean']:.4f} ± {result['val_auc_std']:.4f}"
                  f"  out-of-fold AUC {result['oof_auc']:.4f}  ({out / 'cv_summary.json'})")
    return result
