"""Tests of the dataset checker (fastlesion.data.validate): every problem kind, outputs, parallel == serial."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from fastlesion.data import validate as V
from fastlesion.errors import DatasetError


def _jpeg_bytes(seed: int, mode: str = "RGB", **save: object) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


EXPECTED = {
    "trunc.jpg": "truncated",
    "zero.jpg": "empty",
    "png.jpg": "not_jpeg",
    "cmyk.jpg": "cmyk",
    "gray.jpg": "grayscale",
    "good0_copy.jpg": "duplicate",
    "garbage.jpg": "corrupt",
    "gone.jpg": "missing",
}
GOOD = ["good0.jpg", "good1.jpg", "good2.jpg", "progressive.jpg", "trailer.jpg"]


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A folder with good images and one file per problem; returns (root, existing paths, missing paths)."""
    root = tmp_path / "data"
    root.mkdir()
    files = {
        "good0.jpg": _jpeg_bytes(0),
        "good1.jpg": _jpeg_bytes(1),
        "good2.jpg": _jpeg_bytes(2),
        "progressive.jpg": _jpeg_bytes(3, progressive=True),
        "trailer.jpg": _jpeg_bytes(4) + b"TRAILING BYTES AFTER EOI",  # data after EOI is fine
        "trunc.jpg": _jpeg_bytes(5)[: len(_jpeg_bytes(5)) // 2],
        "zero.jpg": b"",
        "png.jpg": _png_bytes(6),
        "cmyk.jpg": _jpeg_bytes(7, mode="CMYK"),
        "gray.jpg": _jpeg_bytes(8, mode="L"),
        "good0_copy.jpg": _jpeg_bytes(0),
        "garbage.jpg": b"\xff\xd8\xff" + b"this is not a jpeg stream " * 40,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    paths = [str(root / n) for n in files]
    return root, paths, [str(root / "gone.jpg")]


def _problems(report: pd.DataFrame) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path, problem in zip(report["path"], report["problem"], strict=True):
        out.setdefault(Path(path).name, []).append(problem)
    return out


def test_every_problem_is_reported(dataset: tuple[Path, list[str], list[str]], tmp_path: Path) -> None:
    root, paths, missing = dataset
    res = V.run_check(paths, tmp_path / "out", root=root, workers=1, progress=False, missing=missing)
    found = _problems(res.report)
    assert found == {name: [problem] for name, problem in EXPECTED.items()}
    for name in GOOD:
        assert name not in found
    assert list(res.report.columns) == list(V.COLUMNS)
    assert set(res.report["problem"]) <= set(V.PROBLEMS)
    rows = res.report.set_index(res.report["path"].map(lambda p: Path(p).name))
    assert "png" in rows.loc["png.jpg", "detail"]
    assert rows.loc["good0_copy.jpg", "detail"].endswith(str(root / "good0.jpg"))
    assert rows.loc["cmyk.jpg", "mode"] == "CMYK" and rows.loc["gray.jpg", "mode"] == "L"
    assert rows.loc["trunc.jpg", "width"] == 64 and rows.loc["trunc.jpg", "height"] == 48
    assert rows.loc["zero.jpg", "size_bytes"] == 0
    assert not res.ok
    assert res.n_files == len(paths) + 1
    assert sorted(Path(p).name for p in res.excluded) == sorted(EXPECTED)
    assert res.n_bad == len(EXPECTED)


def test_outputs_round_trip(dataset: tuple[Path, list[str], list[str]], tmp_path: Path) -> None:
    root, paths, missing = dataset
    out = tmp_path / "out"
    res = V.run_check(paths, out, root=root, workers=1, progress=False, missing=missing)
    csv = pd.read_csv(out / "check_report.csv")
    assert len(csv) == len(res.report) and list(csv.columns) == list(V.COLUMNS)
    lines = (out / "exclude.txt").read_text().splitlines()
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sorted(entries) == sorted(EXPECTED)  # relative to root, one per line
    assert V.read_exclude_file(out / "exclude.txt", root=root) == {str((root / n).resolve()) for n in EXPECTED}
    assert V.read_exclude_file(out / "exclude.txt", root=root) == {V.exclusion_key(p) for p in res.excluded}
    # Without a root the entries are absolute.
    V.run_check(paths, out, workers=1, progress=False, missing=missing)
    entries = [ln for ln in (out / "exclude.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(Path(e).is_absolute() for e in entries)
    assert V.read_exclude_file(out / "exclude.txt") == {str((root / n).resolve()) for n in EXPECTED}


def test_exclude_color_false_keeps_cmyk_and_gray(dataset: tuple[Path, list[str], list[str]], tmp_path: Path) -> None:
    root, paths, missing = dataset
    res = V.run_check(paths, tmp_path / "out", root=root, workers=1, progress=False, missing=missing,
                      exclude_color=False)
    names = {Path(p).name for p in res.excluded}
    assert "cmyk.jpg" not in names and "gray.jpg" not in names
    assert names == set(EXPECTED) - {"cmyk.jpg", "gray.jpg"}
    assert {"cmyk", "grayscale"} <= set(res.report["problem"])  # still reported
    assert "kept" in V.format_summary(res)


def test_clean_set_is_ok(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(_jpeg_bytes(i))
        paths.append(str(p))
    res = V.run_check(paths, tmp_path / "out", root=tmp_path, workers=1, progress=False)
    assert res.ok and res.n_bad == 0 and res.excluded == [] and res.n_files == 4
    assert len(res.report) == 0 and list(res.report.columns) == list(V.COLUMNS)
    assert V.read_exclude_file(tmp_path / "out" / "exclude.txt", root=tmp_path) == set()
    assert "no problems" in V.format_summary(res)
    assert all(V.check_image(p) == [] for p in paths)


def test_format_summary_counts(dataset: tuple[Path, list[str], list[str]], tmp_path: Path) -> None:
    root, paths, missing = dataset
    res = V.run_check(paths, tmp_path / "out", root=root, workers=1, progress=False, missing=missing)
    text = V.format_summary(res)
    assert f"checked {len(paths) + 1} files" in text
    for problem in EXPECTED.values():
        assert problem in text
    assert "good0_copy.jpg (copy of good0.jpg)" in text
    assert "exclude.txt" in text


def test_check_image_edge_cases(tmp_path: Path) -> None:
    good = _jpeg_bytes(0)
    cases = {
        "zero_padded.jpg": (good[: len(good) // 2] + b"\x00" * 2000, "truncated"),  # preallocated, half written
        "headers_only.jpg": (good[:60], "truncated"),
        "no_eoi.jpg": (good[:-2], "truncated"),
        "gif.jpg": (b"GIF89a" + b"\x00" * 50, "not_jpeg"),
        "text.jpg": (b"hello world", "not_jpeg"),
    }
    for name, (data, problem) in cases.items():
        (tmp_path / name).write_bytes(data)
        got = V.check_image(str(tmp_path / name))
        assert [p for p, _ in got] == [problem], (name, got)
        assert all("\n" not in d for _, d in got)
    assert "gif" in V.check_image(str(tmp_path / "gif.jpg"))[0][1]
    assert V.check_image(str(tmp_path / "nope.jpg"))[0][0] == "missing"
    assert V.check_image(str(tmp_path))[0][0] == "corrupt"  # a directory


def test_pil_state_is_not_leaked(tmp_path: Path) -> None:
    p = tmp_path / "t.jpg"
    p.write_bytes(_jpeg_bytes(0)[:-2])
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert V.check_image(str(p))[0][0] == "truncated"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_check_files_dedups_paths_and_reports_missing(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg_bytes(0))
    report = V.check_files([str(p), str(p), str(tmp_path / "missing.jpg")], workers=1, progress=False)
    assert report["problem"].tolist() == ["missing"]  # the same file twice is not its own duplicate


def test_read_exclude_file_errors_and_comments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.txt"):
        V.read_exclude_file(tmp_path / "nope.txt")
    f = tmp_path / "ex.txt"
    f.write_text("# comment\n\n  a/b.jpg  \n/abs/c.jpg\n")
    assert V.read_exclude_file(f, root=tmp_path) == {str((tmp_path / "a/b.jpg").resolve()), "/abs/c.jpg"}


def _mixed_set(folder: Path, n: int = 40) -> list[str]:
    """``n`` files cycling through: unique good, a shared good (duplicates), truncated, PNG, grayscale."""
    good = _jpeg_bytes(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.jpg"
        kind = i % 5
        if kind == 0:
            p.write_bytes(_jpeg_bytes(100 + i))
        elif kind == 1:
            p.write_bytes(good)
        elif kind == 2:
            p.write_bytes(good[: len(good) // 2])
        elif kind == 3:
            p.write_bytes(_png_bytes(i))
        else:
            p.write_bytes(_jpeg_bytes(i, "L"))
        paths.append(str(p))
    return paths


def test_parallel_matches_serial(tmp_path: Path) -> None:
    paths = _mixed_set(tmp_path)
    serial = V.check_files(paths, workers=1, progress=False)
    parallel = V.check_files(paths, workers=2, progress=True)
    assert len(paths) > V.PARALLEL_MIN_FILES
    pd.testing.assert_frame_equal(serial, parallel)
    assert set(serial["problem"]) == {"duplicate", "truncated", "not_jpeg", "grayscale"}
    assert (serial["problem"] == "duplicate").sum() == 7  # img01 is the first of 8 identical copies


_REAL_INSPECT = V._inspect


def _crashing_inspect(path: str) -> dict:
    """Stands in for the worker function: kills its process on one file, like a segfaulting decoder would."""
    if path.endswith("img07.jpg"):
        os._exit(1)
    return _REAL_INSPECT(path)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to patch workers")
def test_worker_crash_becomes_corrupt_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _mixed_set(tmp_path)
    serial = V.check_files(paths, workers=1, progress=False)
    monkeypatch.setattr(V, "_inspect", _crashing_inspect)
    parallel = V.check_files(paths, workers=2, progress=False)
    crashed = parallel[parallel["path"].str.endswith("img07.jpg")]
    assert crashed["problem"].tolist() == ["corrupt"] and "crashed" in crashed["detail"].iloc[0]
    rest = parallel[~parallel["path"].str.endswith("img07.jpg")].reset_index(drop=True)
    expected = serial[~serial["path"].str.endswith("img07.jpg")].reset_index(drop=True)
    pd.testing.assert_frame_equal(rest, expected)
