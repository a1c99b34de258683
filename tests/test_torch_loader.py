import warnings

import numpy as np
import pytest
import torch

from fastlesion.config import load_config
from fastlesion.data.catalog import load_dataset
from fastlesion.data.loader import build_loader, resolve_backend
from fastlesion.data.torch_loader import TorchLoader
from fastlesion.data.transforms import MEAN, STD


def _setup(tiny_isic, **loader):
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic), "loader.backend": "torch",
                             "loader.workers": 0, "loader.batch_size": 16,
                             **{f"loader.{k}": v for k, v in loader.items()}})
    return cfg, load_dataset(cfg.data).table


def test_train_batches(tiny_isic):
    cfg, table = _setup(tiny_isic)
    loader = build_loader(table, cfg.loader, 32, train=True)
    assert isinstance(loader, TorchLoader) and len(loader) == 80 // 16
    batches = list(loader)
    assert len(batches) == len(loader)
    x, y, idx = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (y.numpy() == table["label"].to_numpy()[idx.numpy()]).all()
    # normalised: roughly zero-centred values, not 0..255
    assert -3 < float(x.mean()) < 3 and float(x.abs().max()) < 1 / min(STD) + 1


def test_eval_exactly_once_sharded_and_channels_last(tiny_isic):
    cfg, table = _setup(tiny_isic, eval_batch_size=7)
    seen = []
    for rank in range(3):
        loader = TorchLoader(table, cfg.loader, 32, train=False, rank=rank, world_size=3, channels_last=True)
        for x, _, idx in loader:
            assert x.is_contiguous(memory_format=torch.channels_last)
            seen += idx.tolist()
    assert sorted(seen) == list(range(len(table)))


def test_determinism_and_epochs(tiny_isic):
    cfg, table = _setup(tiny_isic)
    a = next(iter(TorchLoader(table, cfg.loader, 32, train=True)))
    b = next(iter(TorchLoader(table, cfg.loader, 32, train=True)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    loader = TorchLoader(table, cfg.loader, 32, train=True)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[2], a[2])


def test_oversampling_raises_minority_share(tiny_isic):
    cfg, table = _setup(tiny_isic, oversample=True, oversample_power=1.0)
    loader = TorchLoader(table, cfg.loader, 32, train=True)
    labels = table["label"].to_numpy()
    drawn = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        drawn.append(labels[np.array(loader.sampler.indices)])
        assert loader.effective_class_ratio[1] == pytest.approx(np.mean(drawn[-1]), abs=0.1)  # the reported ratio
    drawn = np.concatenate(drawn)
    assert drawn.mean() > labels.mean() + 0.1

    from fastlesion.engine.train import oversample_line

    line = oversample_line(loader, ["benign", "malignant"])
    assert line.startswith("oversampling: class ratio per epoch benign ")
    assert f"malignant {loader.effective_class_ratio[1]:.2f} (was {labels.mean():.2f})" in line


def test_backend_resolution():
    cfg = load_config(None, {"loader.backend": "torch"})
    assert resolve_backend(cfg.loader) == "torch"
    assert MEAN[0] == 0.485


@pytest.mark.parametrize("backend", ["auto", "dali"])
def test_missing_dali_warns_once_and_uses_torch(tiny_isic, monkeypatch, backend):
    import fastlesion.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)  # no DALI here, or an unsupported platform
    monkeypatch.setattr(loader_mod, "_warned", False)
    cfg, table = _setup(tiny_isic, backend=backend)
    torch_cfg = load_config(None, {"loader.backend": "torch"}).loader
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning, not only the first per call site
        assert resolve_backend(torch_cfg) == "torch"  # torch asked for: nothing to warn about
        assert not caught
        assert [resolve_backend(cfg.loader) for _ in range(3)] == ["torch"] * 3
        assert isinstance(build_loader(table, cfg.loader, 32, train=False), TorchLoader)
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "DALI is not installed" in str(caught[0].message) and "torch loader" in str(caught[0].message)
        other = load_config(None, {"loader.backend": "dali" if backend == "auto" else "auto"}).loader
        assert resolve_backend(other) == "torch"
        assert len(caught) == 1  # once per process, whichever of auto / dali asked first
