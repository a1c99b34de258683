"""Segmentation end to end on CPU (``train.task=segmentation``): a small U-Net learns the synthetic masks, the run
folder has the segmentation columns and plots, resume, eval, predict (masks at the image's own size), DDP, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastlesion.cli import main
from fastlesion.config import ConfigError, load_config
from fastlesion.engine.rundir import metric_columns
from fastlesion.engine.train import train
from fastlesion.metrics import SEG_VAL_METRICS

SMALL = "unet_mobilenetv3_small_050"


def seg_cfg(root: Path, out: Path, **over):
    base = {"train.task": "segmentation", "data.dataset": "isic2018-seg", "data.root": str(root),
            "data.image_size": 64, "model.name": SMALL, "loader.backend": "torch", "loader.workers": 0,
            "loader.batch_size": 16, "train.epochs": 2, "optim.lr": 3e-3, "optim.warmup_epochs": 0.0,
            "train.patience": 0, "run.out": str(out), "run.quiet": True,
            "data.folds_file": str(out.parent / f"{out.name}-folds.csv")}
    base.update(over)
    return load_config(None, base)


@pytest.fixture(scope="module")
def seg_set(tmp_path_factory) -> Path:
    from fastlesion.data.synthetic import generate

    return generate("isic2018-seg", tmp_path_factory.mktemp("seg"), n=160, seed=0, size=160, workers=2)


@pytest.fixture(scope="module")
def learned(seg_set, tmp_path_factory) -> tuple[Path, dict]:
    # Measured (2-core CPU, torch 2.14, fp32): val_dice 0.862 with train.seed 42 and 0.841 with seed 1 after 8 epochs;
    # predicting the lesion everywhere gives about 0.2 on this set (lesions cover ~10 % of an image). 0.7 is far
    # above that and below every measured run: a failure means the pipeline stopped learning.
    out = tmp_path_factory.mktemp("segrun") / "run"
    summary = train(seg_cfg(seg_set, out, **{"train.epochs": 8}))
    return out, summary


def test_small_unet_learns_and_writes_the_run_folder(learned):
    out, summary = learned
    assert summary["val_dice"] > 0.7, summary
    assert summary["task"] == "segmentation" and summary["best_metric"] == "val_iou"
    for k in SEG_VAL_METRICS:
        assert k in summary
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == metric_columns("segmentation") and len(m) == 8
    assert summary["best_epoch"] == int(m.loc[m["val_iou"].idxmax(), "epoch"])
    assert m["val_jaccard65"].le(m["val_iou"] + 1e-9).all()  # thresholding only lowers the per-image IoU
    for f in ("config.yaml", "best.pt", "last.pt", "summary.json", "plots/curves.png", "plots/overlays.png"):
        assert (out / f).is_file(), f
    assert not (out / "metrics_per_class.csv").exists() and not (out / "plots/roc.png").exists()
    pred = pd.read_csv(out / "predictions_val.csv")
    assert {"path", "mask", "dice", "iou", "jaccard65", "loss"} <= set(pred.columns)
    assert len(pred) == summary["n_val"] and pred["path"].is_unique


def test_eval_reports_the_segmentation_metrics(learned, capsys):
    out, summary = learned
    assert main(["eval", str(out / "best.pt"), "--out", str(out / "ev")]) == 0
    line = capsys.readouterr().out
    assert "dice" in line and "jaccard65" in line
    r = json.loads((out / "ev" / "metrics.json").read_text())
    assert r["n"] == summary["n_val"] and r["dice"] == pytest.approx(summary["val_dice"], abs=1e-6)
    assert (out / "ev" / "plots" / "overlays.png").is_file()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_predict_writes_masks_at_the_original_size_that_overlay_their_images(learned, seg_set, tmp_path):
    out, _ = learned
    images = sorted((seg_set / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[:6]
    truth_dir = seg_set / "ISIC2018_Task1_Training_GroundTruth"
    src = tmp_path / "in"
    src.mkdir()
    sizes = [(160, 120), (200, 150), (96, 128)]  # the original, a larger copy, a portrait one
    for k, p in enumerate(images):
        w, h = sizes[k % 3]
        Image.open(p).resize((w, h), Image.BILINEAR).save(src / p.name, quality=95)
    masks = tmp_path / "masks"
    assert main(["predict", str(out / "best.pt"), "--data", str(src), "--out", str(masks), "--tta"]) == 0
    listed = pd.read_csv(masks / "masks.csv")
    assert len(listed) == len(images)
    ious = []
    for k, p in enumerate(images):
        m = Image.open(masks / f"{p.stem}_segmentation.png")
        assert m.mode == "L" and m.size == sizes[k % 3]
        pred = np.asarray(m)
        assert set(np.unique(pred)) <= {0, 255}
        truth = np.asarray(Image.open(truth_dir / f"{p.stem}_segmentation.png").resize(m.size, Image.NEAREST)) > 0
        ious.append(_iou(pred > 0, truth))
    # the masks lie on their lesions at every size: a mask flipped or scaled wrongly would score near 0
    assert np.mean(ious) > 0.6, ious


def test_resume_continues_a_segmentation_run(seg_set, tmp_path):
    out = tmp_path / "run"
    train(seg_cfg(seg_set, out, **{"train.epochs": 1, "data.limit": 48}))
    summary = train(seg_cfg(seg_set, out, **{"train.epochs": 2, "data.limit": 48}), resume=out)
    assert summary["epochs_run"] == 2 and len(pd.read_csv(out / "metrics.csv")) == 2


def test_ddp_evaluates_every_validation_image_once(seg_set, tmp_path):
    out = tmp_path / "ddp"
    summary = train(seg_cfg(seg_set, out, **{"train.epochs": 1, "train.ddp": 2, "data.limit": 50,
                                              "loader.batch_size": 8}))
    pred = pd.read_csv(out / "predictions_val.csv")
    assert summary["world_size"] == 2 and len(pred) == summary["n_val"] and pred["path"].is_unique


def test_a_synthetic_segmentation_run_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLESION_CACHE", str(tmp_path / "cache"))
    rc = main(["train", "--task", "segmentation", "--model", SMALL, "--image-size", "32", "--epochs", "1",
               "--backend", "torch", "--workers", "0", "--data.synthetic_n", "24", "--out", str(tmp_path / "r"),
               "--quiet"])
    assert rc == 0 and "val_dice" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["dataset"] == "synthetic"


def test_an_isic2018_root_implies_segmentation(seg_set):
    from fastlesion.cli import build_config, make_parser

    args, extra = make_parser().parse_known_args(["train", "--data", str(seg_set)])
    cfg = build_config(args, extra)
    assert cfg.train.task == "segmentation" and cfg.data.dataset == "isic2018-seg"
    assert (cfg.model.name, cfg.optim.loss, cfg.train.early_stop_metric) == ("unet_resnet34", "dice_bce", "val_iou")


@pytest.mark.parametrize("args, culprit", [
    (["--task", "segmentation", "--model", "resnet18"], "model.name"),  # a classifier asked for by name
    (["--task", "segmentation", "--model", "lenet"], "model.name"),
    (["--model", SMALL], "model.name"),
    (["--task", "segmentation", "--optim.loss", "focal"], "optim.loss"),
    (["--task", "segmentation", "--image-size", "100"], "data.image_size"),
])
def test_a_task_mismatch_is_one_error_line(args, culprit, tmp_path, capsys):
    rc = main(["train", *args, "--epochs", "1", "--backend", "torch", "--data.synthetic_n", "24",
               "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error:") and culprit in err[0], err


def test_classification_values_asked_for_by_name_are_refused():
    with pytest.raises(ConfigError, match="optim.loss"):
        load_config(None, ["train.task=segmentation", "optim.loss=ce"])
    with pytest.raises(ConfigError, match="train.early_stop_metric"):
        load_config(None, ["train.task=segmentation", "train.early_stop_metric=val_auc"])
    cfg = load_config(None, ["train.task=segmentation", "train.early_stop_metric=val_dice"])
    assert cfg.train.early_stop_metric == "val_dice"


def test_compare_ranks_segmentation_runs_by_iou(learned, tmp_path, capsys):
    from fastlesion.report import SEG_COMPARISON_COLUMNS, compare_runs

    out, summary = learned
    df = compare_runs([out])
    assert list(df.columns) == SEG_COMPARISON_COLUMNS and df.attrs["task"] == "segmentation"
    assert df["best_val_iou"].iloc[0] == pytest.approx(summary["val_iou"])
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert "IoU" in capsys.readouterr().out and (tmp_path / "cmp" / "comparison.png").is_file()
