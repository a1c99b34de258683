"""Per-class and threshold-free metrics against scikit-learn, the ISIC 2024 partial AUC, their edge cases, and where
a run writes them (metrics.csv keeps its fixed columns; metrics_per_class.csv, summary.json, plots/pr.png)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.preprocessing import label_binarize

from fastlesion import report
from fastlesion.metrics import (
    classification_metrics,
    column_names,
    partial_auc_above_tpr,
    per_class_columns,
    per_class_metrics,
    predict,
)


def binary(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    p1 = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    return y, np.stack([1 - p1, p1], 1)


def multiclass(n: int = 300, c: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.2 * np.eye(c)[y]
    e = np.exp(logits)
    return y, e / e.sum(1, keepdims=True)


def isic2024_score(y: np.ndarray, p1: np.ndarray, min_tpr: float = 0.8) -> float:
    """The ISIC 2024 challenge's scoring code (Kaggle metric), as published."""
    v_gt = abs(np.asarray(y) - 1)
    v_pred = np.array([1.0 - x for x in p1])
    max_fpr = abs(1 - min_tpr)
    scaled = roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5)


def area_above_tpr(y: np.ndarray, p1: np.ndarray, min_tpr: float = 0.8) -> float:
    """The definition, integrated directly: area between the ROC curve and TPR = min_tpr, where it is above."""
    fpr, tpr, _ = roc_curve(y, p1)
    grid = np.linspace(0, 1, 400001)
    curve = np.interp(grid, fpr, tpr)
    return float(np.trapezoid(np.clip(curve - min_tpr, 0, None), grid))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_agrees_with_sklearn_and_isic(seed: int) -> None:
    y, p = binary(seed=seed)
    m = classification_metrics(y, p)
    pred = predict(p)
    assert m["average_precision"] == pytest.approx(average_precision_score(y, p[:, 1]))
    assert m["precision_weighted"] == pytest.approx(precision_score(y, pred, average="weighted", zero_division=0))
    assert m["recall_weighted"] == pytest.approx(recall_score(y, pred, average="weighted", zero_division=0))
    assert m["pauc80"] == pytest.approx(isic2024_score(y, p[:, 1]), abs=1e-12)
    assert m["pauc80"] == pytest.approx(area_above_tpr(y, p[:, 1]), abs=1e-4)
    assert 0.0 <= m["pauc80"] <= 0.2


def test_pauc_bounds() -> None:
    y = np.array([0, 0, 0, 1, 1])
    assert partial_auc_above_tpr(y == 1, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == pytest.approx(0.2)
    assert partial_auc_above_tpr(y == 1, np.array([0.9, 0.8, 0.7, 0.2, 0.1])) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    yr = rng.random(200000) < 0.5
    assert partial_auc_above_tpr(yr, rng.random(200000)) == pytest.approx(0.02, abs=2e-3)  # random: 0.2**2 / 2
    assert math.isnan(partial_auc_above_tpr(np.ones(4, bool), np.arange(4.0)))


def test_multiclass_agrees_with_sklearn() -> None:
    y, p = multiclass()
    m = classification_metrics(y, p)
    pred = p.argmax(1)
    assert m["average_precision"] == pytest.approx(
        average_precision_score(label_binarize(y, classes=range(4)), p, average="macro"))
    assert m["precision_weighted"] == pytest.approx(precision_score(y, pred, average="weighted", zero_division=0))
    assert m["recall_weighted"] == pytest.approx(recall_score(y, pred, average="weighted", zero_division=0))
    assert math.isnan(m["pauc80"])


def _sk_per_class(y, pred, c):
    return precision_recall_fscore_support(y, pred, labels=list(range(c)), zero_division=np.nan)


def test_per_class_agrees_with_sklearn_including_absent_and_never_predicted() -> None:
    y, p = multiclass(c=4)
    p[:, 3] = 0.0  # class 3 is never predicted
    y = np.where(y == 2, 0, y)  # class 2 is absent from the labels
    names = ["akiec", "Basal cell", "df", "vasc"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc = per_class_metrics(y, p, names)
    prec, rec, f1, sup = _sk_per_class(y, p.argmax(1), 4)
    cols = column_names(names)
    assert cols == ["akiec", "Basal_cell", "df", "vasc"]
    for i, col in enumerate(cols):
        for key, ref in (("precision", prec[i]), ("recall", rec[i]), ("f1", f1[i]), ("support", sup[i])):
            got = pc[f"{key}_{col}"]
            assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref), (key, col, got, ref)
    assert math.isnan(pc["precision_vasc"]) and pc["f1_vasc"] == 0.0  # present, never predicted
    assert math.isnan(pc["recall_df"]) and pc["support_df"] == 0.0  # absent from this fold
    assert list(pc) == [c[len("val_"):] for c in per_class_columns(names)]


def test_binary_edge_cases_without_warnings() -> None:
    y = np.array([0, 0, 1])
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])  # nothing predicted positive
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, p, ["benign", "malignant"])
        pc = per_class_metrics(y, p, ["benign", "malignant"])
        single = classification_metrics(np.zeros(5, int), np.tile([0.8, 0.2], (5, 1)))
    assert math.isnan(pc["precision_malignant"]) and pc["recall_malignant"] == 0.0
    assert m["precision_weighted"] == pytest.approx(precision_score(y, [0, 0, 0], average="weighted",
                                                                    zero_division=0))
    assert m["average_precision"] == pytest.approx(1.0) and m["pauc80"] == pytest.approx(0.2)
    assert math.isnan(single["average_precision"]) and math.isnan(single["pauc80"])
    assert single["precision_weighted"] == 1.0 and single["recall_weighted"] == 1.0


def test_column_names() -> None:
    assert column_names(["Basal cell", "Basal-cell", "", "mel", "mel"]) == ["Basal_cell", "Basal_cell_1", "class2",
                                                                           "mel", "mel_4"]


def test_pr_plot(tmp_path) -> None:
    y, p = multiclass()
    assert report.plot_pr(y, p, ["a", "b", "c", "d"], tmp_path / "pr.png").stat().st_size > 0
    assert report.plot_pr(np.zeros(4, int), np.full((4, 2), 0.5), None, tmp_path / "one.png").is_file()


def test_binary_run_writes_them(tiny_isic, tmp_path) -> None:
    from test_engine import tiny_cfg

    from fastlesion.engine.train import METRIC_COLUMNS, train

    summary = train(tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1, "train.early_stop_metric": "val_pauc80"}))
    out = tmp_path / "r"
    assert list(pd.read_csv(out / "metrics.csv").columns) == METRIC_COLUMNS
    per_class = pd.read_csv(out / "metrics_per_class.csv")
    assert list(per_class.columns) == ["epoch", *per_class_columns(["benign", "malignant"])]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["best_metric"] == "val_pauc80" and 0 <= summary["val_pauc80"] <= 0.2
    assert saved["val_support_benign"] + saved["val_support_malignant"] == summary["n_val"]
    assert (out / "plots" / "pr.png").is_file()
