"""data.class_map: source labels grouped into training classes for any dataset kind, its config forms, the folds
file keyed by the mapping, and a run whose classes, metrics, predictions and checkpoint are the mapped ones."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from fastlesion.cli import main
from fastlesion.config import load_config, save_config
from fastlesion.data.catalog import HAM_CLASSES, load_dataset
from fastlesion.data.splits import default_folds_file, split_dataset
from fastlesion.engine import checkpoint as ckpt
from fastlesion.errors import ConfigError, DatasetError

HAM3 = {"mel": "mel", "nv": "nv", "*": "other"}


@pytest.fixture
def ham_root(tiny_ham, tmp_path):
    """A private copy: the default folds files are written into the root."""
    root = tmp_path / "ham"
    shutil.copytree(tiny_ham, root)
    return root


# --------------------------------------------------------------------------------------------------- config
def test_config_forms_and_round_trip(tmp_path, capsys) -> None:
    assert load_config(None, {"data.class_map": "ham3"}).data.class_map == HAM3
    inline = load_config(None, ["data.class_map={akiec: other, bcc: other, mel: mel, '*': rest}"]).data.class_map
    assert inline == {"akiec": "other", "bcc": "other", "mel": "mel", "*": "rest"}
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  class_map:\n    mel: melanoma\n    '*': other\n    0: zero\n")
    cfg = load_config(f)
    assert cfg.data.class_map == {"mel": "melanoma", "*": "other", "0": "zero"}
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml").data.class_map == cfg.data.class_map
    assert list(yaml.safe_load((tmp_path / "again.yaml").read_text())["data"]["class_map"]) == ["mel", "*", "0"]
    assert main(["config", "--data.class_map", "ham3"]) == 0
    assert "class_map" in capsys.readouterr().out
    for bad, match in (("nope", "neither a preset"), ("{mel: }", "cannot read"), ("[mel, nv]", "neither a preset")):
        with pytest.raises(ConfigError, match=f"data.class_map: .*{match}"):
            load_config(None, {"data.class_map": bad})
    with pytest.raises(ConfigError, match="data.class_map"):
        load_config(None, {"data.class_map": {"mel": None}})


# --------------------------------------------------------------------------------------------------- dataset
def test_ham3_groups_the_labels(ham_root) -> None:
    plain = load_dataset(load_config(None, {"data.dataset": "ham10000", "data.root": str(ham_root)}).data)
    mapped = load_dataset(load_config(None, {"data.dataset": "ham10000", "data.root": str(ham_root),
                                             "data.class_map": "ham3"}).data)
    assert plain.classes == HAM_CLASSES and mapped.classes == ["mel", "nv", "other"]
    dx = plain.table["dx"]
    expect = dx.map(lambda d: d if d in ("mel", "nv") else "other").map(mapped.classes.index)
    assert mapped.table["label"].tolist() == expect.tolist()
    assert mapped.table["source_class"].tolist() == dx.tolist()


def test_order_of_first_appearance(tiny_isic) -> None:
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic),
                             "data.class_map": "{malignant: cancer, benign: harmless}"})
    ds = load_dataset(cfg.data)
    assert ds.classes == ["cancer", "harmless"]
    assert (ds.table["label"] == 1 - ds.table["target"]).all()


def test_unmapped_and_unknown_labels_are_named(ham_root) -> None:
    base = {"data.dataset": "ham10000", "data.root": str(ham_root)}
    with pytest.raises(DatasetError, match=r"source class 'akiec' is not mapped \(5 unmapped: akiec, bcc, bkl, df, "
                                           r"vasc\); .*'\*'"):
        load_dataset(load_config(None, {**base, "data.class_map": "{mel: mel, nv: nv}"}).data)
    with pytest.raises(DatasetError, match="'mle' is not a class of this ham10000 dataset"):
        load_dataset(load_config(None, {**base, "data.class_map": "{mle: mel, '*': other}"}).data)
    with pytest.raises(DatasetError, match="every image maps to the one class 'all'"):
        load_dataset(load_config(None, {**base, "data.class_map": "{'*': all}"}).data)


def test_folds_file_is_keyed_by_the_mapping(ham_root, tmp_path) -> None:
    base = {"data.dataset": "ham10000", "data.root": str(ham_root)}
    plain_cfg = load_config(None, base).data
    mapped_cfg = load_config(None, {**base, "data.class_map": "ham3"}).data
    plain, mapped = load_dataset(plain_cfg), load_dataset(mapped_cfg)
    a, b = default_folds_file(plain, plain_cfg), default_folds_file(mapped, mapped_cfg)
    assert a != b and b.name.startswith("folds_k5_s42_m") and a.name == "folds_k5_s42.csv"
    split_dataset(plain, plain_cfg)
    split = split_dataset(mapped, mapped_cfg)
    assert a.is_file() and b.is_file() and split.folds_file == b
    folds = pd.read_csv(b)
    label_of = dict(zip(mapped.table["path"].map(lambda p: str(p)[len(str(ham_root)) + 1:]), mapped.table["label"]))
    assert folds["label"].tolist() == [label_of[k] for k in folds["key"]]  # stratified on the mapped labels
    # a folds file made for the source labels is refused for a mapped run (and the other way round)
    shared = load_config(None, {**base, "data.class_map": "ham3", "data.folds_file": str(a)}).data
    with pytest.raises(DatasetError, match="made with other labels .*data.class_map"):
        split_dataset(mapped, shared)


# --------------------------------------------------------------------------------------------------- a run
def test_run_uses_the_mapped_classes(ham_root, tmp_path, capsys) -> None:
    out = tmp_path / "r"
    args = ["train", "--data", str(ham_root), "--data.class_map", "ham3", "--model", "lenet", "--epochs", "1",
            "--quiet", "--out", str(out), "--backend", "torch", "--workers", "0", "--image-size", "32",
            "--batch-size", "16"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["mel", "nv", "other"] and len(summary["confusion"]) == 3
    assert {"val_recall_mel", "val_support_other", "val_average_precision"} <= set(summary)
    assert ckpt.load(out / "best.pt")["classes"] == ["mel", "nv", "other"]
    preds = pd.read_csv(out / "predictions_val.csv")
    assert [c for c in preds.columns if c.startswith("prob_")] == ["prob_mel", "prob_nv", "prob_other"]
    per_class = pd.read_csv(out / "metrics_per_class.csv")
    assert list(per_class.columns)[:5] == ["epoch", "val_precision_mel", "val_recall_mel", "val_f1_mel",
                                           "val_support_mel"]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["class_map"] == HAM3
    assert (out / "plots" / "pr.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(out / "best.pt")]) == 0  # eval rebuilds the mapped dataset from the run's config
