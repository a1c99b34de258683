import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.data.catalog import HAM_CLASSES, ISIC_CLASSES, load_dataset, load_isic2020_test
from fastlesion.errors import DatasetError


def _jpeg(path: Path, seed: int = 0, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def _cfg(**kw):
    return load_config(None, {f"data.{k}": v for k, v in kw.items()}).data


def test_isic2020(tiny_isic):
    ds = load_dataset(_cfg(dataset="isic2020", root=str(tiny_isic)))
    t = ds.table
    assert ds.classes == ISIC_CLASSES and len(t) == 80
    assert list(t.columns[:3]) == ["path", "label", "group"]
    for col in ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis"):
        assert col in t.columns
    assert (t["label"] == t["target"]).all() and (t["group"] == t["patient_id"]).all()
    assert t["path"].map(lambda p: Path(p).is_file()).all()
    assert t.groupby("group").size().max() > 1  # several images per patient
    test = load_isic2020_test(tiny_isic)
    assert len(test) > 0 and Path(test["path"][0]).is_file()


def test_isic_jpeg_train_layout(tiny_isic, tmp_path):
    root = tmp_path / "isic"
    root.mkdir()
    shutil.copy(tiny_isic / "train.csv", root / "train.csv")
    shutil.copytree(tiny_isic / "train", root / "jpeg" / "train")
    ds = load_dataset(_cfg(dataset="isic2020", root=str(root)))
    assert len(ds) == 80 and "/jpeg/train/" in ds.table["path"][0]


def test_ham10000(tiny_ham):
    ds = load_dataset(_cfg(dataset="ham10000", root=str(tiny_ham)))
    assert ds.classes == HAM_CLASSES
    assert sorted(ds.table["label"].unique()) == list(range(7))
    assert (ds.table["group"] == ds.table["lesion_id"]).all()
    assert ds.table["dx"].map(HAM_CLASSES.index).equals(ds.table["label"])


def test_csv_and_folder(tmp_path):
    rows = []
    for i in range(12):
        cls = "glaucoma" if i % 3 == 0 else "normal"
        _jpeg(tmp_path / "img" / f"{i}.jpg", i)
        rows.append({"file": f"img/{i}.jpg", "diag": cls, "patient": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(tmp_path / "fundus.csv", index=False)
    ds = load_dataset(_cfg(dataset="csv", root=str(tmp_path), csv="fundus.csv", path_col="file", label_col="diag",
                           group_col="patient"))
    assert ds.classes == ["glaucoma", "normal"] and len(ds) == 12
    assert ds.table["group"].nunique() == 6

    for i in range(6):
        _jpeg(tmp_path / "folder" / ("a" if i < 3 else "b") / f"{i}.jpg", i)
    ds = load_dataset(_cfg(dataset="folder", root=str(tmp_path / "folder")))
    assert ds.classes == ["a", "b"] and ds.table["label"].tolist() == [0, 0, 0, 1, 1, 1]


def test_missing_images_found_up_front(tiny_isic, tmp_path):
    root = tmp_path / "isic"
    shutil.copytree(tiny_isic, root)
    names = pd.read_csv(root / "train.csv")["image_name"][:3]
    for n in names:
        (root / "train" / f"{n}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"3 of 80 listed images are missing.*{names[0]}"):
        load_dataset(_cfg(dataset="isic2020", root=str(root)))
    ds = load_dataset(_cfg(dataset="isic2020", root=str(root)), strict=False)
    assert len(ds.missing) == 3 and len(ds) == 77


def test_exclusion_file_is_honoured(tiny_isic, tmp_path):
    t = load_dataset(_cfg(dataset="isic2020", root=str(tiny_isic))).table
    ex = tmp_path / "exclude.txt"
    ex.write_text("# from fastlesion check\n" + "\n".join(str(Path(p).relative_to(tiny_isic)) for p in t["path"][:4]))
    ds = load_dataset(_cfg(dataset="isic2020", root=str(tiny_isic), exclude_file=str(ex)))
    assert len(ds) == 76 and len(ds.excluded) == 4


@pytest.mark.parametrize("setup,match", [
    ("no_column", r"train\.csv: missing required column\(s\) 'target'"),
    ("single_class", "single class"),
    ("escape", "escapes the data root"),
    ("empty", "empty"),
    ("unknown_kind", "unknown dataset kind"),
])
def test_bad_input(tmp_path, setup, match, capsys):
    _jpeg(tmp_path / "img" / "a.jpg")
    _jpeg(tmp_path / "img" / "b.jpg")
    args = ["train", "--data", str(tmp_path), "--epochs", "1"]
    if setup == "no_column":
        cols = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
                "benign_malignant"]  # no 'target'
        pd.DataFrame([["a", "p", "male", 40, "torso", "nevus", "benign"]], columns=cols).to_csv(
            tmp_path / "train.csv", index=False)
        args += ["--dataset", "isic2020"]
    elif setup == "single_class":
        pd.DataFrame({"path": ["img/a.jpg", "img/b.jpg"], "label": ["x", "x"]}).to_csv(tmp_path / "d.csv", index=False)
        args += ["--dataset", "csv", "--csv", "d.csv"]
    elif setup == "escape":
        pd.DataFrame({"path": ["../../etc/passwd", "img/b.jpg"], "label": [0, 1]}).to_csv(tmp_path / "d.csv",
                                                                                           index=False)
        args += ["--dataset", "csv", "--csv", "d.csv"]
    elif setup == "empty":
        (tmp_path / "empty" / "cls").mkdir(parents=True)
        args = ["train", "--data", str(tmp_path / "empty"), "--dataset", "folder"]
    else:
        args += ["--dataset", "imagenet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert re.search(match, err[0]), err[0]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("kind", ["isic2020", "ham10000"])
def test_header_only_csv_is_a_clear_error(kind, tiny_isic, tiny_ham, tmp_path, capsys):
    src, name = (tiny_isic, "train.csv") if kind == "isic2020" else (tiny_ham, "HAM10000_metadata.csv")
    root = tmp_path / kind
    shutil.copytree(src, root)
    csv = root / name
    csv.write_text(csv.read_text().splitlines()[0] + "\n")  # the header row only
    for strict in (True, False):  # training / `fastlesion check`
        with pytest.raises(DatasetError, match=rf"{re.escape(str(csv))}: the dataset is empty"):
            load_dataset(_cfg(dataset=kind, root=str(root)), strict=strict)
    assert main(["check", str(root), "--quiet", "--workers", "1"]) == 2
    assert name in _one_line_error(capsys)
    assert main(["train", "--data", str(root), "--epochs", "1"]) == 2
    assert re.search(rf"{name}: the dataset is empty", _one_line_error(capsys))


def test_header_only_test_csv_keeps_its_columns(tiny_isic, tmp_path):
    root = tmp_path / "isic"
    shutil.copytree(tiny_isic, root)
    (root / "test.csv").write_text((root / "test.csv").read_text().splitlines()[0] + "\n")
    test = load_isic2020_test(root)
    assert len(test) == 0 and list(test.columns) == ["path", "image_name", "patient_id", "sex", "age_approx",
                                                     "anatom_site_general_challenge"]


@pytest.mark.parametrize("kind,name,col", [
    ("isic2020", "train.csv", "image_name"),
    ("isic2020", "test.csv", "image_name"),
    ("ham10000", "HAM10000_metadata.csv", "image_id"),
])
def test_image_names_cannot_escape_the_root(kind, name, col, tiny_isic, tiny_ham, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_isic if kind == "isic2020" else tiny_ham, root)
    df = pd.read_csv(root / name)
    first = df[col][0]
    # the escaping name points at a real image outside the root, so nothing is "missing" to give it away
    images = next(p for p in root.rglob(f"{first}.jpg"))
    outside = tmp_path / "other" / "train"
    outside.mkdir(parents=True)
    shutil.copy(images, outside / f"{first}.jpg")
    assert images.parent.parent == root
    bad = f"../../other/train/{first}"
    df[col] = df[col].astype(object)
    df.loc[0, col] = bad
    df.to_csv(root / name, index=False)
    match = rf"{name}: column '{col}' has 1 value\(s\) that escape the data root .*{re.escape(repr(bad))}"
    if name == "test.csv":
        with pytest.raises(DatasetError, match=match):
            load_isic2020_test(root)
        df.loc[0, col] = str(outside / first)  # an absolute name is refused too
        df.to_csv(root / name, index=False)
        with pytest.raises(DatasetError, match="escape the data root"):
            load_isic2020_test(root)
        return
    for strict in (True, False):
        with pytest.raises(DatasetError, match=match):
            load_dataset(_cfg(dataset=kind, root=str(root)), strict=strict)
    assert main(["check", str(root), "--quiet", "--workers", "1"]) == 2
    assert re.search(match, _one_line_error(capsys))


def test_symlinked_image_folder_is_not_an_escape(tiny_isic, tmp_path):
    root = tmp_path / "isic"
    root.mkdir()
    shutil.copy(tiny_isic / "train.csv", root / "train.csv")
    (root / "train").symlink_to(tiny_isic / "train", target_is_directory=True)  # images on another disk
    assert len(load_dataset(_cfg(dataset="isic2020", root=str(root)))) == 80
