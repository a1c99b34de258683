"""Validation metrics against hand computation and scikit-learn; undefined metrics are NaN without warnings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fastlesion.errors import FastlesionError
from fastlesion.metrics import METRIC_KEYS, classification_metrics, per_class_auc, roc_points


def binary_probs(p1: list[float]) -> np.ndarray:
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], 1)


def test_binary_hand_example():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.6: 3 of the 4 (pos, neg) pairs are ordered -> AUC 0.75
    y = np.array([0, 0, 1, 1])
    m = classification_metrics(y, binary_probs([0.1, 0.6, 0.35, 0.8]))
    assert m["auc"] == pytest.approx(0.75)
    # at 0.5: predictions 0 1 0 1 -> TP 1, FN 1, FP 1, TN 1
    assert m["confusion"] == [[1, 1], [1, 1]]
    assert m["recall"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.5) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["n"] == 4


def test_binary_known_values_and_threshold():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p1 = [0.9, 0.7, 0.3, 0.6, 0.2, 0.1, 0.4, 0.05]
    m = classification_metrics(y, binary_probs(p1))
    # TP 2 (0.9, 0.7), FN 1 (0.3), FP 1 (0.6), TN 4
    assert m["confusion"] == [[4, 1], [1, 2]]
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # AUC by pairs: 0.3 beats 0.2, 0.1, 0.05 and loses to 0.6, 0.4; 0.9 and 0.7 beat all five -> 13 / 15
    assert m["auc"] == pytest.approx(13 / 15)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    low = classification_metrics(y, binary_probs(p1), threshold=0.25)  # now 0.3 and 0.4 are positive too
    assert low["recall"] == pytest.approx(1.0) and low["specificity"] == pytest.approx(3 / 5)
    assert low["auc"] == m["auc"]


def test_binary_perfect_and_random():
    y = np.array([0, 0, 0, 1, 1])
    perfect = classification_metrics(y, binary_probs([0.1, 0.2, 0.3, 0.8, 0.9]))
    for k in ("auc", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "f1_macro"):
        assert perfect[k] == pytest.approx(1.0), k
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    rand = classification_metrics(y, binary_probs(rng.random(4000)))
    assert rand["auc"] == pytest.approx(0.5, abs=0.03)
    assert rand["balanced_accuracy"] == pytest.approx(0.5, abs=0.03)


def test_binary_matches_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    m = classification_metrics(y, binary_probs(p1))
    pred = (p1 >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_single_class_is_nan_without_raising_or_warning():
    y = np.zeros(6, dtype=int)  # a tiny validation fold without positives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, binary_probs([0.1, 0.2, 0.7, 0.3, 0.4, 0.05]))
        mc = classification_metrics(np.full(5, 2), np.random.default_rng(0).dirichlet(np.ones(4), 5))
        aucs = per_class_auc(y, binary_probs([0.1, 0.2, 0.7, 0.3, 0.4, 0.05]))
    assert math.isnan(m["auc"]) and math.isnan(m["recall"]) and math.isnan(m["f1"])
    assert m["specificity"] == pytest.approx(5 / 6) and m["accuracy"] == pytest.approx(5 / 6)
    assert m["precision"] == 0.0  # one false positive, no true positive: defined, zero
    assert m["confusion"] == [[5, 1], [0, 0]]
    assert math.isnan(mc["auc"]) and len(mc["confusion"]) == 4
    assert all(math.isnan(a) for a in aucs)


def test_nothing_predicted_positive_gives_nan_precision():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([0, 0, 1]), binary_probs([0.1, 0.2, 0.4]))
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["auc"] == pytest.approx(1.0)


def test_empty_input_is_all_nan():
    m = classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)))
    assert m["n"] == 0 and m["confusion"] == [[0] * 3] * 3
    assert all(math.isnan(m[k]) for k in METRIC_KEYS)


def test_keys_and_types():
    m = classification_metrics(np.array([0, 1, 2, 1]), np.eye(3)[[0, 1, 2, 0]], ["a", "b", "c"])
    assert list(m) == [*METRIC_KEYS, "confusion", "n"]
    assert all(isinstance(m[k], float) for k in METRIC_KEYS)
    assert isinstance(m["n"], int) and all(isinstance(v, int) for row in m["confusion"] for v in row)


def three_class(n: int = 300, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_multiclass_matches_sklearn_ovr_macro():
    y, probs = three_class()
    m = classification_metrics(y, probs, ["a", "b", "c"])
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["recall"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro")) == m["f1_macro"]
    assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    cm = np.array(m["confusion"])
    assert cm.shape == (3, 3) and cm.sum() == len(y)
    spec = [(cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) / (cm.sum() - cm[c].sum()) for c in range(3)]
    assert m["specificity"] == pytest.approx(np.mean(spec))
    assert per_class_auc(y, probs) == pytest.approx([roc_auc_score(y == c, probs[:, c]) for c in range(3)])


def test_multiclass_absent_class_gives_finite_auc_over_the_rest():
    y, probs = three_class()
    keep = y != 1  # class 1 never occurs in this fold
    y, probs = y[keep], probs[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, probs)
        aucs = per_class_auc(y, probs)
    assert math.isnan(aucs[1]) and np.isfinite([aucs[0], aucs[2]]).all()
    assert np.isfinite(m["auc"]) and m["auc"] == pytest.approx((aucs[0] + aucs[2]) / 2)
    assert np.array(m["confusion"]).shape == (3, 3) and np.array(m["confusion"])[1].sum() == 0
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that class 1 is predicted but absent; we do not
        ref_f1, ref_bacc = f1_score(y, pred, average="macro"), balanced_accuracy_score(y, pred)
    assert m["f1_macro"] == pytest.approx(ref_f1)
    assert m["balanced_accuracy"] == pytest.approx(ref_bacc)


def test_roc_points():
    y, probs = three_class()
    curves = roc_points(y, probs, ["a", "b", "c"])
    assert list(curves) == ["a", "b", "c"]
    fpr, tpr, auc = curves["b"]
    assert fpr[0] == 0 and tpr[-1] == 1 and auc == pytest.approx(roc_auc_score(y == 1, probs[:, 1]))
    binary = roc_points(np.array([0, 1, 0, 1]), binary_probs([0.2, 0.9, 0.4, 0.3]), ["benign", "malignant"])
    assert list(binary) == ["malignant"] and binary["malignant"][2] == pytest.approx(0.75)
    assert roc_points(np.zeros(3, dtype=int), binary_probs([0.1, 0.5, 0.9])) == {}
    assert list(roc_points(np.array([0, 1]), binary_probs([0.1, 0.9]))) == ["1"]


@pytest.mark.parametrize("y, probs, culprit", [
    (np.array([0, 1]), np.array([0.2, 0.8]), "probs"),
    (np.array([0, 1, 1]), binary_probs([0.2, 0.8]), "y_true"),
    (np.array([0, 2]), binary_probs([0.2, 0.8]), "label 2"),
    (np.array([0.5, 1.0]), binary_probs([0.2, 0.8]), "integer"),
])
def test_bad_inputs_name_the_culprit(y, probs, culprit):
    with pytest.raises(FastlesionError, match=culprit):
        classification_metrics(y, probs)


def test_wrong_number_of_class_names():
    with pytest.raises(FastlesionError, match="class names"):
        classification_metrics(np.array([0, 1]), binary_probs([0.2, 0.8]), ["only_one"])
