"""Tests of the synthetic dataset generator (CPU, small images)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastlesion.cli import main
from fastlesion.data.synthetic import HAM_CLASSES, LAYOUTS, MARKER, generate
from fastlesion.errors import DatasetError

ISIC_TRAIN = [
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
    "benign_malignant", "target",
]  # fmt: skip
ISIC_TEST = ISIC_TRAIN[:5]
HAM = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
ISIC_SITES = {"torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital"}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def check_jpeg(path: Path, size: tuple[int, int] | None = None) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "JPEG"
        assert im.mode == "RGB"
        assert not im.info.get("progressive")
        if size is not None:
            assert im.size == size
        im.load()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.startswith(".fastlesion_synth")}  # fmt: skip


@pytest.fixture(scope="module")
def isic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate("isic2020", tmp_path_factory.mktemp("isic"), n=40, seed=3, size=96, positive_rate=0.15)


@pytest.fixture(scope="module")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate("ham10000", tmp_path_factory.mktemp("ham"), n=140, seed=1, size=64, workers=2)


def test_isic_layout(isic: Path) -> None:
    cols, rows = read_csv(isic / "train.csv")
    assert cols == ISIC_TRAIN
    assert len(rows) == 40
    names = [r["image_name"] for r in rows]
    assert len(set(names)) == 40 and names == sorted(names)
    for r in rows:
        assert r["image_name"].startswith("ISIC_") and len(r["image_name"]) == 12 and r["image_name"][5:].isdigit()
        assert r["patient_id"].startswith("IP_") and len(r["patient_id"]) == 10 and r["patient_id"][3:].isdigit()
        assert r["sex"] in ("male", "female")
        assert float(r["age_approx"]) % 5 == 0
        assert r["anatom_site_general_challenge"] in ISIC_SITES
        assert r["target"] in ("0", "1")
        assert r["benign_malignant"] == ("malignant" if r["target"] == "1" else "benign")
        assert (r["diagnosis"] == "melanoma") == (r["target"] == "1")
        check_jpeg(isic / "train" / f"{r['image_name']}.jpg", (96, 72))
    assert len(list((isic / "train").iterdir())) == 40

    tcols, trows = read_csv(isic / "test.csv")
    assert tcols == ISIC_TEST
    assert len(trows) >= 4
    assert not {r["image_name"] for r in trows} & set(names)
    assert not {r["patient_id"] for r in trows} & {r["patient_id"] for r in rows}
    for r in trows:
        check_jpeg(isic / "test" / f"{r['image_name']}.jpg", (96, 72))


def test_isic_patients_and_positives(isic: Path) -> None:
    _, rows = read_csv(isic / "train.csv")
    per_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], []).append(r)
    assert 1 < len(per_patient) < len(rows)  # several images per patient
    assert max(len(v) for v in per_patient.values()) <= 8
    for v in per_patient.values():
        assert len({r["sex"] for r in v}) == 1
    positives = [r for r in rows if r["target"] == "1"]
    assert len(positives) == 6  # 15% of 40
    assert len({r["patient_id"] for r in positives}) > 1


def test_isic_default_rate_has_positives(tmp_path: Path) -> None:
    root = generate("isic2020", tmp_path, n=24, size=32)
    _, rows = read_csv(root / "train.csv")
    positives = [r for r in rows if r["target"] == "1"]
    assert len(positives) >= 2
    assert len({r["patient_id"] for r in positives}) >= 2


def test_ham_layout(ham: Path) -> None:
    cols, rows = read_csv(ham / "HAM10000_metadata.csv")
    assert cols == HAM
    assert len(rows) == 140
    parts = [ham / "HAM10000_images_part_1", ham / "HAM10000_images_part_2"]
    counts = [len(list(p.iterdir())) for p in parts]
    assert sum(counts) == 140 and abs(counts[0] - counts[1]) <= 1
    for r in rows:
        assert r["lesion_id"].startswith("HAM_") and len(r["lesion_id"]) == 11
        assert r["image_id"].startswith("ISIC_") and len(r["image_id"]) == 12
        assert r["dx"] in HAM_CLASSES
        assert r["dx_type"] in ("histo", "follow_up", "consensus", "confocal")
        assert r["sex"] in ("male", "female", "unknown")
        assert float(r["age"]) >= 0 and r["age"].endswith(".0")
        assert r["localization"]
        found = [p / f"{r['image_id']}.jpg" for p in parts if (p / f"{r['image_id']}.jpg").exists()]
        assert len(found) == 1
        check_jpeg(found[0], (64, 48))
    assert len({r["image_id"] for r in rows}) == 140


def test_ham_lesions_and_classes(ham: Path) -> None:
    _, rows = read_csv(ham / "HAM10000_metadata.csv")
    lesions: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        lesions.setdefault(r["lesion_id"], []).append(r)
    assert len(lesions) < len(rows)  # some lesions have several images
    assert max(len(v) for v in lesions.values()) <= 3
    for v in lesions.values():
        assert len({r["dx"] for r in v}) == 1
    dx = [r["dx"] for r in rows]
    assert set(dx) == set(HAM_CLASSES)
    assert max(set(dx), key=dx.count) == "nv"  # imbalanced like the real set
    for c in HAM_CLASSES:  # enough lesions per class for grouped 5-fold splits
        assert len({r["lesion_id"] for r in rows if r["dx"] == c}) >= 5


def test_deterministic(tmp_path: Path) -> None:
    a = generate("ham10000", tmp_path / "a", n=24, seed=5, size=48)
    b = generate("ham10000", tmp_path / "b", n=24, seed=5, size=48, workers=2)  # worker count does not matter
    c = generate("ham10000", tmp_path / "c", n=24, seed=6, size=48)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert ta == tb
    assert ta["HAM10000_metadata.csv"] != tc["HAM10000_metadata.csv"]
    assert sorted(ta.values()) != sorted(tc.values())


def test_mixed_sizes(tmp_path: Path) -> None:
    root = generate("ham10000", tmp_path, n=4, seed=2)
    sizes = set()
    for p in root.rglob("*.jpg"):
        with Image.open(p) as im:
            sizes.add(im.size)
            assert 512 <= im.size[0] <= 768 and im.size[1] in (round(im.size[0] * 0.75), round(im.size[0] * 2 / 3))
    assert len(sizes) > 1


def test_size_pair(tmp_path: Path) -> None:
    root = generate("ham10000", tmp_path, n=3, size=(40, 50))
    for p in root.rglob("*.jpg"):
        check_jpeg(p, (40, 50))


def test_large(tmp_path: Path) -> None:
    root = generate("ham10000", tmp_path, n=1, seed=0, large=True)
    (path,) = root.rglob("*.jpg")
    with Image.open(path) as im:
        assert 2000 <= im.size[0] <= 6000
        assert im.mode == "RGB" and im.format == "JPEG"


def test_second_call_is_a_no_op(tmp_path: Path) -> None:
    root = generate("isic2020", tmp_path, n=8, size=32)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert generate("isic2020", str(tmp_path), n=8, size=32) == root
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files


def test_other_parameters_regenerate(tmp_path: Path) -> None:
    generate("isic2020", tmp_path, n=8, size=32)
    generate("ham10000", tmp_path, n=8, size=32)
    assert not (tmp_path / "train.csv").exists() and not (tmp_path / "train").exists()
    _, rows = read_csv(tmp_path / "HAM10000_metadata.csv")
    assert len(rows) == 8


def test_incomplete_dataset_is_regenerated(tmp_path: Path) -> None:
    root = generate("isic2020", tmp_path, n=8, size=32)
    (root / "train.csv").unlink()  # as if interrupted before the CSV was written
    generate("isic2020", tmp_path, n=8, size=32)
    _, rows = read_csv(root / "train.csv")
    assert len(rows) == 8
    one = next((root / "train").iterdir())
    one.unlink()
    generate("isic2020", tmp_path, n=8, size=32)
    assert one.exists()


def test_refuses_foreign_dataset(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("image_name,target\nx,0\n")
    with pytest.raises(DatasetError, match="refusing"):
        generate("isic2020", tmp_path, n=8, size=32)
    assert (tmp_path / "train.csv").read_text() == "image_name,target\nx,0\n"


@pytest.mark.parametrize(
    "kwargs",
    [{"layout": "isic1999"}, {"n": 0}, {"positive_rate": 1.5}, {"size": 8}, {"size": (32, 32, 3)}],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict) -> None:
    args = {"layout": "isic2020", "out": tmp_path, "n": 4, "size": 32, **kwargs}
    with pytest.raises(DatasetError):
        generate(**args)
    assert not (tmp_path / MARKER).exists()


def test_progress_bar(tmp_path: Path) -> None:
    root = generate("ham10000", tmp_path, n=4, size=32, progress=True)
    assert (root / "HAM10000_metadata.csv").is_file()


def test_public_constants() -> None:
    assert LAYOUTS == ("isic2020", "ham10000")
    assert HAM_CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _lesion_feature(path: Path) -> float:
    """Hand-made ABCD score from pixels only: lesion area (D) + area of non-brown colours (C: black, blue-grey, red).

    The lesion is what is clearly darker than the surrounding skin; the outer sixth of each side is dropped (hairs
    and the dark round field of some dermatoscopes sit there).
    """
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0 + 1e-3
    h, w, _ = a.shape
    a = a[h // 6 : h - h // 6, w // 6 : w - w // 6]
    luma = a.mean(-1)
    rel = luma / np.percentile(luma, 90)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    lesion = rel < 0.8
    black = rel < 0.35
    blue_grey = (b / r > 0.9) & (rel < 0.85)
    red = (g / r < 0.5) & lesion
    return float(lesion.mean() + 2.0 * (black | blue_grey | red).mean())


def test_class_signal_is_in_the_pixels(tmp_path: Path) -> None:
    """The label shows in the images (a crude pixel feature separates the classes), but not trivially."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    root = generate("isic2020", tmp_path, n=200, seed=0, size=80, positive_rate=0.5)
    _, rows = read_csv(root / "train.csv")
    y = [int(r["target"]) for r in rows]
    x = [_lesion_feature(root / "train" / f"{r['image_name']}.jpg") for r in rows]
    auc = sklearn_metrics.roc_auc_score(y, x)
    assert 0.65 < auc < 0.95, auc


