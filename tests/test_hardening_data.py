"""Hardening of the data path (issue 10): limits on what a user can make the loaders allocate, corrupt scan data
found by ``fastlesion check``, and one ``error:`` line naming the right file when a decode fails in either backend."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

import fastlesion.data.loader as loader_mod
from fastlesion.cli import main
from fastlesion.config import LoaderConfig
from fastlesion.data import validate as V
from fastlesion.data.torch_loader import TorchLoader
from fastlesion.errors import ConfigError, DatasetError

SIZE = 32
HAS_DALI = loader_mod.dali_available()
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="needs NVIDIA DALI"))]


def _jpeg(seed: int, size: tuple[int, int] = (96, 72), quality: int = 90) -> bytes:
    """A smooth colour field with noise (plenty of entropy-coded data, like a photograph)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = rng.uniform(60, 200, 3) + 60 * np.sin(xx[..., None] * rng.uniform(2, 8, 3) + yy[..., None] * 3)
    img = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def corrupt_scan(data: bytes, n: int = 40, seed: int = 0) -> bytes:
    """``data`` with ``n`` bytes in the middle of the entropy-coded scan (after the SOS header, before EOI)
    replaced by random bytes (never 0xFF, so no marker is made): the headers are intact and decoders still
    return an image, with a libjpeg warning and wrong pixels."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    at = start + (end - start) // 3
    rng = np.random.default_rng(seed)
    noise = bytes(int(b) for b in rng.integers(0, 0xFF, n))  # 0..254
    return data[:at] + noise + data[at + n:]


def _table(folder: Path, n: int = 24) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.jpg"
        p.write_bytes(_jpeg(i))
        paths.append(str(p))
    return pd.DataFrame({"path": paths, "label": [i % 2 for i in range(n)]})


def _loader(backend: str, table: pd.DataFrame, cfg: LoaderConfig, train: bool, **kw):
    if backend == "dali":
        from fastlesion.data.dali import DaliLoader

        return DaliLoader(table, cfg, kw.pop("image_size", SIZE), train, **kw)
    return TorchLoader(table, cfg, kw.pop("image_size", SIZE), train, **kw)


@pytest.fixture()
def table(tmp_path: Path) -> pd.DataFrame:
    return _table(tmp_path / "imgs")


@pytest.fixture(autouse=True)
def _fresh_limit_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each limit warning is given once per process: start every test with none given."""
    monkeypatch.setattr(loader_mod, "_limit_warnings", set(), raising=False)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------------- 1: limits
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_larger_than_shard_is_clamped_with_one_warning(backend, table, caplog):
    cfg = LoaderConfig(batch_size=100_000_000, workers=1)
    with caplog.at_level(logging.WARNING, logger="fastlesion.data.loader"):
        train = _loader(backend, table, cfg, True)
        assert train.batch_size == 24 and train.num_samples == 24  # before anything is built
        assert len(train) == 1 and train.drop_last
        evaluation = _loader(backend, table, cfg, False)  # derived eval batch (2 x batch_size): clamped silently
        assert evaluation.batch_size == 24
    assert _warnings(caplog) == ["loader.batch_size 100000000 is larger than this process's training shard "
                                 "(24 images): using 24"]
    x, y, idx = next(iter(train))
    assert x.shape == (24, 3, SIZE, SIZE) and sorted(idx.tolist()) == list(range(24))
    assert sorted(i for _, _, ix in evaluation for i in ix.tolist()) == list(range(24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_eval_batch_larger_than_shard_warns(backend, table, caplog):
    cfg = LoaderConfig(batch_size=4, eval_batch_size=10**9, workers=1)
    with caplog.at_level(logging.WARNING, logger="fastlesion.data.loader"):
        ev = _loader(backend, table, cfg, False, rank=1, world_size=2)  # rank 1: no warning from it
        assert ev.batch_size == ev.num_samples == 12 and len(ev) == 1
        assert _warnings(caplog) == []
        _loader(backend, table, cfg, False, rank=0, world_size=2)
    assert _warnings(caplog) == ["loader.eval_batch_size 1000000000 is larger than this process's evaluation "
                                 "shard (12 images): using 12"]


def test_batch_within_shard_is_untouched(table, caplog):
    with caplog.at_level(logging.WARNING, logger="fastlesion.data.loader"):
        ld = TorchLoader(table, LoaderConfig(batch_size=24, eval_batch_size=5, workers=0), SIZE, train=True)
        assert ld.batch_size == 24 and ld.workers == 0 and ld.prefetch == 2
        ev = TorchLoader(table, LoaderConfig(batch_size=24, eval_batch_size=5, workers=0), SIZE, train=False)
        assert ev.batch_size == 5
    assert _warnings(caplog) == []


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # torch's own note on more workers than cores
@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_and_prefetch_are_capped_with_one_warning_each(backend, table, caplog):
    cap = loader_mod.WORKERS_PER_CORE * loader_mod.usable_cpus()
    cfg = LoaderConfig(batch_size=4, workers=100_000, prefetch=10**6)
    with caplog.at_level(logging.WARNING, logger="fastlesion.data.loader"):
        lds = [_loader(backend, table, cfg, train) for train in (True, False)]
    for ld in lds:
        assert ld.workers == cap and ld.prefetch == loader_mod.MAX_PREFETCH
    assert _warnings(caplog) == [  # once each, not once per loader
        f"loader.workers 100000 is more than {loader_mod.WORKERS_PER_CORE} x the {loader_mod.usable_cpus()} CPU "
        f"core(s) this process may use: using {cap}",
        f"loader.prefetch 1000000 is more than the maximum of {loader_mod.MAX_PREFETCH} batches: using "
        f"{loader_mod.MAX_PREFETCH}"]
    if backend == "torch":
        assert lds[0].loader.num_workers == cap and lds[0].loader.prefetch_factor == loader_mod.MAX_PREFETCH


def test_dali_pipeline_gets_the_capped_settings(table):
    pytest.importorskip("nvidia.dali")
    from fastlesion.data.dali import DaliLoader

    ld = DaliLoader(table, LoaderConfig(batch_size=4, workers=100_000, prefetch=10**6), SIZE, train=False)
    assert len(list(ld)) == len(ld)
    assert ld._pipe.num_threads == ld.workers and ld._pipe.prefetch_queue_depth == loader_mod.MAX_PREFETCH


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_are_refused(backend, table):
    with pytest.raises(ConfigError, match=r"data\.image_size 100000 is above the maximum of 4096 px"):
        _loader(backend, table, LoaderConfig(), True, image_size=100_000)
    with pytest.raises(ConfigError, match=r"loader\.prefetch must be >= 1, got 0"):
        _loader(backend, table, LoaderConfig(prefetch=0), True)
    with pytest.raises(ConfigError, match=r"loader\.eval_batch_size must be >= 1.*got -3"):
        _loader(backend, table, LoaderConfig(eval_batch_size=-3), False)
    assert _loader(backend, table, LoaderConfig(workers=0), True, image_size=4096).image_size == 4096


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_that_cannot_fit_in_memory_is_refused(backend, monkeypatch):
    """A batch within the shard can still be too big: its held outputs alone exceed the machine's memory."""
    n = 50_000  # rows only: nothing is read before iterating
    table = pd.DataFrame({"path": [f"/nonexistent/{i}.jpg" for i in range(n)], "label": [i % 2 for i in range(n)]})
    monkeypatch.setattr(loader_mod, "physical_memory", lambda: 24 * 2**30)
    cfg = LoaderConfig(batch_size=n, workers=0)
    with pytest.raises(ConfigError, match=r"loader\.batch_size 50000 at data\.image_size 224: one batch is 28\.0 "
                                          r"GiB .* more than this machine's memory \(24\.0 GiB\)"):
        _loader(backend, table, cfg, True, image_size=224)
    assert _loader(backend, table, LoaderConfig(batch_size=256, workers=0), True, image_size=224).batch_size == 256


def _synthetic(root: Path, n: int = 40) -> Path:
    from fastlesion.data.synthetic import generate

    return generate("isic2020", root, n=n, seed=3, size=48, positive_rate=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_huge_batch_trains_with_one_warning(backend, tmp_path):
    """Was: DALI grew to 18 GB in a minute and the kernel killed it, silently. In a subprocess, so that the
    warning goes through the CLI's own logging set-up (pytest's log capture would swallow it here)."""
    root = _synthetic(tmp_path / "data")
    argv = ["train", "--data", str(root), "--model", "lenet", "--image-size", "32", "--epochs", "1",
            "--batch-size", "100000000", "--out", str(tmp_path / "run"), "--quiet", "--loader.backend", backend,
            "--loader.workers", "1"]
    proc = subprocess.run([sys.executable, "-m", "fastlesion.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err == ["WARNING loader.batch_size 100000000 is larger than this process's training shard (30 images): "
                   "using 30"], err


def test_cli_huge_image_size_is_one_error_line(tmp_path, capfd):
    root = _synthetic(tmp_path / "data")
    capfd.readouterr()
    argv = ["train", "--data", str(root), "--model", "lenet", "--image-size", "100000", "--epochs", "1",
            "--out", str(tmp_path / "run"), "--quiet", "--loader.backend", "torch", "--loader.workers", "0"]
    assert main(argv) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: data.image_size 100000 is above the maximum"), err


# --------------------------------------------------------------------------------------------------- 4: corrupt scan
def test_corrupt_scan_decodes_silently_in_pil_and_torchvision():
    """The construction itself: the headers are fine and PIL returns an image without complaint (that is the
    danger), with pixels far from the original's."""
    good = _jpeg(0)
    bad = corrupt_scan(good)
    assert len(bad) == len(good) and bad[:300] == good[:300]
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(bad)) as im:
            im.load()
            a = np.asarray(im.convert("RGB"), dtype=np.float64)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    b = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"), dtype=np.float64)
    assert a.shape == b.shape and np.abs(a - b).mean() > 5  # grey levels


def test_check_flags_corrupt_scan_data(tmp_path, capfd):
    root = tmp_path / "data"
    root.mkdir()
    paths = []
    for i in range(4):
        p = root / f"good{i}.jpg"
        p.write_bytes(_jpeg(i))
        paths.append(str(p))
    bad = root / "scan.jpg"
    bad.write_bytes(corrupt_scan(_jpeg(9)))
    paths.append(str(bad))
    capfd.readouterr()
    res = V.run_check(paths, tmp_path / "out", root=root, workers=1, progress=False)
    assert res.report["path"].tolist() == [str(bad)]
    row = res.report.iloc[0]
    assert row["problem"] == "corrupt" and "Corrupt JPEG data" in row["detail"] and "wrong pixels" in row["detail"]
    assert row["width"] == 96 and row["mode"] == "RGB"
    assert res.excluded == [str(bad)]
    assert [ln for ln in (tmp_path / "out" / "exclude.txt").read_text().splitlines()
            if not ln.startswith("#")] == ["scan.jpg"]
    assert "corrupt" in V.format_summary(res) and "scan.jpg" in V.format_summary(res)
    assert "Corrupt JPEG" not in capfd.readouterr().err  # libjpeg's warning is captured, not printed
    assert V.check_image(str(bad))[0][0] == "corrupt"
    assert all(V.check_image(p) == [] for p in paths[:4])


def test_check_flags_corrupt_scan_data_in_worker_processes(tmp_path):
    paths = []
    for i in range(V.PARALLEL_MIN_FILES + 8):
        p = tmp_path / f"img{i:02d}.jpg"
        p.write_bytes(corrupt_scan(_jpeg(i), seed=i) if i in (5, 30) else _jpeg(i))
        paths.append(str(p))
    serial = V.check_files(paths, workers=1, progress=False)
    parallel = V.check_files(paths, workers=2, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)
    assert [Path(p).name for p in parallel["path"]] == ["img05.jpg", "img30.jpg"]
    assert set(parallel["problem"]) == {"corrupt"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_scan_trains_silently_without_check(backend, table, tmp_path):
    """What the README says each backend does with such a file when it is not excluded: it decodes, to wrong
    pixels, and nothing stops the run (hence `fastlesion check` + data.exclude_file)."""
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(corrupt_scan(Path(table["path"][3]).read_bytes()))
    t = table.copy()
    t.loc[3, "path"] = str(bad)
    cfg = LoaderConfig(batch_size=8, workers=1 if backend == "dali" else 0)
    clean = torch.cat([x for x, _, _ in _loader(backend, table, cfg, False)])
    dirty = torch.cat([x for x, _, _ in _loader(backend, t, cfg, False)])
    assert dirty.shape == clean.shape
    assert float((dirty[3] - clean[3]).abs().mean()) > 0.05  # normalised units: wrong pixels
    assert torch.equal(dirty[:3], clean[:3])


# --------------------------------------------------------------------------------------------------- 8: torch workers
def test_torch_workers_bad_file_is_one_line(table, tmp_path):
    t = table.copy()
    bad = tmp_path / "cut.jpg"
    data = Path(t["path"][6]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    t.loc[6, "path"] = str(bad)
    ld = TorchLoader(t, LoaderConfig(batch_size=4, workers=2), SIZE, train=False)
    with pytest.raises(DatasetError) as info:
        list(ld)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: cannot decode image") and "Traceback" not in msg


def test_cli_torch_workers_bad_file_is_one_error_line(tmp_path, capfd):
    root = _synthetic(tmp_path / "data")
    victim = sorted((root / "train").glob("*.jpg"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    argv = ["train", "--data", str(root), "--model", "lenet", "--image-size", "32", "--epochs", "1",
            "--out", str(tmp_path / "run"), "--quiet", "--loader.backend", "torch", "--loader.workers", "2"]
    assert main(argv) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {victim}: cannot decode image") and "data.exclude_file" in err[0]


# --------------------------------------------------------------------------------------------------- 9: DALI names
@pytest.mark.skipif(not HAS_DALI, reason="needs NVIDIA DALI")
@pytest.mark.parametrize("train", [True, False])
def test_dali_names_the_file_dali_failed_on_not_a_pil_guess(table, tmp_path, monkeypatch, train):
    """DALI reports "nvImageCodec failure" without a file name for a file that is no image at all. The file named
    must be that one, not one that merely fails in PIL: here every other file does (PIL's decompression-bomb
    guard, lowered), while DALI reads them all."""
    from fastlesion.data.dali import DaliLoader

    t = table.iloc[:8].copy()
    cfg = LoaderConfig(batch_size=4, workers=1)
    victim = int(DaliLoader(t, cfg, SIZE, train=train).shard_rows()[2])  # third read, inside the first batch
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is not an image\n" * 20)
    t.loc[victim, "path"] = str(bad)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL now refuses every 96x72 image
    with pytest.raises(Exception):  # noqa: B017 - the precondition: PIL cannot open the good files
        Image.open(t["path"].iloc[0])
    with pytest.raises(DatasetError) as info:
        list(DaliLoader(t, cfg, SIZE, train=train))
    msg = str(info.value)
    assert msg.startswith(f"{bad}: DALI cannot decode image") and "not_jpeg" in msg and "\n" not in msg


@pytest.mark.skipif(not HAS_DALI, reason="needs NVIDIA DALI")
def test_dali_probe_finds_the_undecodable_file(table, tmp_path, capfd):
    from fastlesion.data.dali import find_undecodable

    paths = table["path"].tolist()[:6]
    cut = tmp_path / "cut.jpg"
    data = Path(paths[1]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.jpg"
    text.write_bytes(b"hello " * 50)
    assert find_undecodable(paths) is None
    capfd.readouterr()
    assert find_undecodable(paths[:3] + [str(text)] + paths[3:])[0] == str(text)
    path, reason = find_undecodable(paths[:2] + [str(cut)] + [str(text)])
    assert path == str(cut) and reason  # the first that fails, with the decoder's reason
    assert "[ERROR]" not in capfd.readouterr().err  # DALI's own log lines are captured


@pytest.mark.skipif(not HAS_DALI, reason="needs NVIDIA DALI")
def test_dali_lists_candidates_when_no_single_file_fails(table, tmp_path, monkeypatch):
    import fastlesion.data.dali as dali_mod

    t = table.iloc[:8].copy()
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is not an image\n" * 20)
    t.loc[t.index[5], "path"] = str(bad)
    monkeypatch.setattr(dali_mod, "find_undecodable", lambda *a, **k: None)  # e.g. a failure of the whole batch
    with pytest.raises(DatasetError) as info:
        list(dali_mod.DaliLoader(t, LoaderConfig(batch_size=4, workers=1), SIZE, train=False))
    msg = str(info.value)
    assert msg.startswith("DALI failed on a batch of rank 0") and "the file is one of 8: " in msg
    assert "(+3 more)" in msg and "\n" not in msg
