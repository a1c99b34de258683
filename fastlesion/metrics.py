"""Validation metrics from labels and class probabilities: ROC-AUC, accuracy, sensitivity/specificity, F1, confusion,
average precision (PR-AUC), the ISIC 2024 partial AUC above 80 % TPR, and per-class precision/recall/F1/support.

Every value is a plain float and a metric that is undefined on the given data is NaN, never an exception or a
warning: a small validation fold without a single melanoma has no AUC, no recall and no F1 of the positive class,
but its accuracy and specificity still mean something. The threshold-free metrics come from scikit-learn
(``roc_auc_score``, ``roc_curve``, ``average_precision_score``), only where they are defined; the rest is counted from
the confusion matrix, so no ``UndefinedMetricWarning`` is ever printed.

Binary problems (two classes) are scored on the positive class ``1`` with ``probs[:, 1] >= threshold`` as the
prediction; problems with more classes use the argmax and macro averages.

Example:
    >>> import numpy as np
    >>> m = classification_metrics(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.65, 0.35], [0.2, 0.8]]))
    >>> m["auc"], m["recall"], m["specificity"]
    (0.75, 0.5, 0.5)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastlesion.errors import FastlesionError

NAN = float("nan")

#: The scalar keys of :func:`classification_metrics` (``metrics.csv`` prefixes them with ``val_``).
METRIC_KEYS = ("auc", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "f1_macro",
               "f1_weighted", "precision_weighted", "recall_weighted", "average_precision", "pauc80")
PER_CLASS_KEYS = ("precision", "recall", "f1", "support")
"""The per-class metrics of :func:`per_class_metrics`, keyed ``<metric>_<class column name>``."""
PAUC_MIN_TPR = 0.8
"""``pauc80``: the partial ROC-AUC above this true positive rate (the ISIC 2024 challenge metric)."""
VAL_METRICS = tuple(f"val_{k}" for k in METRIC_KEYS)
"""The validation metric columns of ``metrics.csv``, in order (``val_loss`` stands before them)."""
SEG_METRIC_KEYS = ("dice", "iou", "jaccard65", "pixel_accuracy", "sensitivity", "specificity")
"""Segmentation metrics (``train.task=segmentation``), each the mean over validation images of the per-image value:
Dice, IoU (Jaccard), the ISIC 2018 thresholded Jaccard (an image's IoU below 0.65 counts as 0), pixel accuracy,
pixel sensitivity and specificity (:func:`fastlesion.segment.metrics.segmentation_metrics`)."""
SEG_VAL_METRICS = tuple(f"val_{k}" for k in SEG_METRIC_KEYS)
"""The validation metric columns of a segmentation run's ``metrics.csv``."""
TASKS = ("classification", "segmentation")


# --------------------------------------------------------------------------------------------------- helpers
def _check(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(y [N] int64, probs [N, C] float64)``; a shape or label mismatch is a FastlesionError naming it."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise FastlesionError(f"metrics: probs must have shape [N, C] with C >= 2, got {probs.shape}")
    if y.ndim != 1 or len(y) != len(probs):
        raise FastlesionError(f"metrics: y_true must have shape [{len(probs)}] to match probs, got {y.shape}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise FastlesionError(f"metrics: y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= probs.shape[1]):
        bad = int(y.min() if y.min() < 0 else y.max())
        raise FastlesionError(f"metrics: label {bad} is outside 0..{probs.shape[1] - 1} (probs has "
                              f"{probs.shape[1]} columns)")
    return y, probs


def _div(num: float, den: float) -> float:
    """``num / den`` as a float, NaN when ``den`` is 0."""
    return float(num) / float(den) if den else NAN


def _binary_auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of ``score`` for the boolean target ``is_pos``; NaN with one class only or a non-finite score."""
    if is_pos.all() or not is_pos.any() or not np.isfinite(score).all():
        return NAN
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_pos, score))


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``C x C`` counts, rows = true class, columns = predicted class (``labels=range(C)``)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat[: num_classes * num_classes].reshape(num_classes, num_classes)


def predict(probs: Any, threshold: float = 0.5) -> np.ndarray:
    """Predicted class per row: ``probs[:, 1] >= threshold`` for two classes, otherwise the argmax."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(1).astype(np.int64)


# --------------------------------------------------------------------------------------------------- AUC and ROC
def per_class_auc(y_true: Any, probs: Any) -> list[float]:
    """One-vs-rest ROC-AUC of every class (``probs[:, c]`` against ``y_true == c``), NaN where a class is absent
    from ``y_true`` or is all of it.

    Args:
        y_true: integer labels ``[N]`` in ``0..C-1``.
        probs: class probabilities ``[N, C]``.

    Returns:
        ``C`` floats.
    """
    y, p = _check(y_true, probs)
    return [_binary_auc(y == c, p[:, c]) for c in range(p.shape[1])]


def roc_auc(y_true: Any, probs: Any) -> float:
    """The ROC-AUC of :func:`classification_metrics`: binary on ``probs[:, 1]``; macro one-vs-rest over the classes
    that are both present and not the only class present (equal to scikit-learn's ``multi_class='ovr',
    average='macro'`` when every class is present); NaN when no class qualifies."""
    y, p = _check(y_true, probs)
    if p.shape[1] == 2:
        return _binary_auc(y == 1, p[:, 1])
    aucs = [a for a in per_class_auc(y, p) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else NAN


def roc_points(y_true: Any, probs: Any,
               class_names: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """ROC curves for plotting: ``{class name: (fpr, tpr, auc)}``.

    Binary problems give one curve, of the positive class (``probs[:, 1]``); others give one one-vs-rest curve per
    class. Classes whose curve is undefined (absent from ``y_true``, or the only class in it) are left out, so a
    single-class ``y_true`` gives ``{}``.

    Args:
        y_true: integer labels ``[N]``.
        probs: class probabilities ``[N, C]``.
        class_names: ``C`` names used as keys (default ``"0"``, ``"1"``, ...).
    """
    y, p = _check(y_true, probs)
    names = _names(class_names, p.shape[1])
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    out: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for c in classes:
        auc = _binary_auc(y == c, p[:, c])
        if math.isnan(auc):
            continue
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        out[names[c]] = (fpr, tpr, auc)
    return out


def average_precision(y_true: Any, probs: Any) -> float:
    """Average precision (the area under the precision-recall curve, scikit-learn's ``average_precision_score``):
    binary on ``probs[:, 1]``; for more classes the macro mean of the one-vs-rest APs over the classes that are
    both present and not the only class present (scikit-learn's ``average='macro'`` on the binarised labels when
    every class is present). NaN where no class qualifies: like the AUC, AP needs positives and negatives."""
    y, p = _check(y_true, probs)
    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    aps = [_binary_ap(y == c, p[:, c]) for c in classes]
    aps = [a for a in aps if not math.isnan(a)]
    return float(np.mean(aps)) if aps else NAN


def _binary_ap(is_pos: np.ndarray, score: np.ndarray) -> float:
    if is_pos.all() or not is_pos.any() or not np.isfinite(score).all():
        return NAN
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(is_pos, score))


def partial_auc_above_tpr(is_pos: Any, score: Any, min_tpr: float = PAUC_MIN_TPR) -> float:
    """The area under the ROC curve above ``min_tpr`` (the ISIC 2024 challenge metric at ``min_tpr=0.8``), in
    ``[0, 1 - min_tpr]``: 0.2 for a perfect ranking, 0.02 for a random one (``(1 - min_tpr)**2 / 2``).

    Computed as the challenge's scoring code does: with labels and scores flipped, the partial AUC up to a false
    positive rate of ``1 - min_tpr`` (scikit-learn ``roc_auc_score(max_fpr=...)``, whose McClish standardisation is
    undone), which is the area between the ROC curve and the line TPR = ``min_tpr``. NaN with one class only or a
    non-finite score.
    """
    is_pos = np.asarray(is_pos, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if is_pos.all() or not is_pos.any() or not np.isfinite(score).all():
        return NAN
    from sklearn.metrics import roc_auc_score

    max_fpr = 1.0 - min_tpr
    scaled = roc_auc_score(~is_pos, -score, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / 0.5 * (scaled - 0.5))


def pr_points(y_true: Any, probs: Any,
              class_names: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, float, float]]:
    """Precision-recall curves for plotting: ``{class name: (recall, precision, average precision, prevalence)}``,
    chosen as :func:`roc_points` chooses its curves (binary: the positive class; else one per class present and
    not alone)."""
    y, p = _check(y_true, probs)
    names = _names(class_names, p.shape[1])
    out: dict[str, tuple[np.ndarray, np.ndarray, float, float]] = {}
    for c in [1] if p.shape[1] == 2 else range(p.shape[1]):
        ap = _binary_ap(y == c, p[:, c])
        if math.isnan(ap):
            continue
        from sklearn.metrics import precision_recall_curve

        precision, recall, _ = precision_recall_curve(y == c, p[:, c])
        out[names[c]] = (recall, precision, ap, float((y == c).mean()))
    return out


def column_names(class_names: list[str]) -> list[str]:
    """Class names made fit for column names: every run of characters other than letters, digits and ``_``
    becomes ``_`` (``"Basal cell"`` -> ``Basal_cell``); an empty result is ``class<i>``; a name already taken
    gets ``_<i>`` appended (``i`` = the class index)."""
    import re

    out: list[str] = []
    for i, name in enumerate(class_names):
        col = re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_") or f"class{i}"
        out.append(f"{col}_{i}" if col in out else col)
    return out


def per_class_columns(class_names: list[str]) -> list[str]:
    """The ``metrics_per_class.csv`` metric columns of these classes: ``val_<metric>_<class>``, class by class."""
    return [f"val_{k}_{c}" for c in column_names(class_names) for k in PER_CLASS_KEYS]


def per_class_metrics(y_true: Any, probs: Any, class_names: list[str] | None = None,
                      threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall (sensitivity), F1 and support of every class, from the predictions of
    :func:`classification_metrics` (binary: ``probs[:, 1] >= threshold``; else the argmax).

    Keys are ``<metric>_<class>`` with the class names of :func:`column_names` (``recall_mel``). Where a value is
    undefined it is NaN, as scikit-learn's ``precision_recall_fscore_support(..., zero_division=np.nan)``:
    precision of a class never predicted, recall of a class absent from ``y_true``, F1 of a class both absent and
    never predicted (a class present but never predicted has F1 0). Support is the class's count in ``y_true``.
    """
    y, p = _check(y_true, probs)
    num_classes = p.shape[1]
    cols = column_names(_names(class_names, num_classes))
    cm = confusion_matrix(y, predict(p, threshold), num_classes).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    out: dict[str, float] = {}
    for c, col in enumerate(cols):
        fp, fn = predicted[c] - tp[c], support[c] - tp[c]
        values = {"precision": _div(tp[c], predicted[c]), "recall": _div(tp[c], support[c]),
                  "f1": _div(2 * tp[c], 2 * tp[c] + fp + fn), "support": float(support[c])}
        out.update({f"{k}_{col}": values[k] for k in PER_CLASS_KEYS})
    return out


def _names(class_names: list[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise FastlesionError(f"metrics: {len(names)} class names {names} for {num_classes} probability columns")
    return names


# --------------------------------------------------------------------------------------------------- all metrics
def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Threshold metrics of a ``C x C`` confusion matrix (rows true, columns predicted).

    Binary (``C == 2``): precision, recall (sensitivity), specificity and F1 of class 1, each NaN when its
    denominator is 0 (precision with nothing predicted positive, recall and F1 with no positives at all,
    specificity with no negatives).

    ``C > 2``: precision, recall and F1 are macro averages over the classes present in the labels or the
    predictions (scikit-learn's default label set; a class predicted but absent has recall 0, a class present but
    never predicted has precision 0, as with ``zero_division=0``), specificity is the mean one-vs-rest specificity
    over the classes where it is defined.

    Always: accuracy, balanced accuracy (mean recall over the classes present in the labels, as
    ``balanced_accuracy_score``), ``f1_macro`` and ``f1_weighted`` (``f1_score`` with ``average='macro'`` /
    ``'weighted'``), ``precision_weighted`` and ``recall_weighted`` (``precision_score`` / ``recall_score`` with
    ``average='weighted', zero_division=0``: per-class values weighted by their support, a class never predicted
    counting with precision 0; ``recall_weighted`` equals the accuracy). NaN with no samples.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(1)  # true count per class
    predicted = cm.sum(0)  # predicted count per class
    fp, fn = predicted - tp, support - tp
    tn = n - tp - fp - fn
    seen = (support > 0) | (predicted > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1_c = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        prec_c = np.where(predicted > 0, tp / predicted, 0.0)
        rec_c = np.where(support > 0, tp / support, 0.0)
        spec_c = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    out: dict[str, float] = {
        "accuracy": _div(tp.sum(), n),
        "balanced_accuracy": float(rec_c[support > 0].mean()) if (support > 0).any() else NAN,
    }
    if len(cm) == 2:
        tp1, fp1, fn1, tn1 = tp[1], fp[1], fn[1], tn[1]
        out.update(precision=_div(tp1, tp1 + fp1), recall=_div(tp1, tp1 + fn1), specificity=_div(tn1, tn1 + fp1),
                   f1=_div(2 * tp1, 2 * tp1 + fp1 + fn1) if tp1 + fn1 > 0 else NAN)
    else:
        spec = spec_c[seen & ~np.isnan(spec_c)]
        out.update(precision=float(prec_c[seen].mean()) if seen.any() else NAN,
                   recall=float(rec_c[seen].mean()) if seen.any() else NAN,
                   specificity=float(spec.mean()) if len(spec) else NAN,
                   f1=float(f1_c[seen].mean()) if seen.any() else NAN)
    out["f1_macro"] = float(f1_c[seen].mean()) if seen.any() else NAN
    out["f1_weighted"] = _div(float((np.nan_to_num(f1_c) * support).sum()), support.sum())
    out["precision_weighted"] = _div(float((prec_c * support).sum()), support.sum())
    out["recall_weighted"] = _div(float((rec_c * support).sum()), support.sum())
    return out


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str] | None = None,
                           threshold: float = 0.5) -> dict:
    """All validation metrics of one evaluation, as a flat dict.

    Args:
        y_true: integer labels ``[N]`` in ``0..C-1``.
        probs: softmax probabilities ``[N, C]``, ``C >= 2``.
        class_names: the ``C`` class names (only checked for length; the keys do not depend on them).
        threshold: binary problems predict class 1 when ``probs[:, 1] >= threshold``; ignored for ``C > 2``
            (argmax).

    Returns:
        ``auc``, ``accuracy``, ``balanced_accuracy``, ``precision``, ``recall`` (sensitivity), ``specificity``,
        ``f1``, ``f1_macro``, ``f1_weighted``, ``precision_weighted``, ``recall_weighted``, ``average_precision``
        (PR-AUC), ``pauc80`` (binary only, else NaN) (floats, NaN where undefined — see :func:`roc_auc`,
        :func:`average_precision`, :func:`partial_auc_above_tpr` and :func:`metrics_from_confusion`),
        ``confusion`` (``C x C`` list of lists of ints, rows true, columns predicted) and ``n`` (the number of
        samples). Per-class values are :func:`per_class_metrics`. Never raises or warns for a single-class
        ``y_true`` or an empty input.

    Raises:
        FastlesionError: ``probs`` is not ``[N, C >= 2]``, ``y_true`` does not match it, a label is outside
            ``0..C-1`` or ``class_names`` has the wrong length.
    """
    y, p = _check(y_true, probs)
    num_classes = p.shape[1]
    if class_names is not None:
        _names(class_names, num_classes)
    cm = confusion_matrix(y, predict(p, threshold), num_classes)
    out: dict[str, Any] = {"auc": roc_auc(y, p), "average_precision": average_precision(y, p),
                           "pauc80": partial_auc_above_tpr(y == 1, p[:, 1]) if num_classes == 2 else NAN}
    out.update(metrics_from_confusion(cm))
    out = {k: out[k] for k in METRIC_KEYS}
    out["confusion"] = cm.astype(int).tolist()
    out["n"] = len(y)
    return out
