"""``fastlesion prepare`` (fastlesion.data.resize): sizes, layouts and CSVs, resumability, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, JpegImagePlugin

from fastlesion.config import DataConfig
from fastlesion.data import catalog
from fastlesion.data.resize import MARKER, PREPARED_CSV, prepare, resize_file, target_size
from fastlesion.errors import DatasetError


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def large_isic(tmp_path_factory) -> Path:
    """ISIC 2020 layout with 3 large training images (2400x1800, one portrait) and one test image."""
    root = tmp_path_factory.mktemp("large_isic")
    (root / "train").mkdir()
    (root / "test").mkdir()
    rows = []
    for i, (w, h) in enumerate([(2400, 1800), (1800, 2400), (2400, 1800)]):
        name = f"ISIC_{i:07d}"
        _image(w, h, i).save(root / "train" / f"{name}.jpg", quality=90)
        rows.append([name, f"IP_{i}", "male", 50, "torso", "nevus", "benign" if i else "malignant", int(i == 0)])
    pd.DataFrame(rows, columns=list(catalog.ISIC_COLUMNS)).to_csv(root / "train.csv", index=False)
    _image(2400, 1800, 9).save(root / "test" / "ISIC_9000000.jpg", quality=90)
    pd.DataFrame([["ISIC_9000000", "IP_9", "female", 40, "torso"]],
                 columns=list(catalog.ISIC_TEST_COLUMNS)).to_csv(root / "test.csv", index=False)
    return root


def test_target_size():
    assert target_size(6000, 4000, 512, "shorter") == (768, 512)
    assert target_size(4000, 6000, 512, "shorter") == (512, 768)
    assert target_size(400, 300, 512, "shorter") == (400, 300)  # never upscaled
    assert target_size(6000, 4000, 512, "square") == (512, 512)


def test_prepare_isic_resumable(large_isic, tmp_path, monkeypatch):
    drafts = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return orig(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = tmp_path / "isic512"
    res = prepare(large_isic, out, size=512, workers=1, progress=False)
    assert (res.total, res.done, res.skipped, res.failed, res.missing) == (4, 4, 0, [], [])
    assert drafts and all(s in ((683, 512), (512, 683)) for s in drafts)  # reduced-size (DCT scaled) decoding
    assert (out / "train.csv").read_text() == (large_isic / "train.csv").read_text()
    assert (out / "test.csv").is_file() and (out / MARKER).is_file()
    ds = catalog.load_dataset(DataConfig(dataset="isic2020", root=str(out)))  # same kind reads the copy
    assert len(ds) == 3 and ds.table["label"].tolist() == [1, 0, 0]
    sizes = [Image.open(p).size for p in ds.table["path"]]
    assert sizes == [(683, 512), (512, 683), (683, 512)]
    assert len(catalog.load_isic2020_test(out)) == 1

    again = prepare(large_isic, out, size=512, workers=1, progress=False)
    assert (again.done, again.skipped) == (0, 4)

    # an interrupted write leaves only `<name>.tmp`: it is not taken as done, and is replaced
    victim = out / "train" / "ISIC_0000001.jpg"
    victim.unlink()
    Path(str(victim) + ".tmp").write_bytes(b"half-written")
    third = prepare(large_isic, out, size=512, workers=1, progress=False)
    assert (third.done, third.skipped) == (1, 3)
    assert Image.open(victim).size == (512, 683) and not Path(str(victim) + ".tmp").exists()

    # a source newer than its copy is redone
    src = large_isic / "train" / "ISIC_0000002.jpg"
    later = os.stat(out / "train" / "ISIC_0000002.jpg").st_mtime + 10
    os.utime(src, (later, later))
    assert prepare(large_isic, out, size=512, workers=1, progress=False).done == 1

    with pytest.raises(DatasetError, match="prepared with size=512"):
        prepare(large_isic, out, size=256, workers=1, progress=False)
    with pytest.raises(DatasetError, match="outside the source"):
        prepare(large_isic, large_isic / "small", workers=1, progress=False)


def test_prepare_folder_square_parallel_with_failure(tmp_path):
    src = tmp_path / "src"
    for c, n in (("benign", 6), ("malignant", 4)):
        (src / c).mkdir(parents=True)
        for i in range(n):
            _image(300 + 10 * i, 200, i).save(src / c / f"{c}_{i}.jpg")
    (src / "benign" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    res = prepare(src, out, size=64, mode="square", workers=2, progress=False)
    assert res.kind == "folder" and res.done == 10 and len(res.failed) == 1
    assert res.failed[0][0].endswith("broken.jpg")
    assert {Image.open(p).size for p in out.rglob("*.jpg")} == {(64, 64)}
    assert not list(out.rglob("*.tmp"))
    table = pd.read_csv(out / PREPARED_CSV)
    assert list(table.columns) == ["path", "label", "group"] and len(table) == 11
    assert (out / table["path"].iloc[0]).is_file() or table["path"].iloc[0].endswith("broken.jpg")
    ds = catalog.load_folder(out)  # the copy keeps the folder layout
    assert ds.classes == ["benign", "malignant"] and len(ds) == 10


def test_prepare_csv_kind_and_exif_orientation(tmp_path):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    img = _image(800, 600, 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    img.save(src / "imgs" / "a.jpg", exif=exif)
    img.save(src / "imgs" / "b.jpg")
    pd.DataFrame({"file": ["imgs/a.jpg", "imgs/b.jpg"], "dx": ["x", "y"]}).to_csv(src / "list.csv", index=False)
    data = DataConfig(dataset="csv", csv="list.csv", path_col="file", label_col="dx")
    with pytest.raises(DatasetError, match="data config"):
        prepare(src, tmp_path / "nope", size=100, dataset="csv", progress=False)
    res = prepare(src, tmp_path / "out", size=100, dataset="csv", data=data, workers=1, progress=False)
    assert res.done == 2
    assert Image.open(tmp_path / "out" / "imgs" / "a.jpg").size == (100, 133)  # orientation applied
    assert Image.open(tmp_path / "out" / "imgs" / "b.jpg").size == (133, 100)
    cfg = DataConfig(dataset="csv", root=str(tmp_path / "out"), csv=PREPARED_CSV, group_col="group")
    ds = catalog.load_dataset(cfg)
    assert len(ds) == 2 and ds.classes == ["x", "y"]


def test_resize_file_reports_failure(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    status, reason = resize_file(str(bad), str(tmp_path / "o" / "bad.jpg"), 64)
    assert status == "failed" and reason and not (tmp_path / "o" / "bad.jpg").exists()


@pytest.mark.parametrize("layout, kind", [("isic2020-challenge", "isic2020"), ("isic2019", "isic2019")])
def test_prepare_the_challenge_downloads(layout, kind, tmp_path):
    from fastlesion.data.synthetic import generate

    src = generate(layout, tmp_path / "src", n=12, seed=1, size=64, workers=1)
    res = prepare(src, tmp_path / "dst", size=32, workers=1, progress=False)
    assert res.ok and res.kind == kind and res.done == res.total and not res.missing
    before = catalog.load_dataset(DataConfig(dataset=kind, root=str(src)), progress=False)
    after = catalog.load_dataset(DataConfig(dataset=kind, root=str(tmp_path / "dst")), progress=False)
    assert catalog.detect_kind(tmp_path / "dst") == kind and after.classes == before.classes
    assert len(after) == len(before) and (after.table["label"].values == before.table["label"].values).all()
    assert all(min(Image.open(p).size) == 32 for p in after.table["path"])
