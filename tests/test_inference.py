"""``fastlesion eval`` / ``predict`` on other data: layout detection, and the ISIC submission's class check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import train_tiny

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.engine.inference import _data_overrides, predict
from fastlesion.errors import FastlesionError


def _train(root: Path, out: Path, dataset: str) -> Path:
    """A 1-epoch LeNet at 32 px (as in test_engine); returns its best.pt."""
    return train_tiny(root, out, dataset=dataset)


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


# --------------------------------------------------------------------------------------------------- issue 10: predict
@pytest.fixture(scope="module")
def ham_ckpt(tiny_ham, tmp_path_factory) -> Path:
    """A 7-class (HAM10000) checkpoint."""
    return _train(tiny_ham, tmp_path_factory.mktemp("ham") / "ham", "ham10000")


def test_predict_multiclass_on_isic_root_warns_it_is_no_submission(ham_ckpt, tiny_isic, tmp_path, capsys, caplog):
    sub = tmp_path / "sub.csv"
    with caplog.at_level("WARNING"):
        assert main(["predict", str(ham_ckpt), "--data", str(tiny_isic), "--out", str(sub)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "not the ISIC 2020 submission format (image_name,target)" in warned[0], warned
    assert str(sub) in warned[0] and "image_name,akiec,bcc" in warned[0]
    assert list(pd.read_csv(sub).columns) == ["image_name", "akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _bad_folder(tiny_isic: Path, dest: Path) -> tuple[Path, list[Path]]:
    """The ISIC test images with a truncated JPEG, an empty one, a text file named .jpg and a (good) PNG."""
    from PIL import Image

    shutil.copytree(tiny_isic / "test", dest)
    files = sorted(dest.glob("*.jpg"))
    files[0].write_bytes(files[0].read_bytes()[:300])
    files[1].write_bytes(b"")
    (dest / "notes.jpg").write_text("not an image\n")
    with Image.open(files[2]) as im:
        im.save(dest / "good.png")
    return dest, [files[0], files[1], dest / "notes.jpg"]


def test_predict_bad_image_is_one_error_line_naming_it(ckpts, tiny_isic, tmp_path, capsys):
    folder, bad = _bad_folder(tiny_isic, tmp_path / "imgs")
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpts["catdog"]), "--data", str(folder), "--out", str(out)]) == 2
    err = _err(capsys)
    assert any(str(b) in err for b in bad) and "--skip-bad" in err and "data.exclude_file" not in err, err
    assert not out.exists()


def test_predict_skip_bad_lists_what_it_left_out(ckpts, tiny_isic, tmp_path, capsys):
    folder, bad = _bad_folder(tiny_isic, tmp_path / "imgs")
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpts["catdog"]), "--data", str(folder), "--out", str(out), "--skip-bad"]) == 0
    stdout = capsys.readouterr().out
    n_images = len(list(folder.iterdir()))
    assert f"wrote {n_images - 3} predictions" in stdout
    side = tmp_path / "p.skipped.csv"
    assert f"skipped 3 unreadable images (listed in {side})" in stdout
    skipped = pd.read_csv(side)
    assert list(skipped.columns) == ["path", "reason"] and sorted(skipped["path"]) == sorted(map(str, bad))
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert reasons[str(bad[0])].startswith("truncated") and reasons[str(bad[1])].startswith("empty")
    assert reasons[str(bad[2])].startswith("not_jpeg")
    df = pd.read_csv(out)
    assert "good" in set(df["image"]) and len(df) == n_images - 3  # a PNG that opens is kept

    # the ISIC root (test.csv): the submission without the bad image, and the side file next to it
    root = tmp_path / "isic"
    shutil.copytree(tiny_isic, root, ignore=shutil.ignore_patterns("train*"))
    first = sorted((root / "test").glob("*.jpg"))[0]
    first.write_bytes(first.read_bytes()[:300])
    sub = tmp_path / "sub.csv"
    df = predict(ckpts["isic"], root, sub, skip_bad=True)
    assert list(df.columns) == ["image_name", "target"] and first.stem not in set(df["image_name"])
    assert df.attrs["skipped"] == [str(first)] and Path(df.attrs["skipped_file"]) == tmp_path / "sub.skipped.csv"


def test_predict_skip_bad_with_nothing_readable(ckpts, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    assert main(["predict", str(ckpts["catdog"]), "--data", str(folder), "--out", str(tmp_path / "p.csv"),
                 "--skip-bad"]) == 2
    assert "none of the 1 images can be read" in _err(capsys)


def test_predict_on_a_full_disk_is_one_line(ckpts, tiny_isic, tmp_path, capsys, monkeypatch):
    import errno
    import os

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    assert main(["predict", str(ckpts["catdog"]), "--data", str(tiny_isic / "test"),
                 "--out", str(tmp_path / "p.csv")]) == 2
    assert _err(capsys) == "error: No space left on device (ENOSPC)"
