"""EXIF orientation: both loaders turn a tagged JPEG upright, and ``fastlesion check`` counts the tagged files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import save_jpeg
from PIL import Image, ImageOps

from fastlesion.config import LoaderConfig
from fastlesion.data.torch_loader import TorchLoader, open_rgb

SIZE = 48


def _pattern(w: int = 96, h: int = 72) -> np.ndarray:
    """A picture whose orientation shows: dark left, bright right, a red top band, with a JPEG-friendly gradient."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    img[...] = (40 + 180 * (xx / w))[..., None]
    img[: h // 4, :, 0] = 230
    img[: h // 4, :, 1:] = 40
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, orientation: int | None) -> str:
    return save_jpeg(path, arr, orientation, quality=95)


@pytest.fixture(scope="module")
def oriented(tmp_path_factory) -> pd.DataFrame:
    """Row 0: stored pixels + orientation 6; row 1: the same picture turned upright, no tag; row 2: stored pixels,
    no tag (what a loader that ignores the tag sees)."""
    d = tmp_path_factory.mktemp("orient")
    arr = _pattern()
    tagged = _save(d / "tagged.jpg", arr, 6)
    with Image.open(tagged) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert upright.shape == (96, 72, 3)  # orientation 6: rotate 90 degrees clockwise to display
    paths = [tagged, _save(d / "upright.jpg", upright, None), _save(d / "plain.jpg", arr, None)]
    return pd.DataFrame({"path": paths, "label": [0, 1, 0], "group": ["a", "b", "c"]})


def _cfg(**kw) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 3, "workers": 0, "seed": 0, **kw})


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The equivalence tolerances of tests/test_dali.py (normalised units)."""
    return (abs(float(a.mean() - b.mean())) < 0.05 and abs(float(a.std() - b.std())) < 0.03
            and float((a - b).abs().mean()) < 0.15)


def test_open_rgb_applies_orientation(oriented):
    im = open_rgb(oriented["path"][0])
    assert im.size == (72, 96) and im.mode == "RGB"
    assert open_rgb(oriented["path"][2]).size == (96, 72)


def test_torch_loader_turns_tagged_image_upright(oriented):
    x = torch.cat([b[0] for b in TorchLoader(oriented, _cfg(), SIZE, train=False)])
    assert x.shape == (3, 3, SIZE, SIZE)
    assert _close(x[0], x[1])  # as the upright copy
    assert float((x[0] - x[2]).abs().mean()) > 0.3  # not as the stored pixels


def test_dali_and_torch_agree_on_orientation(oriented):
    pytest.importorskip("nvidia.dali")
    from fastlesion.data.dali import DaliLoader

    dali = torch.cat([b[0] for b in DaliLoader(oriented, _cfg(workers=1), SIZE, train=False)]).float()
    ref = torch.cat([b[0] for b in TorchLoader(oriented, _cfg(), SIZE, train=False)])
    assert dali.shape == ref.shape == (3, 3, SIZE, SIZE)
    assert _close(dali[0], dali[1])  # DALI turns it upright too
    assert float((dali[0] - dali[2]).abs().mean()) > 0.3
    for i in range(3):
        assert _close(dali[i], ref[i]), i


def test_check_counts_oriented_files(oriented, tmp_path):
    from fastlesion.data import validate as V

    res = V.run_check(oriented["path"].tolist(), tmp_path / "out", workers=1, progress=False)
    assert res.ok and res.n_bad == 0 and res.excluded == [] and res.n_oriented == 1
    notes = res.report[res.report["problem"] == "oriented"]
    assert notes["path"].tolist() == [oriented["path"][0]] and "orientation 6" in notes["detail"].iloc[0]
    assert "oriented" in pd.read_csv(res.report_file)["problem"].tolist()  # a note per file in the report
    summary = V.format_summary(res)
    assert "no problems found" in summary and "1 file(s) carry an EXIF orientation tag" in summary
    assert "tagged.jpg" in summary


def test_check_cli_reports_orientation(oriented, tmp_path, capsys):
    from fastlesion.cli import main

    root = tmp_path / "set"
    for cls, i in (("a", 0), ("b", 1), ("b", 2)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / Path(oriented["path"][i]).name).write_bytes(Path(oriented["path"][i]).read_bytes())
    assert main(["check", str(root), "--out", str(tmp_path / "o"), "--workers", "1", "--quiet"]) == 0
    assert "1 file(s) carry an EXIF orientation tag" in capsys.readouterr().out


@pytest.mark.gpu
def test_dali_gpu_decoder_turns_tagged_image_upright(oriented):
    """nvJPEG (``device="mixed"``) applies the tag too."""
    pytest.importorskip("nvidia.dali")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fastlesion.data.dali import DaliLoader

    gpu = torch.cat([b[0] for b in DaliLoader(oriented, _cfg(workers=1), SIZE, train=False, device="cuda",
                                              dali_device="gpu")]).float().cpu()
    ref = torch.cat([b[0] for b in TorchLoader(oriented, _cfg(), SIZE, train=False)])
    assert _close(gpu[0], gpu[1]) and float((gpu[0] - gpu[2]).abs().mean()) > 0.3
    for i in range(3):
        assert _close(gpu[i], ref[i]), i
