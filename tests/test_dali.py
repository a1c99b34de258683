"""DALI loader (CPU pipelines): shapes, dtypes, layouts, determinism, sharding, oversampling, exactly-once eval,
equivalence with the torch eval loader, and decode failures naming the file."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastlesion.config import LoaderConfig, load_config  # noqa: E402
from fastlesion.data import sampling  # noqa: E402
from fastlesion.data.dali import DaliLoader  # noqa: E402
from fastlesion.data.loader import build_loader  # noqa: E402
from fastlesion.data.torch_loader import TorchLoader  # noqa: E402
from fastlesion.errors import DatasetError  # noqa: E402

SIZE = 32


def _write_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (96, 72)) -> list[str]:
    """Smooth random colour fields with a dark blob (JPEG-friendly, each image different)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    paths = []
    for i in range(n):
        base = rng.uniform(60, 200, 3) + 60 * np.sin(xx[..., None] * rng.uniform(2, 8, 3) + rng.uniform(0, 6, 3))
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.5), rng.uniform(0.08, 0.25)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r**2)[..., None]
        img = np.clip(base * (1 - 0.7 * blob) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
        p = folder / f"img_{i:03d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """24 JPEGs 96x72, 18 of class 0 and 6 of class 1 (interleaved)."""
    paths = _write_images(tmp_path_factory.mktemp("dali_imgs"), 24)
    labels = [1 if i % 4 == 3 else 0 for i in range(24)]
    return pd.DataFrame({"path": paths, "label": labels, "group": [f"p{i // 2}" for i in range(24)]})


def _cfg(**kw) -> LoaderConfig:
    base = {"batch_size": 4, "workers": 2, "seed": 0}
    base.update(kw)
    return LoaderConfig(**base)


def _rows(loader) -> list[int]:
    return [i for _, _, idx in loader for i in idx.tolist()]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_dtypes_layouts(table, dtype, channels_last):
    loader = DaliLoader(table, _cfg(dtype=dtype, batch_size=8), SIZE, train=True, channels_last=channels_last)
    assert loader.backend == "dali" and loader.device_name == "cpu" and len(loader) == 3 and loader.num_samples == 24
    batches = list(loader)
    assert len(batches) == len(loader)
    x, y, idx = batches[0]
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == getattr(torch, dtype)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    if not channels_last:
        assert x.is_contiguous()
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    assert (y.numpy() == table["label"].to_numpy()[idx.numpy()]).all()
    xf = x.float()
    assert -0.8 < float(xf.mean()) < 0.8 and float(xf.abs().max()) < 1 / 0.224 + 0.1  # normalised, not 0..255
    ev = next(iter(DaliLoader(table, _cfg(dtype=dtype), SIZE, train=False, channels_last=channels_last)))[0]
    assert ev.shape == (8, 3, SIZE, SIZE) and ev.dtype == getattr(torch, dtype)
    assert ev.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_build_loader_picks_dali(table):
    cfg = load_config(None, {"loader.backend": "dali", "loader.device": "cpu", "loader.workers": 1})
    loader = build_loader(table, cfg.loader, SIZE, train=False)
    assert isinstance(loader, DaliLoader) and loader.device_name == "cpu"


def test_determinism_for_a_seed(table):
    a = list(DaliLoader(table, _cfg(), SIZE, train=True))
    b = list(DaliLoader(table, _cfg(), SIZE, train=True))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(a, b, strict=True))
    c = next(iter(DaliLoader(table, _cfg(seed=1), SIZE, train=True)))
    assert not torch.equal(a[0][0], c[0]) and not torch.equal(a[0][2], c[2])
    epoch1 = DaliLoader(table, _cfg(), SIZE, train=True)
    epoch1.set_epoch(1)
    assert not torch.equal(next(iter(epoch1))[2], a[0][2])


def test_same_order_as_torch_loader(table):
    """Both backends draw their epoch orders and shards from fastlesion.data.sampling."""
    cfg = _cfg(batch_size=5)
    for rank in range(2):
        dali = DaliLoader(table, cfg, SIZE, train=True, rank=rank, world_size=2)
        ref = TorchLoader(table, _cfg(batch_size=5, workers=0), SIZE, train=True, rank=rank, world_size=2)
        for epoch in (0, 3):
            dali.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert len(dali) == len(ref)
            assert _rows(dali) == ref.sampler.indices[: len(ref) * 5]


def test_train_shards_cover_without_overlap(table):
    t = table.iloc[:23].reset_index(drop=True)  # odd: one sample of padding
    cfg = _cfg(batch_size=4)
    loaders = [DaliLoader(t, cfg, SIZE, train=True, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 3 and loaders[0].num_samples == loaders[1].num_samples == 12
    for epoch in (0, 1):
        rows = []
        for ld in loaders:
            ld.set_epoch(epoch)
            got = _rows(ld)
            assert len(got) == 12
            rows.append(got)
        union = rows[0] + rows[1]
        assert set(union) == set(range(23))  # the shards cover the dataset
        assert len(union) - len(set(union)) == 1  # and overlap only by the padding
        assert not set(rows[0]) & set(rows[1]) - {sampling.epoch_order(t["label"].to_numpy(), epoch, 0)[0]}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_exactly_once(table, world_size):
    t = table.iloc[:23].reset_index(drop=True)  # not a multiple of the batch size
    cfg = _cfg(eval_batch_size=5)
    seen = []
    for rank in range(world_size):
        loader = DaliLoader(t, cfg, SIZE, train=False, rank=rank, world_size=world_size)
        first = list(loader)
        assert len(first) == len(loader)
        got = [i for _, _, idx in first for i in idx.tolist()]
        assert len(got) == loader.num_samples
        assert _rows(loader) == got  # a second epoch reuses the pipeline and gives the same rows
        seen += got
    assert sorted(seen) == list(range(23))


def test_unfinished_epoch_is_restarted(table):
    loader = DaliLoader(table, _cfg(), SIZE, train=True)
    for i, _ in enumerate(loader):
        if i == 1:
            break  # e.g. train.steps_per_epoch
    assert len(_rows(loader)) == 24  # the next iteration is a whole epoch, not the remainder


def test_oversampling_raises_minority_share(table):
    labels = table["label"].to_numpy()
    plain = DaliLoader(table, _cfg(batch_size=6), SIZE, train=True)
    over = DaliLoader(table, _cfg(batch_size=6, oversample=True, oversample_power=1.0), SIZE, train=True)
    base, ratios, drawn = plain.effective_class_ratio[1], [], []
    for epoch in range(4):
        over.set_epoch(epoch)
        ratios.append(over.effective_class_ratio[1])
        got = _rows(over)
        drawn += got
        assert np.isclose(labels[got].mean(), over.effective_class_ratio[1])  # the reported ratio is what is drawn
    assert base == pytest.approx(0.25)
    assert np.mean(ratios) > 0.38 and labels[drawn].mean() > 0.38  # towards balanced (0.5) from 0.25
    # compatible with sharding: both ranks take equal shares of the same resampled order
    shards = [DaliLoader(table, _cfg(batch_size=6, oversample=True, oversample_power=1.0), SIZE, train=True,
                         rank=r, world_size=2) for r in range(2)]
    for ld in shards:
        ld.set_epoch(2)
    a, b = _rows(shards[0]), _rows(shards[1])
    over.set_epoch(2)
    assert len(shards[0]) == len(shards[1]) and sorted(a + b) == sorted(_rows(over))


def test_eval_matches_torch_loader(table):
    """Different JPEG decoders/resamplers: same shapes, per-image statistics within the documented tolerance."""
    size = 48
    dali = torch.cat([x for x, _, _ in DaliLoader(table, _cfg(), size, train=False)])
    ref = torch.cat([x for x, _, _ in TorchLoader(table, _cfg(workers=0), size, train=False)])
    assert dali.shape == ref.shape == (24, 3, size, size)
    d_mean = (dali.mean(dim=(1, 2, 3)) - ref.mean(dim=(1, 2, 3))).abs().max()
    d_std = (dali.std(dim=(1, 2, 3)) - ref.std(dim=(1, 2, 3))).abs().max()
    assert float(d_mean) < 0.05 and float(d_std) < 0.03  # normalised units (1 unit ~ 57 grey levels)
    assert float((dali - ref).abs().mean()) < 0.15


def _alarm(seconds: int):
    def boom(*_):
        raise TimeoutError(f"DALI did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    return old


@pytest.mark.parametrize("damage", ["truncated", "not_a_jpeg"])
def test_corrupt_jpeg_names_the_file(table, tmp_path, damage):
    t = table.iloc[:8].copy()
    bad = tmp_path / "bad.jpg"
    data = Path(t["path"].iloc[5]).read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"this is not an image\n" * 20)
    t.loc[t.index[5], "path"] = str(bad)
    old = _alarm(60)
    try:
        for train in (True, False):
            loader = DaliLoader(t, _cfg(), SIZE, train=train)
            with pytest.raises(DatasetError, match="bad.jpg"):
                list(loader)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_gpu_without_cuda_is_a_config_error(table):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    from fastlesion.errors import ConfigError

    with pytest.raises(ConfigError, match="loader.device"):
        DaliLoader(table, _cfg(), SIZE, train=True, dali_device="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("train", [True, False])
def test_gpu_pipeline(table, train):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loader = DaliLoader(table, _cfg(dtype="float16"), SIZE, train=train, device="cuda", channels_last=True,
                        dali_device="gpu")
    batches = list(loader)
    assert len(batches) == len(loader) and loader.device_name == "gpu"
    x, y, idx = batches[0]
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float16 and x.shape == (len(idx), 3, SIZE, SIZE)
    assert x.is_contiguous(memory_format=torch.channels_last)
    if not train:
        assert sorted(i for _, _, ix in batches for i in ix.tolist()) == list(range(24))
        cpu = torch.cat([b[0] for b in DaliLoader(table, _cfg(), SIZE, train=False)])
        gpu = torch.cat([b[0] for b in batches]).float().cpu()
        assert float((cpu.mean(dim=(1, 2, 3)) - gpu.mean(dim=(1, 2, 3))).abs().max()) < 0.05
