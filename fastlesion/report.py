"""Plots of one run (training curves, ROC, confusion matrix) and the comparison of several runs.

Matplotlib is imported lazily, with the ``Agg`` backend (no display needed), only when a plot is drawn.

Example:
    >>> df = compare_runs(["runs/lenet", "runs/resnet18"])  # doctest: +SKIP
    >>> print_comparison(df); write_comparison(df, "comparison")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fastlesion.errors import FastlesionError

PLOT_FILES = ("curves.png", "roc.png", "pr.png", "confusion.png")
"""The figures a run draws into ``RUN/plots/`` (the trackers log these, ``--overwrite`` deletes these)."""

#: Columns of :func:`compare_runs`, in order.
COMPARISON_COLUMNS = ["run", "model", "params", "best_val_auc", "best_val_accuracy", "best_val_f1", "best_epoch",
                      "epochs_run", "epoch_seconds", "images_per_s"]
SEG_COMPARISON_COLUMNS = ["run", "model", "params", "best_val_dice", "best_val_iou", "best_val_jaccard65",
                          "best_epoch", "epochs_run", "epoch_seconds", "images_per_s"]
"""The columns when every run compared is a segmentation run (``summary.json`` ``task``), sorted by ``best_val_iou``."""
_RANKED_BY = {"classification": ("best_val_auc", "val AUC"), "segmentation": ("best_val_iou", "val IoU")}

#: Short headers of the terminal table.
SHORT_HEADERS = {"best_val_auc": "val AUC", "best_val_accuracy": "val acc", "best_val_f1": "val F1",
                 "best_val_dice": "val Dice", "best_val_iou": "val IoU", "best_val_jaccard65": "val J65",
                 "best_epoch": "best ep", "epochs_run": "epochs", "epoch_seconds": "s/epoch", "images_per_s": "img/s"}

LOSS_COLUMNS = ("train_loss", "val_loss")
VAL_METRIC_COLUMNS = ("val_auc", "val_accuracy", "val_balanced_accuracy", "val_f1",  # classification
                      "val_dice", "val_iou", "val_jaccard65")  # segmentation


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_png: str | Path) -> Path:
    plt = _pyplot()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------- curves
def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Training curves of a run: losses, validation metrics and (when logged) the learning rate against the epoch.

    Missing columns and NaN values are skipped; an empty ``metrics.csv`` still gives a (blank) figure.

    Args:
        metrics_csv: a run's ``metrics.csv`` (``epoch`` plus any of ``train_loss, val_loss, val_auc,
            val_accuracy, val_balanced_accuracy, val_f1, lr``).
        out_png: the PNG to write (its folder is created).

    Returns:
        ``out_png`` as a Path.

    Raises:
        FastlesionError: the CSV does not exist or cannot be read.
    """
    path = Path(metrics_csv)
    df = _read_metrics(path)
    if df is None:
        raise FastlesionError(f"{path}: metrics file not found")
    x = df["epoch"] if "epoch" in df.columns else pd.Series(np.arange(1, len(df) + 1), index=df.index)
    has_lr = "lr" in df.columns and df["lr"].notna().any()
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3 if has_lr else 2, figsize=(15 if has_lr else 10, 3.8))
    panels = [(axes[0], LOSS_COLUMNS, "loss"), (axes[1], VAL_METRIC_COLUMNS, "validation metric")]
    for ax, columns, ylabel in panels:
        for col in columns:
            if col in df.columns and df[col].notna().any():
                ok = df[col].notna()
                ax.plot(x[ok], df.loc[ok, col], marker="o", markersize=3, label=col)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_title("loss")
    axes[1].set_title("validation")
    if has_lr:
        ok = df["lr"].notna()
        axes[2].plot(x[ok], df.loc[ok, "lr"], marker="o", markersize=3, color="tab:purple")
        if (df.loc[ok, "lr"] > 0).all():
            axes[2].set_yscale("log")
        axes[2].set_title("learning rate")
        axes[2].set_xlabel("epoch")
        axes[2].grid(alpha=0.3)
    if len(df):
        for ax in axes:
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(path.parent.name or str(path), fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------- ROC
def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: list[str] | None, out_png: str | Path) -> Path:
    """ROC curves with the AUC in the legend and the chance diagonal: the positive class for a binary problem,
    one one-vs-rest curve per class otherwise (classes absent from ``y_true`` have no curve).

    A ``y_true`` with a single class has no ROC; the figure then only says so (no exception).

    Args:
        y_true: integer labels ``[N]``.
        probs: class probabilities ``[N, C]``.
        class_names: ``C`` names for the legend (None: ``0..C-1``).
        out_png: the PNG to write.
    """
    from fastlesion.metrics import roc_auc, roc_points

    curves = roc_points(y_true, probs, class_names)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name} (AUC {auc:.3f})")
    title = "ROC"
    if not curves:
        ax.text(0.5, 0.5, "ROC undefined: y_true has a single class", ha="center", va="center", fontsize=9)
    elif len(curves) > 1:
        title = f"ROC one-vs-rest, macro AUC {roc_auc(y_true, probs):.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------- PR
