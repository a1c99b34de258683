"""Segmentation data: the synthetic isic2018-seg layout, its catalog kind (and csv with a mask column), mask checks,
prepare with nearest-neighbour masks, and folds of a one-class table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from fastlesion.cli import main
from fastlesion.config import DataConfig, load_config
from fastlesion.data import validate as V
from fastlesion.data.catalog import detect_kind, load_dataset
from fastlesion.data.resize import prepare
from fastlesion.data.splits import split_dataset
from fastlesion.data.synthetic import MARKER, generate
from fastlesion.errors import DatasetError

TRAIN_IN, TRAIN_GT = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
VAL_IN, VAL_GT = "ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"


@pytest.fixture(scope="module")
def seg_master(tmp_path_factory) -> Path:
    """12 images of 64x48 with their masks (generated once; tests copy it before changing anything)."""
    return generate("isic2018-seg", tmp_path_factory.mktemp("seg"), n=12, seed=5, size=64)


@pytest.fixture
def seg_root(seg_master: Path, tmp_path: Path) -> Path:
    root = tmp_path / "isic2018"
    shutil.copytree(seg_master, root)
    return root


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    return [(p, root / TRAIN_GT / f"{p.stem}_segmentation.png") for p in sorted((root / TRAIN_IN).glob("*.jpg"))]


def _seg_cfg(root: Path, **kw) -> DataConfig:
    return load_config(None, {"data.dataset": "isic2018-seg", "data.root": str(root), "train.task": "segmentation",
                              **{f"data.{k}": v for k, v in kw.items()}}).data


# --------------------------------------------------------------------------------------------------- synth
def _contrast(img: np.ndarray, fg: np.ndarray) -> float:
    """How far the region's colour is from the skin just around it (a 3 px ring), over that skin's own spread."""
    ring = (np.asarray(Image.fromarray(fg.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))) > 0) & ~fg
    ref = np.median(img[ring], axis=0)
    dist = np.linalg.norm(img - ref, axis=2)
    return float(dist[fg].mean() / max(dist[ring].mean(), 1e-6))


def test_synth_masks_are_the_drawn_lesions(seg_master: Path) -> None:
    pairs = _pairs(seg_master)
    assert len(pairs) == 12
    shifted_ratios, ratios = [], []
    for img_path, mask_path in pairs:
        assert img_path.name.startswith("ISIC_") and len(img_path.stem) == len("ISIC_0000000")
        img = np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float64)
        with Image.open(mask_path) as m:
            assert m.format == "PNG" and m.mode == "L" and m.size == (64, 48)
            mask = np.asarray(m)
        assert set(np.unique(mask)) <= {0, 255}
        fg = mask > 0
        assert 0.02 < fg.mean() < 0.8  # a lesion, not the whole field
        ratios.append(_contrast(img, fg))
        shifted_ratios.append(_contrast(img, np.roll(fg, 16, axis=1)))
    assert min(ratios) > 1.2  # every mask sits on a region coloured unlike the skin around it (measured: >= 1.37)
    assert np.mean(ratios) > 1.5 * np.mean(shifted_ratios)  # and a shifted mask does not


def test_synth_bookkeeping_and_cli(seg_master: Path, tmp_path: Path) -> None:
    import json

    marker = json.loads((seg_master / MARKER).read_text())
    assert marker["complete"] and marker["files"] == 24  # 12 images + 12 masks
    before = {p: p.stat().st_mtime_ns for p in seg_master.rglob("*.png")}
    generate("isic2018-seg", seg_master, n=12, seed=5, size=64)  # complete: nothing rewritten
    assert before == {p: p.stat().st_mtime_ns for p in seg_master.rglob("*.png")}
    out = tmp_path / "cli"
    assert main(["synth", "--layout", "isic2018-seg", "--out", str(out), "--n", "3", "--size", "32",
                 "--workers", "1"]) == 0
    assert len(list((out / TRAIN_IN).glob("*.jpg"))) == 3 and len(list((out / TRAIN_GT).glob("*.png"))) == 3
    # regenerating with other parameters deletes only its own files
    generate("isic2018-seg", out, n=2, seed=1, size=32)
    assert len(list((out / TRAIN_IN).glob("*.jpg"))) == 2 and len(list((out / TRAIN_GT).glob("*.png"))) == 2


def test_synthetic_kind_generates_the_seg_set_into_the_cache() -> None:
    cfg = load_config(None, {"train.task": "segmentation", "data.synthetic_n": 6, "data.synthetic_size": 32})
    assert cfg.data.synthetic_layout == "isic2018-seg"
    ds = load_dataset(cfg.data, progress=False, task="segmentation")
    assert ds.kind == "synthetic" and ds.task == "segmentation" and ds.classes == ["lesion"] and len(ds) == 6
    assert "isic2018-seg" in str(ds.root) and all(Path(m).is_file() for m in ds.table["mask"])


# --------------------------------------------------------------------------------------------------- catalog
def test_catalog_reads_isic2018_seg_with_validation_part(seg_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    for folder in (VAL_IN, VAL_GT, "ISIC2018_Task1-2_Test_Input"):
        (seg_root / folder).mkdir()
    for img, mask in _pairs(seg_root)[:2]:  # two training images become the validation part
        img.rename(seg_root / VAL_IN / img.name)
        mask.rename(seg_root / VAL_GT / mask.name)
    shutil.copy(_pairs(seg_root)[0][0], seg_root / "ISIC2018_Task1-2_Test_Input" / "ISIC_9999999.jpg")  # no GT
    (seg_root / TRAIN_IN / "LICENSE.txt").write_text("not an image")
    assert detect_kind(seg_root) == "isic2018-seg"
    ds = load_dataset(_seg_cfg(seg_root), task="segmentation")
    t = ds.table
    assert ds.task == "segmentation" and ds.kind == "isic2018-seg" and ds.classes == ["lesion"]
    assert list(t.columns[:4]) == ["path", "label", "group", "mask"]
    assert {"image_name", "official_split"} <= set(t.columns)
    assert (t["label"] == 0).all() and (t["group"] == t["image_name"]).all()
    assert t["official_split"].value_counts().to_dict() == {"train": 10, "validation": 2}
    for path, mask in zip(t["path"], t["mask"], strict=True):
        assert Path(mask).name == Path(path).stem + "_segmentation.png" and Path(mask).is_file()
    assert "ISIC2018_Task1-2_Test_Input" in caplog.text  # left out: no masks

    # folds: only the training part, the official validation part is the holdout test split
    split = split_dataset(ds, _seg_cfg(seg_root, num_folds=3))
    assert set(split.test["official_split"]) == {"validation"} and len(split.test) == 2
    assert set(split.train["official_split"]) == set(split.val["official_split"]) == {"train"}
    assert len(split.train) + len(split.val) == 10 and not set(split.train["group"]) & set(split.val["group"])


def test_missing_mask_is_one_line_error(seg_root: Path) -> None:
    gone = [m for _, m in _pairs(seg_root)[:2]]
    for m in gone:
        m.unlink()
    with pytest.raises(DatasetError, match=r"2 of 12 images have no mask") as e:
        load_dataset(_seg_cfg(seg_root))
    assert "\n" not in str(e.value) and gone[0].name in str(e.value)
    ds = load_dataset(_seg_cfg(seg_root), strict=False)  # the checker's view: rows kept, reported by check
    assert len(ds) == 12


def test_missing_training_folder(tmp_path: Path) -> None:
    (tmp_path / TRAIN_IN).mkdir()
    assert detect_kind(tmp_path) == "isic2018-seg"
    with pytest.raises(DatasetError, match=TRAIN_GT):
        load_dataset(_seg_cfg(tmp_path))


def test_csv_with_mask_column(seg_root: Path) -> None:
    rows = [{"image": str(i.relative_to(seg_root)), "seg": str(m.relative_to(seg_root)), "patient": f"p{k // 2}"}
            for k, (i, m) in enumerate(_pairs(seg_root))]
    pd.DataFrame(rows).to_csv(seg_root / "masks.csv", index=False)
    cfg = load_config(None, {"data.dataset": "csv", "data.root": str(seg_root), "data.csv": "masks.csv",
                             "data.path_col": "image", "data.mask_col": "seg", "data.group_col": "patient",
                             "train.task": "segmentation"})
    ds = load_dataset(cfg.data, task=cfg.train.task)
    assert ds.task == "segmentation" and ds.classes == ["lesion"] and (ds.table["label"] == 0).all()
    assert ds.table["mask"].map(lambda m: Path(m).is_absolute() and Path(m).is_file()).all()
    assert ds.table["group"].nunique() == 6
    split = split_dataset(ds, load_config(None, {"data.num_folds": 3}).data)  # one class: grouped folds still work
    assert not set(split.train["group"]) & set(split.val["group"])
    with pytest.raises(DatasetError, match="has no masks"):
        load_dataset(DataConfig(dataset="folder", root=str(seg_root)), task="segmentation")
    pd.DataFrame([{**rows[0], "seg": ""}, rows[1]]).to_csv(seg_root / "holes.csv", index=False)
    with pytest.raises(DatasetError, match="empty value"):
        load_dataset(DataConfig(dataset="csv", root=str(seg_root), csv="holes.csv", path_col="image", mask_col="seg"),
                     task="segmentation")
    pd.DataFrame([{**rows[0], "seg": "../outside.png"}]).to_csv(seg_root / "escape.csv", index=False)
    with pytest.raises(DatasetError, match="mask path '../outside.png' escapes"):
        load_dataset(DataConfig(dataset="csv", root=str(seg_root), csv="escape.csv", path_col="image",
                                mask_col="seg"), task="segmentation")


# --------------------------------------------------------------------------------------------------- check
def test_check_flags_bad_masks_and_training_skips_them(seg_root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    pairs = _pairs(seg_root)
    small, soft, soft2, gone, broken = (m for _, m in pairs[:5])
    Image.open(small).resize((32, 24), Image.Resampling.NEAREST).save(small)  # wrong size
    for m in (soft, soft2):  # anti-aliased edges: intermediate values
        Image.open(m).filter(ImageFilter.GaussianBlur(1.5)).save(m)
    gone.unlink()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "check"
    assert main(["check", str(seg_root), "--out", str(out), "--workers", "1", "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "checked 12 files and 12 masks" in text
    report = pd.read_csv(out / V.REPORT_NAME)
    got = dict(zip(report["path"].map(lambda p: Path(p).name), report["problem"], strict=True))
    assert got == {small.name: "mask_size", soft.name: "mask_not_binary", soft2.name: "mask_not_binary",
                   gone.name: "mask_missing", broken.name: "mask_corrupt"}
    line = next(ln for ln in text.splitlines() if "mask_not_binary" in ln)
    assert " 2 " in line and "[kept" in line  # reported with the count of such files, not excluded
    assert "mask 32x24, its image" in report.loc[report["problem"] == "mask_size", "detail"].iloc[0]
    excluded = {Path(ln).name for ln in (out / V.EXCLUDE_NAME).read_text().splitlines() if not ln.startswith("#")}
    assert excluded == {small.name, gone.name, broken.name}
    ds = load_dataset(_seg_cfg(seg_root, exclude_file=str(out / V.EXCLUDE_NAME)))  # strict: loads without them
    assert len(ds) == 9 and len(ds.excluded) == 3

    assert main(["check", str(seg_root), "--out", str(out), "--workers", "1", "--quiet", "--exclude-nonbinary"]) == 1
    assert len([ln for ln in (out / V.EXCLUDE_NAME).read_text().splitlines() if not ln.startswith("#")]) == 5


def test_check_mask_follows_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 30), (200, 150, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 30 x 40 upright
    img.save(tmp_path / "a.jpg", exif=exif.tobytes())
    Image.new("L", (30, 40), 0).save(tmp_path / "upright.png")
    Image.new("L", (40, 30), 0).save(tmp_path / "stored.png")
    Image.new("1", (30, 40), 1).save(tmp_path / "onebit.png")
    assert V.check_mask(tmp_path / "a.jpg", tmp_path / "upright.png") == []
    assert V.check_mask(tmp_path / "a.jpg", tmp_path / "onebit.png") == []  # 1-bit: 0/255, binary
    (problem, detail), = V.check_mask(tmp_path / "a.jpg", tmp_path / "stored.png")
    assert problem == "mask_size" and "EXIF orientation" in detail
    two = np.zeros((40, 30), np.uint8)
    two[:20], two[20:] = 1, 255  # two values, neither 0
    Image.fromarray(two).save(tmp_path / "nozero.png")
    (problem, detail), = V.check_mask(tmp_path / "a.jpg", tmp_path / "nozero.png")
    assert problem == "mask_not_binary" and "no 0 background" in detail


# --------------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("mode", ["shorter", "square"])
def test_prepare_resizes_masks_nearest(seg_root: Path, tmp_path: Path, mode: str) -> None:
    (seg_root / VAL_IN).mkdir()
    (seg_root / VAL_GT).mkdir()
    img, mask = _pairs(seg_root)[0]
    shutil.copy(img, seg_root / VAL_IN / img.name)
    shutil.copy(mask, seg_root / VAL_GT / mask.name)
    out = tmp_path / f"small-{mode}"
    res = prepare(seg_root, out, size=24, mode=mode, workers=1, progress=False)
    assert res.ok and res.kind == "isic2018-seg" and res.total == 13 and res.masks == 13
    assert detect_kind(out) == "isic2018-seg"
    ds = load_dataset(_seg_cfg(out))
    assert len(ds) == 13 and set(ds.table["official_split"]) == {"train", "validation"}
    for path, m in zip(ds.table["path"], ds.table["mask"], strict=True):
        with Image.open(path) as i, Image.open(m) as k:
            assert i.size == k.size == ((32, 24) if mode == "shorter" else (24, 24))
            assert k.mode == "L" and set(np.unique(np.asarray(k))) <= {0, 255}  # nearest: still binary
    again = prepare(seg_root, out, size=24, mode=mode, workers=1, progress=False)  # resumable
    assert again.done == 0 and again.skipped == 13 and again.masks == 13


def test_prepare_csv_with_masks(seg_root: Path, tmp_path: Path) -> None:
    rows = [{"image": str(i.relative_to(seg_root)), "seg": str(m.relative_to(seg_root))} for i, m in _pairs(seg_root)]
    pd.DataFrame(rows).to_csv(seg_root / "masks.csv", index=False)
    data = DataConfig(dataset="csv", root=str(seg_root), csv="masks.csv", path_col="image", mask_col="seg")
    res = prepare(seg_root, tmp_path / "out", size=16, mode="square", dataset="csv", workers=1, progress=False,
                  data=data, task="segmentation")
    assert res.ok and res.masks == 12
    prepared = pd.read_csv(tmp_path / "out" / "prepared.csv")
    assert list(prepared.columns) == ["path", "label", "group", "mask"]
    ds = load_dataset(DataConfig(dataset="csv", root=str(tmp_path / "out"), csv="prepared.csv"), task="segmentation")
    assert len(ds) == 12 and all(Image.open(m).size == (16, 16) for m in ds.table["mask"])