@pytest.mark.parametrize("value", ["abc", "600x", "x450", "12.5", "600x450x3", "-64"])
def test_cli_bad_size_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert main(["synth", "--out", str(tmp_path / "s"), "--n", "4", f"--size={value}", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --size") and repr(value) in err[0], err
    assert not (tmp_path / "s" / "train.csv").exists()


@pytest.mark.parametrize("value,size", [("48", (48, 36)), ("40x50", (40, 50)), (" 40 X 50 ", (40, 50))])
def test_cli_size_formats(tmp_path: Path, value: str, size: tuple[int, int]) -> None:
    root = tmp_path / "s"
    assert main(["synth", "--layout", "ham10000", "--out", str(root), "--n", "3", f"--size={value}",
                 "--workers", "1"]) == 0
    for p in root.rglob("*.jpg"):
        check_jpeg(p, size)


def test_two_processes_generating_one_set_wait_for_each_other(tmp_path: Path) -> None:
    """DDP ranks or Ray trials may ask for the same default set at once: one writes it, the other waits, and the set
    is whole and the same as a single process writes it."""
    import subprocess
    import sys

    code = ("import sys; from fastlesion.data.synthetic import generate; "
            "generate('isic2020', sys.argv[1], n=300, seed=3, size=160)")  # ~1 s of writing: the two overlap
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    alone = generate("isic2020", tmp_path / "alone", n=300, seed=3, size=160)
    assert tree_bytes(tmp_path / "shared") == tree_bytes(alone)  # whole, and not written twice over each other