def plot_pr(y_true: np.ndarray, probs: np.ndarray, class_names: list[str] | None, out_png: str | Path) -> Path:
    """Precision-recall curves with the average precision (PR-AUC) in the legend and each class's prevalence as a
    dotted line (what a random ranking gets): the positive class for a binary problem, one one-vs-rest curve per
    class otherwise (classes absent from ``y_true``, or alone in it, have no curve; the figure then says so).

    Args:
        y_true: integer labels ``[N]``.
        probs: class probabilities ``[N, C]``.
        class_names: ``C`` names for the legend (None: ``0..C-1``).
        out_png: the PNG to write.
    """
    from fastlesion.metrics import average_precision, pr_points

    curves = pr_points(y_true, probs, class_names)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (recall, precision, ap, prevalence) in curves.items():
        line = ax.step(recall, precision, where="post", linewidth=1.6, label=f"{name} (AP {ap:.3f})")[0]
        ax.axhline(prevalence, linestyle=":", linewidth=1, color=line.get_color())
    title = "precision-recall"
    if not curves:
        ax.text(0.5, 0.5, "PR curve undefined: y_true has a single class", ha="center", va="center", fontsize=9)
    elif len(curves) > 1:
        title = f"precision-recall one-vs-rest, macro AP {average_precision(y_true, probs):.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------- confusion
def plot_confusion(confusion: list[list[int]] | np.ndarray, class_names: list[str] | None, out_png: str | Path,
                   normalize: bool = True) -> Path:
    """The confusion matrix as a heat map (rows true, columns predicted), every cell annotated with its count.

    Args:
        confusion: ``C x C`` counts (``classification_metrics(...)["confusion"]``).
        class_names: ``C`` axis labels (None: ``0..C-1``).
        out_png: the PNG to write.
        normalize: colour by the fraction of each true class (row) and show it under the count; False colours by
            the counts.

    Raises:
        FastlesionError: the matrix is not square or the names do not match its size.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise FastlesionError(f"plot_confusion: expected a square C x C matrix, got shape {cm.shape}")
    c = cm.shape[0]
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise FastlesionError(f"plot_confusion: {len(names)} class names {names} for a {c} x {c} matrix")
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    shown = frac if normalize else cm
    plt = _pyplot()
    size = max(4.0, 0.8 * c + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(float(cm.max()), 1.0))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    fontsize = 9 if c <= 8 else 7
    for i in range(c):
        for j in range(c):
            text = f"{int(cm[i, j])}\n{frac[i, j]:.0%}" if normalize else f"{int(cm[i, j])}"
            dark = shown[i, j] > (0.5 if normalize else 0.5 * max(float(cm.max()), 1.0))
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks(range(c), names, rotation=45 if c > 2 else 0, ha="right" if c > 2 else "center")
    ax.set_yticks(range(c), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (n={int(cm.sum())})")
    fig.tight_layout()
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------- compare runs
def _read_metrics(path: Path) -> pd.DataFrame | None:
    """``metrics.csv`` as a frame (None if absent); an unreadable file is a FastlesionError naming it."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise FastlesionError(f"{path}: not a readable metrics CSV ({str(e).splitlines()[0]})") from None


