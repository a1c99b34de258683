"""Segmentation loaders (a table with a ``mask`` column), torch and DALI (CPU pipelines): image and mask stay aligned
after every random op, masks are float {0, 1} N x 1 x S x S, the backends agree, sharding and exactly-once
evaluation carry over, a bad mask is named."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fastlesion.config import LoaderConfig, load_config
from fastlesion.data.loader import build_loader, dali_available
from fastlesion.data.torch_loader import TorchLoader
from fastlesion.data.transforms import MEAN, STD, binarize_mask
from fastlesion.errors import DatasetError

W, H = 48, 40
LESION, SKIN = (20, 20, 220), (230, 200, 60)  # blue lesion on yellow skin: far from each other and from the black fill
NO_COLOUR = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI"))]


def _write_pairs(folder: Path, n: int = 6) -> pd.DataFrame:
    """``n`` JPEGs 48x40 (4:4:4, so colour edges stay sharp), each an off-centre ellipse placed differently, with
    its mask PNG. Row 4's mask is 0/1 (not 0/255), row 5's twice the image's size (nearest neighbour)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:H, 0:W]
    rows = []
    for i in range(n):
        cx, cy = (11 + 5 * i) % 38 + 5, (9 + 7 * i) % 26 + 7
        m = ((xx - cx) / (7 + i % 3)) ** 2 + ((yy - cy) / (5 + i % 2)) ** 2 < 1
        img = np.where(m[..., None], LESION, SKIN).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i}.jpg", quality=95, subsampling=0)
        mask = m.astype(np.uint8) * (1 if i == 4 else 255)
        if i == 5:
            mask = mask.repeat(2, 0).repeat(2, 1)
        Image.fromarray(mask).save(folder / f"img_{i}_mask.png")
        rows.append({"path": str(folder / f"img_{i}.jpg"), "mask": str(folder / f"img_{i}_mask.png"), "label": 0,
                     "group": f"img_{i}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    return _write_pairs(tmp_path_factory.mktemp("seg_pairs"))


def _cfg(backend: str, **kw) -> LoaderConfig:
    base = {"backend": backend, "device": "cpu", "batch_size": 3, "workers": 0 if backend == "torch" else 1,
            "seed": 0}
    return LoaderConfig(**{**base, **kw})


def _loader(backend: str, table, size: int, train: bool, rank: int = 0, world_size: int = 1,
            channels_last: bool = False, **kw):
    return build_loader(table, _cfg(backend, **kw), size, train, rank=rank, world_size=world_size,
                        channels_last=channels_last)


def _batches(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ms, idx = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ms), torch.cat(idx)


def _lesion(x: torch.Tensor) -> torch.Tensor:
    """The lesion pixels of normalised images N x 3 x S x S: bluer than red by more than halfway between the
    lesion's and the skin's (blue - red) (the rotation's black fill is neither)."""
    rgb = x.float() * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    mid = ((LESION[2] - LESION[0]) + (SKIN[2] - SKIN[0])) / 2 / 255
    return (rgb[:, 2] - rgb[:, 0]) > mid


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of boolean N x S x S (1 where both are empty)."""
    inter, union = (a & b).sum((1, 2)).float(), (a | b).sum((1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _boundary(m: torch.Tensor) -> torch.Tensor:
    """Pixels of masks N x 1 x S x S whose 3x3 neighbourhood holds both values."""
    pool = torch.nn.functional.max_pool2d
    return (pool(m, 3, 1, 1) != -pool(-m, 3, 1, 1))[:, 0]


def test_binarize_mask_rule():
    assert binarize_mask(np.array([[0, 255], [128, 127]], np.uint8)).tolist() == [[0, 1], [1, 0]]  # 0/255, soft edges
    assert binarize_mask(np.array([[0, 1], [1, 0]], np.uint8)).tolist() == [[0, 1], [1, 0]]  # 0/1
    assert binarize_mask(np.array([[0, 40]], np.uint8)).tolist() == [[0, 1]]  # low-valued labels: any nonzero
    assert binarize_mask(np.zeros((2, 2), np.uint8)).sum() == 0
    assert binarize_mask(np.zeros((2, 2), np.uint8)).dtype == np.uint8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_masks_are_binary_float_n1ss(table, backend, train):
    loader = _loader(backend, table, 32, train, channels_last=True, dtype="float16")  # DALI's image dtype only
    assert loader.task == "segmentation" and loader.backend == backend
    assert len(loader) == (2 if train else 1)  # batches of 3; evaluation 2 x 3
    x, m, idx = _batches(loader)
    assert x.shape == (6, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.dtype == (torch.float16 if backend == "dali" else torch.float32)
    assert m.shape == (6, 1, 32, 32) and m.dtype == torch.float32 and m.is_contiguous()
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert sorted(idx.tolist()) == list(range(6))
    assert (m.sum((1, 2, 3)) > 10).all()  # every image's lesion is there, the 0/1 mask (row 4) included


OPS = {  # each random op alone (colour off), then all of them; the crop off = the whole 48x40 image (ratio 1.2)
    "crop": {"hflip": 0.0, "vflip": 0.0, "rotate": 0.0},
    "hflip": {"scale": (1.0, 1.0), "ratio": (1.2, 1.2), "hflip": 1.0, "vflip": 0.0, "rotate": 0.0},
    "vflip": {"scale": (1.0, 1.0), "ratio": (1.2, 1.2), "hflip": 0.0, "vflip": 1.0, "rotate": 0.0},
    "rotate": {"scale": (1.0, 1.0), "ratio": (1.2, 1.2), "hflip": 0.0, "vflip": 0.0, "rotate": 45.0},
    "all": {"rotate": 45.0},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_joint_augmentation_keeps_image_and_mask_aligned(table, backend, op):
    size = 40
    ref = {}  # row -> evaluation mask (no random op)
    for _, m, idx in _loader(backend, table, size, train=False):
        ref.update(zip(idx.tolist(), m))
    loader = _loader(backend, table, size, train=True, **OPS[op], **NO_COLOUR)
    moved = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        x, m, idx = _batches(loader)
        mask = m[:, 0] > 0
        iou = _iou(_lesion(x), mask)
        assert float(iou.min()) > 0.9, (op, iou.tolist())  # the image's lesion is where its mask says
        moved.append(_iou(mask, torch.stack([ref[i] for i in idx.tolist()])[:, 0] > 0))
        # and mostly not where the other images' masks are (each pair is read together, and a pair mixed up
        # would show)
        assert float(_iou(_lesion(x), mask.roll(1, dims=0)).mean()) < 0.35
    assert float(torch.cat(moved).mean()) < 0.8, op  # the op really moved the masks (the test has teeth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_colour_jitter_leaves_the_mask_alone(table, backend):
    geometry_off = {"scale": (1.0, 1.0), "ratio": (1.2, 1.2), "hflip": 0.0, "vflip": 0.0, "rotate": 0.0}
    colour = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.1}
    x0, m0, i0 = _batches(_loader(backend, table, 40, train=False))
    x1, m1, i1 = _batches(_loader(backend, table, 40, train=True, **geometry_off, **colour))
    order = torch.argsort(i1)
    assert torch.equal(m1[order], m0[torch.argsort(i0)])
    assert float((x1[order] - x0[torch.argsort(i0)]).abs().mean()) > 0.05  # the images were jittered


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
@pytest.mark.parametrize("size", [32, 64])
def test_torch_and_dali_agree_on_evaluation(table, size):
    """Different JPEG decoders and resamplers: the images within the classification tolerance; both resize the
    mask by centred nearest neighbour, so masks differ at most on boundary pixels (rounding ties)."""
    xd, md, idd = _batches(_loader("dali", table, size, train=False))
    xt, mt, idt = _batches(_loader("torch", table, size, train=False))
    assert torch.equal(idd, idt) and xd.shape == xt.shape and md.shape == mt.shape == (6, 1, size, size)
    assert float((xd.mean(dim=(1, 2, 3)) - xt.mean(dim=(1, 2, 3))).abs().max()) < 0.05
    assert float((xd - xt).abs().mean()) < 0.15
    differ = (md != mt)[:, 0]
    assert not (differ & ~_boundary(mt)).any()
    assert float(differ.float().mean()) < 0.02
    assert float(_iou(md[:, 0] > 0, mt[:, 0] > 0).min()) > 0.95


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_torch_and_dali_train_in_the_same_order(table):
    for rank in range(2):
        dali = _loader("dali", table, 32, train=True, rank=rank, world_size=2, batch_size=2)
        ref = _loader("torch", table, 32, train=True, rank=rank, world_size=2, batch_size=2)
        for epoch in (0, 3):
            dali.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert len(dali) == len(ref)
            assert _batches(dali)[2].tolist() == ref.sampler.indices[: len(ref) * 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_keep_pairs_and_evaluate_each_row_once(table, backend):
    single = {}
    for _, m, idx in _loader(backend, table, 32, train=False):
        single.update(zip(idx.tolist(), m))
    seen = []
    for rank in range(2):
        loader = _loader(backend, table, 32, train=False, rank=rank, world_size=2, eval_batch_size=2)
        _, m, idx = _batches(loader)
        assert len(idx) == loader.num_samples == 3
        assert all(torch.equal(m[k], single[i]) for k, i in enumerate(idx.tolist()))  # the row's own mask
        seen += idx.tolist()
    assert sorted(seen) == list(range(6))
    t = table.iloc[:5].reset_index(drop=True)  # training: padded shards, pairs aligned on both ranks
    rows = []
    for rank in range(2):
        x, m, idx = _batches(_loader(backend, t, 40, train=True, rank=rank, world_size=2, batch_size=3,
                                     **NO_COLOUR))
        assert float(_iou(_lesion(x), m[:, 0] > 0).min()) > 0.9
        rows += idx.tolist()
    assert len(rows) == 6 and set(rows) == set(range(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversampling_is_ignored_with_a_warning(table, backend, caplog, monkeypatch):
    import fastlesion.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "_limit_warnings", set())  # each warning is given once per process
    with caplog.at_level(logging.WARNING, logger="fastlesion.data.loader"):
        loader = _loader(backend, table, 32, train=True, oversample=True, oversample_power=1.0)
    assert "loader.oversample has no effect" in caplog.text
    assert sorted(_batches(loader)[2].tolist()) == list(range(6))  # a permutation, not a weighted draw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_bad_mask_names_the_file(table, tmp_path, backend, damage):
    t = table.copy()
    bad = tmp_path / "bad_mask.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a mask\n" * 20)
    t.loc[t.index[3], "mask"] = str(bad)
    for train in (True, False):
        with pytest.raises(DatasetError, match="bad_mask.png") as err:
            list(_loader(backend, t, 32, train))
        assert "\n" not in str(err.value) and "mask" in str(err.value)


def test_build_loader_dispatches_on_the_mask_column(table):
    cfg = load_config(None, {"loader.backend": "torch", "loader.workers": 0})
    seg = build_loader(table, cfg.loader, 32, train=False)
    plain = build_loader(table.drop(columns="mask"), cfg.loader, 32, train=False)
    assert isinstance(seg, TorchLoader) and seg.task == "segmentation" and plain.task == "classification"
    x, y, _ = next(iter(plain))
    assert y.dtype == torch.int64 and y.shape == (6,)


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_graph_is_declared_without_a_gpu(table, train):
    """The mixed (nvJPEG) segmentation graph can be declared here; only building it needs CUDA."""
    from nvidia.dali import Pipeline

    from fastlesion.data.dali import lesion_pipeline

    pipe = Pipeline(batch_size=2, num_threads=1, device_id=None)
    with pipe:
        img, row, mask, mask_row = lesion_pipeline(table["path"].tolist(), list(range(6)), _cfg("dali"), 32, train,
                                                   dali_device="gpu", masks=table["mask"].tolist())
    assert (img.device, mask.device, row.device, mask_row.device) == ("gpu", "gpu", "cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_pairs(table, train):
    if not torch.cuda.is_available() or not dali_available():
        pytest.skip("needs CUDA and DALI")
    from fastlesion.data.dali import DaliLoader

    kw = {**NO_COLOUR, "rotate": 45.0, "dtype": "float16"}
    loader = DaliLoader(table, _cfg("dali", **kw), 40, train, device="cuda", channels_last=True, dali_device="gpu")
    x, m, idx = _batches(loader)
    assert x.is_cuda and m.is_cuda and m.dtype == torch.float32 and m.shape == (6, 1, 40, 40)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert float(_iou(_lesion(x.cpu()), m[:, 0].cpu() > 0).min()) > 0.9
    if not train:
        _, mc, ic = _batches(DaliLoader(table, _cfg("dali"), 40, False))
        assert torch.equal(idx, ic) and torch.equal(m.cpu(), mc)
