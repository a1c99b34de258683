"""``fastlesion eda``: class balance per fold (the training folds), groups, header-only image sizes, metadata and
sample grids, and summary.md linking them."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.data.catalog import load_dataset
from fastlesion.data.splits import split_dataset
from fastlesion.eda import image_sizes, run_eda


def test_eda_ham_writes_everything(tiny_ham, tmp_path, capsys):
    out = tmp_path / "eda"
    assert main(["eda", str(tiny_ham), "--out", str(out), "--samples", "3"]) == 0
    assert "140 images, 7 classes" in capsys.readouterr().out
    for name in ("class_counts.csv", "class_by_fold.png", "images_per_group.png", "image_sizes.png",
                 "image_sizes.csv", "age.png", "sex.png", "site.png", "metadata_counts.csv", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for cls in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"):
        assert (out / f"samples_{cls}.png").is_file(), cls
    counts = pd.read_csv(out / "class_counts.csv")
    assert counts["all"].sum() == 140 and counts["fraction"].sum() == pytest.approx(1.0)
    folds = [c for c in counts.columns if c.startswith("fold_")]
    assert len(folds) == 5 and counts[folds].to_numpy().sum() == 140
    meta = pd.read_csv(out / "metadata_counts.csv")
    assert set(meta["variable"]) == {"sex", "localization"}
    md = (out / "summary.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", md):  # every figure linked exists
        assert (out / link).is_file(), link
    assert "## Classes" in md and "## Groups" in md and "## Image sizes" in md and "48x36" in md


def test_eda_fold_counts_match_training_split(tiny_isic, tmp_path):
    res = run_eda(tiny_isic, tmp_path / "eda", dataset="isic2020", samples=2)
    assert res["classes"] == ["benign", "malignant"] and res["n_images"] == 80
    counts = pd.read_csv(tmp_path / "eda" / "class_counts.csv")
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic)}).data
    val = split_dataset(load_dataset(cfg, progress=False), cfg, fold=2).val  # the same (cached) folds file
    assert counts["fold_2"].tolist() == val["label"].value_counts().reindex([0, 1], fill_value=0).tolist()
    assert (tmp_path / "eda" / "samples_malignant.png").is_file()
    assert "age_approx" in (tmp_path / "eda" / "summary.md").read_text()


def test_image_sizes_reads_headers_and_survives_bad_files(tiny_isic, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = sorted((tiny_isic / "train").glob("*.jpg"))[0]
    df = image_sizes([str(good), str(bad)])
    assert df.loc[0, "width"] == 64 and df.loc[0, "height"] == 48 and df.loc[1].isna()[["width", "height"]].all()


def test_eda_missing_root_is_an_error_line(tmp_path, capsys):
    assert main(["eda", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error:")
