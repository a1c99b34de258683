"""Plots write real PNGs; run comparison reads hand-made run folders, orders them and writes CSV/Markdown/PNG."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from fastlesion import report
from fastlesion.errors import FastlesionError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def write_metrics(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)


def make_run(root: Path, name: str, summary: dict | None, rows: list[dict]) -> Path:
    run = root / name
    write_metrics(run, rows)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def epoch_rows(aucs: list[float], seconds: list[float], ips: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1), "val_auc": a,
             "val_accuracy": 0.5 + a / 4, "val_balanced_accuracy": a - 0.05, "val_f1": a / 2, "lr": 1e-3 / (i + 1),
             "epoch_seconds": s, "images_per_s": r}
            for i, (a, s, r) in enumerate(zip(aucs, seconds, ips))]


# --------------------------------------------------------------------------------------------------- plots
def test_plot_curves(tmp_path):
    write_metrics(tmp_path / "run", epoch_rows([0.6, 0.7, 0.65], [10, 4, 5], [100, 250, 240]))
    assert_png(report.plot_curves(tmp_path / "run" / "metrics.csv", tmp_path / "run" / "plots" / "curves.png"))


def test_plot_curves_tolerates_missing_columns_and_nan(tmp_path):
    pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.9, np.nan, 0.5], "val_auc": [np.nan, np.nan, np.nan]}).to_csv(
        tmp_path / "metrics.csv", index=False)
    assert_png(report.plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png"))
    (tmp_path / "empty.csv").write_text("epoch,train_loss,val_loss,val_auc,lr\n")
    assert_png(report.plot_curves(tmp_path / "empty.csv", tmp_path / "empty.png"))


def test_plot_curves_missing_file(tmp_path):
    with pytest.raises(FastlesionError, match="nothere.csv"):
        report.plot_curves(tmp_path / "nothere.csv", tmp_path / "x.png")


def test_plot_roc_binary_multiclass_and_single_class(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(0.4 * y + 0.6 * rng.random(60), 0, 1)
    assert_png(report.plot_roc(y, np.stack([1 - p1, p1], 1), ["benign", "malignant"], tmp_path / "roc.png"))
    y3 = rng.integers(0, 3, 90)
    p3 = rng.dirichlet(np.ones(3), 90)
    assert_png(report.plot_roc(y3, p3, ["a", "b", "c"], tmp_path / "roc3.png"))
    assert_png(report.plot_roc(np.zeros(5, dtype=int), np.full((5, 2), 0.5), None, tmp_path / "roc1.png"))


def test_plot_confusion(tmp_path):
    cm = [[50, 3, 0], [4, 20, 1], [0, 0, 0]]  # an empty row must not divide by zero
    assert_png(report.plot_confusion(cm, ["nv", "mel", "bkl"], tmp_path / "cm.png"))
    assert_png(report.plot_confusion(np.array(cm), None, tmp_path / "cm_counts.png", normalize=False))
    with pytest.raises(FastlesionError, match="class names"):
        report.plot_confusion(cm, ["nv", "mel"], tmp_path / "bad.png")
    with pytest.raises(FastlesionError, match="square"):
        report.plot_confusion([[1, 2, 3]], None, tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------------- compare
@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    lenet = make_run(tmp_path, "lenet", {
        "model": "lenet", "params": 61_706, "dataset": "isic2020", "val_auc": 0.71, "val_accuracy": 0.80,
        "val_f1": 0.30, "best_epoch": 2, "epochs_run": 3, "images_per_s": 900.0, "epoch_seconds": 2.0,
    }, epoch_rows([0.6, 0.71, 0.7], [9.0, 2.0, 4.0], [500, 900, 910]))
    # an older summary: no val_f1 and no epoch_seconds -> taken from metrics.csv
    resnet = make_run(tmp_path, "resnet18", {
        "model": "resnet18", "params": 11_177_538, "val_auc": 0.88, "val_accuracy": 0.90, "best_epoch": 1,
        "epochs_run": 2, "images_per_s": 300.0,
    }, epoch_rows([0.88, 0.86], [30.0, 12.0], [200, 300]))
    return [lenet, resnet]


def test_compare_runs_orders_and_fills(two_runs):
    df = report.compare_runs(two_runs)
    assert list(df.columns) == report.COMPARISON_COLUMNS
    assert list(df["run"]) == ["resnet18", "lenet"]  # best val AUC first
    r, lenet = df.iloc[0], df.iloc[1]
    assert r["model"] == "resnet18" and r["params"] == 11_177_538
    assert r["best_val_auc"] == pytest.approx(0.88) and r["best_val_accuracy"] == pytest.approx(0.90)
    assert r["best_val_f1"] == pytest.approx(0.44)  # the best epoch's (1) val_f1 in metrics.csv
    assert r["epoch_seconds"] == pytest.approx(12.0)  # mean after the first epoch
    assert r["best_epoch"] == 1 and r["epochs_run"] == 2 and r["images_per_s"] == pytest.approx(300.0)
    assert lenet["best_val_f1"] == pytest.approx(0.30)  # the summary wins when it has the value
    assert lenet["epoch_seconds"] == pytest.approx(3.0)
    assert df.attrs["datasets"] == ["isic2020"]


def test_compare_runs_fallbacks_from_metrics_csv(tmp_path):
    run = make_run(tmp_path, "bare", {"model": "m"}, epoch_rows([0.5, 0.9, 0.8], [5.0, 1.0, 3.0], [10, 20, 40]))
    nan_run = make_run(tmp_path, "nan", {"model": "n", "val_auc": float("nan")}, [])
    df = report.compare_runs([nan_run, run])
    assert list(df["run"]) == ["bare", "nan"]  # NaN AUC sorts last
    row = df.iloc[0]
    assert row["best_epoch"] == 2 and row["best_val_auc"] == pytest.approx(0.9)
    assert row["epochs_run"] == 3 and row["images_per_s"] == pytest.approx(30.0)
    assert math.isnan(df.iloc[1]["best_val_auc"]) and math.isnan(df.iloc[1]["params"])


def test_compare_runs_missing_summary_names_the_folder(tmp_path, two_runs):
    unfinished = make_run(tmp_path, "unfinished_run", None, epoch_rows([0.5], [1.0], [10]))
    with pytest.raises(FastlesionError, match="unfinished_run"):
        report.compare_runs([*two_runs, unfinished])
    with pytest.raises(FastlesionError, match="no_such_run"):
        report.compare_runs([tmp_path / "no_such_run"])
    with pytest.raises(FastlesionError):
        report.compare_runs([])


def test_write_and_print_comparison(tmp_path, two_runs):
    df = report.compare_runs(two_runs)
    paths = report.write_comparison(df, tmp_path / "comparison")
    assert set(paths) == {"csv", "md", "png"}
    back = pd.read_csv(paths["csv"])
    assert list(back["run"]) == ["resnet18", "lenet"] and back["best_val_auc"].iloc[0] == pytest.approx(0.88)
    md = paths["md"].read_text().splitlines()
    assert md[0].startswith("| run | model |") and len(md) == 4
    assert "0.8800" in md[2] and "11.18M" in md[2]
    assert_png(paths["png"])
    buf = io.StringIO()
    report.print_comparison(df, Console(file=buf, width=200))
    out = buf.getvalue()
    assert "resnet18" in out and "lenet" in out and "0.8800" in out