def _num(v: Any) -> float:
    """A float, NaN for None / missing / non-numeric."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _model_from_config(run: Path) -> str | None:
    cfg = run / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        import yaml

        return (yaml.safe_load(cfg.read_text()) or {}).get("model", {}).get("name")
    except Exception:  # a broken config.yaml only loses the fallback name
        return None


def _run_row(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        raise FastlesionError(f"{run}: run folder not found")
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        hint = " (a --folds all folder: compare its fold_<k> folders)" if (run / "cv_summary.json").is_file() else ""
        raise FastlesionError(f"{run}: no summary.json, not a finished run folder{hint}")
    try:
        summary = json.loads(summary_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastlesionError(f"{summary_file}: not valid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise FastlesionError(f"{summary_file}: expected a JSON object")
    m = _read_metrics(run / "metrics.csv")
    if m is None:
        m = pd.DataFrame()
    steady = m.iloc[1:] if len(m) > 1 else m  # the first epoch includes compilation and warm-up

    best_epoch = _num(summary.get("best_epoch"))
    if math.isnan(best_epoch) and "val_auc" in m.columns and m["val_auc"].notna().any():
        best_epoch = _num(m.loc[m["val_auc"].idxmax(), "epoch"] if "epoch" in m.columns else m["val_auc"].idxmax() + 1)
    best_row: pd.Series | None = None
    if len(m) and not math.isnan(best_epoch):
        hit = m[m["epoch"] == best_epoch] if "epoch" in m.columns else m.iloc[int(best_epoch) - 1:int(best_epoch)]
        best_row = hit.iloc[0] if len(hit) else None

    def best(key: str) -> float:
        v = _num(summary.get(key))
        if math.isnan(v) and best_row is not None and key in best_row.index:
            v = _num(best_row[key])
        return v

    def mean_of(col: str, fallback: Any, how: str) -> float:
        if col in steady.columns and steady[col].notna().any():
            return float(getattr(steady[col].dropna(), how)())
        return _num(fallback)

    epochs_run = _num(summary.get("epochs_run"))
    if math.isnan(epochs_run) and len(m):
        epochs_run = float(len(m))
    images_per_s = _num(summary.get("images_per_s"))
    if math.isnan(images_per_s):
        images_per_s = mean_of("images_per_s", None, "median")
    return {
        "run": run.resolve().name if run.name in ("", ".", "..") else run.name,
        "model": summary.get("model") or _model_from_config(run) or "",
        "params": _num(summary.get("params")),
        "best_val_auc": best("val_auc"),
        "best_val_accuracy": best("val_accuracy"),
        "best_val_f1": best("val_f1"),
        "best_val_dice": best("val_dice"),
        "best_val_iou": best("val_iou"),
        "best_val_jaccard65": best("val_jaccard65"),
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "epoch_seconds": mean_of("epoch_seconds", summary.get("epoch_seconds"), "mean"),
        "images_per_s": images_per_s,
        "_dataset": summary.get("dataset"),
        "_task": summary.get("task", "classification"),
    }


def compare_runs(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run folder, best validation AUC first.

    Values come from each folder's ``summary.json``; a value it lacks (``val_f1`` of an older run, ...) is taken
    from the best epoch's row of ``metrics.csv``. ``epoch_seconds`` is the mean over the epochs of ``metrics.csv``
    after the first (which includes compilation and warm-up; the only epoch of a one-epoch run), else the summary's.

    Args:
        run_dirs: run folders written by ``fastlesion train``.

    Returns:
        A frame with the columns :data:`COMPARISON_COLUMNS` (``run`` is the folder name; numbers are floats, NaN
        where unknown), sorted by ``best_val_auc`` descending (NaN last); for segmentation runs
        :data:`SEG_COMPARISON_COLUMNS`, sorted by ``best_val_iou`` (``df.attrs["task"]`` says which); runs of both
        tasks together are an error. ``df.attrs["datasets"]`` lists the
        datasets named by the summaries.

    Raises:
        FastlesionError: no folders given, a folder does not exist, or has no (valid) ``summary.json``.
    """
    if not run_dirs:
        raise FastlesionError("compare: no run folders given")
    rows = [_run_row(Path(r)) for r in run_dirs]
    datasets = sorted({str(r.pop("_dataset")) for r in rows} - {"None"})
    tasks = sorted({str(r.pop("_task")) for r in rows})
    if len(tasks) > 1:
        raise FastlesionError("compare: these runs mix classification and segmentation; compare each task apart")
    task = tasks[0] if tasks[0] in _RANKED_BY else "classification"
    columns = SEG_COMPARISON_COLUMNS if task == "segmentation" else COMPARISON_COLUMNS
    df = pd.DataFrame(rows, columns=columns)
    for col in columns[2:]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    key = _RANKED_BY[task][0]
    df = df.sort_values(key, ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    df.attrs["datasets"], df.attrs["task"] = datasets, task
    return df


# --------------------------------------------------------------------------------------------------- outputs
def _fmt(col: str, v: Any) -> str:
    """A table cell: AUC/accuracy/F1 to 4 decimals, parameters in millions, NaN as ``-``."""
    if isinstance(v, str):
        return v
    f = _num(v)
    if math.isnan(f):
        return "-"
    if col == "params":
        return f"{f / 1e6:.2f}M" if f >= 1e6 else f"{f / 1e3:.1f}K"
    if col in ("best_epoch", "epochs_run"):
        return f"{f:.0f}"
    if col == "epoch_seconds":
        return f"{f:.2f}"
    if col == "images_per_s":
        return f"{f:.1f}"
    return f"{f:.4f}"


def to_markdown(df: pd.DataFrame) -> str:
    """The comparison as a GitHub Markdown table (numbers formatted as in :func:`print_comparison`)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if c in ("run", "model") else "---:" for c in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(c, row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(df: pd.DataFrame, out_png: str | Path) -> Path:
    """Two horizontal bar panels, one bar per run: best validation AUC (segmentation: IoU) and training images/s
    (values annotated)."""
    plt = _pyplot()
    key, label = _RANKED_BY[df.attrs.get("task", "classification")]
    labels = [f"{r} ({m})" if m and m != r else str(r) for r, m in zip(df["run"], df["model"])][::-1]
    auc = df[key].to_numpy(dtype=float)[::-1]
    speed = df["images_per_s"].to_numpy(dtype=float)[::-1]
    y = np.arange(len(df))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(2.5, 0.45 * len(df) + 1.4)), sharey=True)
    a1.barh(y, np.nan_to_num(auc), color="tab:blue")
    a2.barh(y, np.nan_to_num(speed), color="tab:orange")
    for ax, vals, fmt in ((a1, auc, "{:.4f}"), (a2, speed, "{:.1f}")):
        top = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
        for yi, v in zip(y, vals):
            ax.text((0 if math.isnan(v) else v) + 0.01 * top, yi, "n/a" if math.isnan(v) else fmt.format(v),
                    va="center", fontsize=8)
        ax.set_xlim(0, top * 1.18 if top > 0 else 1.0)
        ax.grid(axis="x", alpha=0.3)
    a1.set_yticks(y, labels, fontsize=8)
    a1.set(xlabel=f"best {label.replace('val', 'validation')}", title=f"best {label}")
    a2.set(xlabel="training images/s", title="throughput")
    fig.tight_layout()
    return _save(fig, out_png)


def write_comparison(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv`` (raw values), ``comparison.md`` (Markdown table) and ``comparison.png`` (best val
    AUC and images/s per run) into ``out_dir`` (created).

    Returns:
        ``{"csv": ..., "md": ..., "png": ...}``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FastlesionError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "comparison.csv", "md": out / "comparison.md", "png": out / "comparison.png"}
    df.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(df))
    plot_comparison(df, paths["png"])
    return paths


def print_comparison(df: pd.DataFrame, console: Any = None) -> None:
    """Print the comparison as a rich table (best AUC highlighted); warns when the runs used different datasets.

    Args:
        df: :func:`compare_runs`' frame.
        console: a ``rich.console.Console`` (default: a new one on stdout).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    label = _RANKED_BY[df.attrs.get("task", "classification")][1]
    table = Table(title=f"run comparison (sorted by best {label})", box=box.SIMPLE_HEAD, padding=(0, 0),
                  show_edge=False)
    for col in df.columns:
        text = col in ("run", "model")  # names fold onto more lines in a narrow terminal; numbers stay whole
        width = max([len(_fmt(col, v)) for v in df[col]] + [1])
        table.add_column(SHORT_HEADERS.get(col, col), justify="left" if text else "right", overflow="fold",
                         min_width=None if text else width)
    for i, (_, row) in enumerate(df.iterrows()):
        table.add_row(*(_fmt(c, row[c]) for c in df.columns), style="bold green" if i == 0 and len(df) > 1 else None)
    console.print(table)
    datasets = df.attrs.get("datasets", [])
    if len(datasets) > 1:
        console.print(f"[yellow]warning:[/] these runs used different datasets ({', '.join(datasets)}): "
                      f"their {label.split()[-1]}s are not comparable")
