"""Tests of the extra dataset layouts: the ISIC 2020 challenge download, ISIC 2019, and data.extra_train."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fastlesion.cli import main
from fastlesion.config import DataConfig
from fastlesion.data import catalog
from fastlesion.data.catalog import detect_kind, load_dataset, load_isic2020, load_isic2020_test
from fastlesion.data.synthetic import generate
from fastlesion.errors import DatasetError


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


@pytest.fixture(scope="module")
def challenge(tmp_path_factory) -> Path:
    return generate("isic2020-challenge", tmp_path_factory.mktemp("chal"), n=40, seed=1, size=32,
                    positive_rate=0.3)


def test_challenge_layout_files(challenge: Path, tiny_isic: Path) -> None:
    names = sorted(p.name for p in challenge.iterdir() if not p.name.startswith("."))
    assert names == ["ISIC_2020_Test_Input", "ISIC_2020_Test_Metadata.csv", "ISIC_2020_Training_GroundTruth_v2.csv",
                     "ISIC_2020_Training_JPEG"]
    assert _header(challenge / "ISIC_2020_Training_GroundTruth_v2.csv") == [
        "image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
        "benign_malignant", "target"]
    assert _header(challenge / "ISIC_2020_Test_Metadata.csv") == ["image", "patient", "sex", "age_approx",
                                                                   "anatom_site"]
    assert len(list((challenge / "ISIC_2020_Training_JPEG").glob("*.jpg"))) == 40
    # a second call with the same parameters writes nothing
    mtime = (challenge / "ISIC_2020_Training_GroundTruth_v2.csv").stat().st_mtime_ns
    generate("isic2020-challenge", challenge, n=40, seed=1, size=32, positive_rate=0.3)
    assert (challenge / "ISIC_2020_Training_GroundTruth_v2.csv").stat().st_mtime_ns == mtime


def test_challenge_detected_and_loaded(challenge: Path) -> None:
    assert detect_kind(challenge) == "isic2020"
    ds = load_dataset(DataConfig(dataset="isic2020", root=str(challenge)))
    assert ds.kind == "isic2020" and ds.classes == ["benign", "malignant"]
    assert len(ds) == 40 and ds.table["label"].nunique() == 2
    assert all("/ISIC_2020_Training_JPEG/" in p for p in ds.table["path"])
    assert "lesion_id" in ds.table.columns
    assert (ds.table["group"] == ds.table["patient_id"]).all()
    test = load_isic2020_test(challenge)
    assert len(test) >= 4 and "image_name" in test.columns and "patient_id" in test.columns
    assert all("/ISIC_2020_Test_Input/" in p for p in test["path"])


def test_challenge_v1_csv_and_nested_jpeg_folder(challenge: Path, tmp_path: Path) -> None:
    """The older ``ISIC_2020_Training_GroundTruth.csv`` (no lesion_id), images in ``ISIC_2020_Training_JPEG/train/``."""
    root = tmp_path / "v1"
    (root / "ISIC_2020_Training_JPEG").mkdir(parents=True)
    shutil.copytree(challenge / "ISIC_2020_Training_JPEG", root / "ISIC_2020_Training_JPEG" / "train")
    with open(challenge / "ISIC_2020_Training_GroundTruth_v2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c != "lesion_id"]
    with open(root / "ISIC_2020_Training_GroundTruth.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    assert detect_kind(root) == "isic2020"
    ds = load_isic2020(root)
    assert len(ds) == 40 and "lesion_id" not in ds.table.columns


def test_challenge_same_set_as_kaggle_layout(challenge: Path, tmp_path: Path) -> None:
    kaggle = generate("isic2020", tmp_path / "k", n=40, seed=1, size=32, positive_rate=0.3)
    a, b = load_isic2020(kaggle).table, load_isic2020(challenge).table
    assert a["image_name"].tolist() == b["image_name"].tolist()
    assert a["label"].tolist() == b["label"].tolist()


def test_kaggle_train_csv_wins(tiny_isic: Path) -> None:
    assert catalog.isic2020_train_csv(tiny_isic).name == "train.csv"
    assert catalog.isic2020_test_csv(tiny_isic).name == "test.csv"


def test_challenge_test_without_image_column(challenge: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(challenge / "ISIC_2020_Test_Input", root / "ISIC_2020_Test_Input")
    (root / "ISIC_2020_Test_Metadata.csv").write_text("name,sex\nISIC_1,male\n")
    with pytest.raises(DatasetError, match="'image'"):
        load_isic2020_test(root)


def test_cli_synth_challenge(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert main(["synth", "--layout", "isic2020-challenge", "--out", str(out), "--n", "12", "--size", "32"]) == 0
    assert (out / "ISIC_2020_Training_GroundTruth_v2.csv").is_file()
    assert detect_kind(out) == "isic2020"


# ------------------------------------------------------------------------------------------------- ISIC 2019
@pytest.fixture(scope="module")
def isic2019(tmp_path_factory) -> Path:
    return generate("isic2019", tmp_path_factory.mktemp("i19"), n=60, seed=3, size=32)


def test_isic2019_layout_files(isic2019: Path) -> None:
    names = sorted(p.name for p in isic2019.iterdir() if not p.name.startswith("."))
    assert names == ["ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Input",
                     "ISIC_2019_Training_Metadata.csv"]
    assert _header(isic2019 / "ISIC_2019_Training_GroundTruth.csv") == [
        "image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert _header(isic2019 / "ISIC_2019_Training_Metadata.csv") == [
        "image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    assert len(list((isic2019 / "ISIC_2019_Training_Input").glob("*.jpg"))) == 60


def test_isic2019_detected_and_loaded(isic2019: Path) -> None:
    assert detect_kind(isic2019) == "isic2019"
    ds = load_dataset(DataConfig(dataset="isic2019", root=str(isic2019)))
    assert ds.kind == "isic2019"
    assert ds.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]  # UNK all zero: dropped
    assert len(ds) == 60 and set(ds.table["label"]) == set(range(8))
    truth = pd.read_csv(isic2019 / "ISIC_2019_Training_GroundTruth.csv").set_index("image")
    for _, r in ds.table.iterrows():
        assert truth.loc[r["image"], ds.classes[r["label"]]] == 1.0
    assert (ds.table["group"] == ds.table["lesion_id"]).all()
    assert "anatom_site_general" in ds.table.columns


def test_isic2019_unk_kept_and_group_fallback(tmp_path: Path, isic2019: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(isic2019 / "ISIC_2019_Training_Input", root / "ISIC_2019_Training_Input")
    truth = pd.read_csv(isic2019 / "ISIC_2019_Training_GroundTruth.csv")
    truth.loc[0, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]] = 0.0
    truth.loc[0, "UNK"] = 1.0
    truth.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)  # no metadata CSV
    ds = load_dataset(DataConfig(dataset="isic2019", root=str(root)))
    assert ds.classes[-1] == "UNK" and ds.table.loc[ds.table["image"] == truth.loc[0, "image"], "label"].item() == 8
    assert (ds.table["group"] == ds.table["image"]).all()
    truth.loc[1, "MEL"] = 1.0
    truth.loc[1, "NV"] = 1.0
    truth.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    with pytest.raises(DatasetError, match="exactly one 1"):
        load_dataset(DataConfig(dataset="isic2019", root=str(root)))


def test_cli_synth_isic2019(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert main(["synth", "--layout", "isic2019", "--out", str(out), "--n", "10", "--size", "32"]) == 0
    assert detect_kind(out) == "isic2019"


# ------------------------------------------------------------------------------------------------- extra_train
def test_extra_train_config_forms() -> None:
    assert DataConfig().extra_train is None
    assert DataConfig(extra_train="/a, /b").extra_train == ["/a", "/b"]
    from fastlesion.config import load_config

    assert load_config(None, ["data.extra_train=/x,/y"]).data.extra_train == ["/x", "/y"]
    assert load_config(None, ["data.extra_train=[/x]"]).data.extra_train == ["/x"]


def test_extra_train_isic2019_onto_isic2020(tiny_isic: Path, isic2019: Path, tmp_path: Path) -> None:
    from fastlesion.data.splits import add_extra_train, split_dataset

    root = tmp_path / "isic"
    shutil.copytree(tiny_isic, root)
    cfg = DataConfig(dataset="isic2020", root=str(root), extra_train=[str(isic2019)])
    ds = load_dataset(cfg)
    plain = split_dataset(ds, cfg)
    split = add_extra_train(plain, ds, cfg)
    assert len(split.train) == len(plain.train) + 60
    assert split.val["path"].tolist() == plain.val["path"].tolist() and len(split.test) == len(plain.test)
    extra = split.train.iloc[len(plain.train):]
    assert set(extra["extra_root"]) == {str(isic2019.resolve())}
    mel = extra["source_class"] == "MEL"
    assert mel.any() and (extra.loc[mel, "label"] == 1).all() and (extra.loc[~mel, "label"] == 0).all()
    folds = pd.read_csv(split.folds_file)
    assert len(folds) == len(ds) and not folds["key"].str.contains("ISIC_2019_Training_Input").any()


def test_extra_train_unmappable_class_is_named(tiny_ham: Path, isic2019: Path, tmp_path: Path) -> None:
    from fastlesion.data.catalog import load_extra_train

    cfg = DataConfig(dataset="ham10000", root=str(tiny_ham), extra_train=[str(isic2019)])
    with pytest.raises(DatasetError, match="'SCC'"):
        load_extra_train(load_dataset(cfg), cfg)
    # with data.class_map's catch-all, SCC goes where the main set's unnamed classes go
    cfg = DataConfig(dataset="ham10000", root=str(tiny_ham), extra_train=[str(isic2019)], class_map="ham3")
    extra = load_extra_train(load_dataset(cfg), cfg)
    classes = ["mel", "nv", "other"]
    assert {s: classes[v] for s, v in zip(extra["source_class"], extra["label"], strict=True)} == {
        "MEL": "mel", "NV": "nv", "BCC": "other", "AK": "other", "BKL": "other", "DF": "other", "VASC": "other",
        "SCC": "other"}


def test_extra_train_run(tiny_isic: Path, isic2019: Path, tmp_path: Path) -> None:
    import json

    root = tmp_path / "isic"
    shutil.copytree(tiny_isic, root)
    common = ["--data", str(root), "--model", "lenet", "--epochs", "1", "--quiet", "--backend", "torch",
              "--workers", "0", "--image-size", "32", "--batch-size", "16"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--data.extra_train", str(isic2019)]) == 0
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert b["n_train"] == a["n_train"] + 60 and b["n_val"] == a["n_val"]
    pa, pb = (pd.read_csv(tmp_path / r / "predictions_val.csv") for r in "ab")
    assert len(pa) == len(pb)
    assert not any("ISIC_2019_Training_Input" in str(v) for v in pb.to_numpy().ravel())
    assert sorted(pa.iloc[:, 0].astype(str)) == sorted(pb.iloc[:, 0].astype(str))
