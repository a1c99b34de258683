"""``fastlesion eval`` / ``predict`` on other data: layout detection, and the ISIC submission's class check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.engine.inference import _data_overrides, predict
from fastlesion.engine.train import train
from fastlesion.errors import FastlesionError


def _train(root: Path, out: Path, dataset: str) -> Path:
    """A 1-epoch LeNet at 32 px (as in test_engine); returns its best.pt."""
    cfg = load_config(None, {
        "data.dataset": dataset, "data.root": str(root), "data.image_size": 32, "model.name": "lenet",
        "loader.backend": "torch", "loader.workers": 0, "loader.batch_size": 16, "train.epochs": 1,
        "optim.warmup_epochs": 0.0, "run.out": str(out), "run.quiet": True,
        "data.folds_file": str(out.parent / f"{out.name}-folds.csv")})
    train(cfg)
    return out / "best.pt"


def _class_folders(isic: Path, dest: Path, names: tuple[str, str]) -> Path:
    """The ISIC training images as a ``folder`` dataset: one sub-folder per class, named ``names``."""
    table = pd.read_csv(isic / "train.csv")
    for name, target in zip(table["image_name"], table["target"], strict=True):
        (dest / names[target]).mkdir(parents=True, exist_ok=True)
        shutil.copy(isic / "train" / f"{name}.jpg", dest / names[target] / f"{name}.jpg")
    return dest


@pytest.fixture(scope="module")
def ckpts(tiny_isic, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints: ``isic`` (isic2020 kind), ``folder`` (folder kind, classes benign/malignant), ``catdog``."""
    tmp = tmp_path_factory.mktemp("ckpts")
    return {
        "isic": _train(tiny_isic, tmp / "isic", "isic2020"),
        "folder": _train(_class_folders(tiny_isic, tmp / "bm", ("benign", "malignant")), tmp / "folder", "folder"),
        "catdog": _train(_class_folders(tiny_isic, tmp / "cd", ("cat", "dog")), tmp / "catdog", "folder"),
    }


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


# --------------------------------------------------------------------------------------------------- predict
def test_predict_isic_submission_needs_isic_classes(ckpts, tiny_isic, tmp_path, capsys):
    sub = tmp_path / "sub.csv"
    assert main(["predict", str(ckpts["catdog"]), "--data", str(tiny_isic), "--out", str(sub)]) == 2
    err = _err(capsys)
    assert "['cat', 'dog']" in err and "['benign', 'malignant']" in err and str(ckpts["catdog"]) in err
    assert not sub.exists()
    with pytest.raises(FastlesionError, match="not the ISIC 2020 classes"):
        predict(ckpts["catdog"], tiny_isic, sub)


def test_predict_isic_submission_with_isic_classes(ckpts, tiny_isic, tmp_path):
    # a folder-kind checkpoint whose classes are benign/malignant may write the submission
    df = predict(ckpts["folder"], tiny_isic, tmp_path / "sub.csv")
    assert list(df.columns) == ["image_name", "target"]
    assert sorted(df["image_name"]) == sorted(pd.read_csv(tiny_isic / "test.csv")["image_name"])


def test_predict_folder_of_images_any_classes(ckpts, tiny_isic, tmp_path):
    out = tmp_path / "catdog.csv"
    assert main(["predict", str(ckpts["catdog"]), "--data", str(tiny_isic / "test"), "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["image", "target"] and len(df) == len(list((tiny_isic / "test").glob("*.jpg")))
    assert df["target"].between(0, 1).all()


# --------------------------------------------------------------------------------------------------- eval
def test_eval_detects_layout_then_reports_class_mismatch(ckpts, tiny_ham, capsys):
    # without detection the isic2020 kind of the checkpoint was kept: "<ham>/train.csv: ... not found"
    assert main(["eval", str(ckpts["isic"]), "--data", str(tiny_ham)]) == 2
    err = _err(capsys)
    assert "classes" in err and "akiec" in err and "train.csv" not in err


def test_eval_detects_isic_layout_for_folder_checkpoint(ckpts, tiny_isic, tmp_path, capsys):
    # the checkpoint is folder-kind: read as a folder, the ISIC root would have the classes test/train
    out = tmp_path / "ev"
    assert main(["eval", str(ckpts["folder"]), "--data", str(tiny_isic), "--split", "all", "--out", str(out)]) == 0
    assert "auc" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["n"] == 80


def test_eval_explicit_dataset_wins(ckpts, tiny_isic, capsys):
    # --dataset (or --data.dataset) given: no detection, the folder kind reads test/ and train/ as classes
    for flag in (["--dataset", "folder"], ["--data.dataset", "folder"]):
        assert main(["eval", str(ckpts["folder"]), "--data", str(tiny_isic), "--split", "all", *flag]) == 2
        assert "['test', 'train']" in _err(capsys)


def test_data_overrides():
    cfg = load_config(None, {})
    csv_cfg = load_config(None, {"data.dataset": "csv", "data.csv": "labels.csv"})
    assert _data_overrides(cfg, None, None) == []
    assert _data_overrides(cfg, None, "folder") == ["data.dataset=folder"]
    assert _data_overrides(cfg, "/nowhere", "ham10000") == ["data.root=/nowhere", "data.dataset=ham10000"]
    assert _data_overrides(cfg, "/nowhere", None) == ["data.root=/nowhere", "data.dataset=folder"]
    # a csv checkpoint on a root of no known layout stays csv (its data.csv names the images)
    assert _data_overrides(csv_cfg, "/nowhere", None) == ["data.root=/nowhere", "data.dataset=csv"]
