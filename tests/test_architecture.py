"""The shape of the code (issue 9): one config path, one model wrapper, one loader contract, data prepared once,
a run folder object that owns every file, metric names defined once."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fastlesion.config import Config, ConfigError, changed_keys, load_config, lookup, replace
from fastlesion.data.loader import Loader, ShardedLoader
from fastlesion.engine.runtime import Runtime, wrap_model

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None


# --------------------------------------------------------------------------------------------------- config
def test_replace_is_typed_checked_and_leaves_the_original():
    base = Config()
    new = replace(base, {"optim.lr": "3e-4", "loader.scale": "0.5,1"}, **{"data.fold": 2})
    assert new.optim.lr == 3e-4 and new.loader.scale == (0.5, 1.0) and new.data.fold == 2
    assert base.optim.lr == 1e-3 and base.data.fold == 0  # a copy, never a change in place
    assert replace(base, ["model.name=resnet50"]).model.name == "resnet50"
    assert changed_keys(base, new) == ["data.fold", "loader.scale", "optim.lr"]
    assert lookup(new, "optim.lr") == 3e-4
    with pytest.raises(ConfigError, match="unknown config key 'optim.nope'"):
        replace(base, **{"optim.nope": 1})
    with pytest.raises(ConfigError, match="data.fold must be in 0..4"):  # the section's checks run again
        replace(base, **{"data.fold": 7})
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        replace(base, **{"optim.lr": "fast"})
    # one section changed together: the checks see both new values at once
    assert replace(base, **{"data.num_folds": 10, "data.fold": 7}).data.fold == 7


def test_load_config_is_replace_on_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\nmodel:\n  name: lenet\n")
    cfg = load_config(f, ["optim.lr=0.02"])
    assert cfg == replace(replace(Config(), **{"optim.lr": 0.01, "model.name": "lenet"}), **{"optim.lr": 0.02})


def test_metric_names_have_one_definition():
    from fastlesion.config import EARLY_STOP_METRICS
    from fastlesion.engine.rundir import metric_columns
    from fastlesion.engine.train import METRIC_COLUMNS
    from fastlesion.metrics import METRIC_KEYS, SEG_METRIC_KEYS, SEG_VAL_METRICS, VAL_METRICS, classification_metrics
    from fastlesion.segment.metrics import segmentation_metrics

    assert VAL_METRICS == tuple(f"val_{k}" for k in METRIC_KEYS)
    assert SEG_VAL_METRICS == tuple(f"val_{k}" for k in SEG_METRIC_KEYS)
    assert set(EARLY_STOP_METRICS) == {"val_loss", *VAL_METRICS, *SEG_VAL_METRICS}
    assert metric_columns("segmentation")[3:3 + len(SEG_VAL_METRICS)] == list(SEG_VAL_METRICS)
    stats = {k: np.array([3.0, 0.0]) for k in ("tp", "fp", "fn", "tn")}
    assert [k for k in segmentation_metrics(stats) if k != "n"] == list(SEG_METRIC_KEYS)
    assert METRIC_COLUMNS[3:3 + len(VAL_METRICS)] == list(VAL_METRICS)
    m = classification_metrics(np.array([0, 1, 0, 1]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]]))
    assert [k for k in m if k not in ("confusion", "n")] == list(METRIC_KEYS)


# --------------------------------------------------------------------------------------------------- model wrapper
def _rt(**kw) -> Runtime:
    base = {"device": torch.device("cpu"), "amp_dtype": None, "compile": False, "compile_mode": None,
            "channels_last": False}
    base.update(kw)
    return Runtime(**base)


def test_wrap_model_views_share_the_raw_module():
    raw = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    w = wrap_model(raw, _rt(channels_last=True))
    assert w.raw is raw and w.model is raw and w.eval_model is raw
    assert raw[0].weight.is_contiguous(memory_format=torch.channels_last)
    compiled = wrap_model(nn.Linear(3, 2), _rt(compile=True))
    assert compiled.raw is compiled.model._orig_mod and compiled.eval_model is compiled.model


def test_training_inference_and_benchmarks_use_the_one_wrapper():
    """No other place moves a model to a device or compiles it: the wrapper order is written once."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for rel in ("fastlesion/engine/train.py", "fastlesion/engine/inference.py", "benchmarks/common.py"):
        text = (root / rel).read_text()
        assert "wrap_model(" in text, rel
        assert "torch.compile(" not in text and "DistributedDataParallel(" not in text, rel


# --------------------------------------------------------------------------------------------------- data once
def test_dataset_is_prepared_once_per_process(tiny_isic, tmp_path, monkeypatch):
    import fastlesion.engine.train as train_mod

    calls = []
    real = train_mod.load_dataset

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "load_dataset", counting)
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic), "data.image_size": 32,
                             "model.name": "lenet", "loader.backend": "torch", "loader.workers": 0,
                             "train.epochs": 1, "run.out": str(tmp_path / "r"), "run.quiet": True,
                             "data.folds_file": str(tmp_path / "folds.csv")})
    train_mod.train(cfg)
    assert len(calls) == 1
    # a --ddp worker gets the launcher's data and loads nothing itself
    data = train_mod.prepare_data(cfg)
    monkeypatch.setattr(train_mod, "load_dataset", lambda *a, **k: pytest.fail("a worker must not load the data"))
    summary = train_mod.run_worker(replace(cfg, **{"run.out": str(tmp_path / "w")}), data)
    assert summary["n_train"] == len(data.split.train)


# --------------------------------------------------------------------------------------------------- run folder
def test_an_inactive_run_folder_writes_and_prints_nothing(tiny_isic, tmp_path, capsys):
    from fastlesion.engine.rundir import RunDir

    run = RunDir(tmp_path / "r", active=False, report=lambda *a: pytest.fail("no report on other ranks"))
    run.log("hello")
    assert run.finish(None, False, 1.0) == {}  # never touches the session
    run.record(None, {}, {}, None, True)
    run.start(None, resumed=False)
    assert not (tmp_path / "r").exists() and capsys.readouterr().out == ""


def test_train_py_writes_no_files():
    """engine/train.py holds the loop; every file is written by engine/rundir.py."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "fastlesion/engine/train.py").read_text()
    for call in ("save_atomic", ".write_text(", "to_csv(", "save_config(", "open("):
        assert call not in text, call


# --------------------------------------------------------------------------------------------------- loaders
def _table(tiny_isic) -> pd.DataFrame:
    from fastlesion.data.catalog import load_dataset

    return load_dataset(load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic)}).data).table


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not HAS_DALI, reason="DALI not installed"))])
def test_both_backends_keep_the_whole_contract(tiny_isic, backend):
    from fastlesion.data.loader import build_loader

    table = _table(tiny_isic).iloc[:23].reset_index(drop=True)
    cfg = load_config(None, {"loader.backend": backend, "loader.workers": 0 if backend == "torch" else 1,
                             "loader.batch_size": 4, "loader.oversample": True}).loader
    for train in (True, False):
        for world in (1, 3):
            for rank in range(world):
                ld = build_loader(table, cfg, 32, train=train, rank=rank, world_size=world)
                ref = ShardedLoader(table, cfg, train, rank=rank, world_size=world)
                assert isinstance(ld, Loader) and isinstance(ld, ShardedLoader)
                assert ld.backend == backend and ld.device_name == "cpu"
                assert (ld.num_samples, ld.batch_size, ld.drop_last, len(ld)) == \
                       (ref.num_samples, ref.batch_size, ref.drop_last, len(ref))
                assert ld.num_classes == 2 and np.array_equal(ld.labels, table["label"].to_numpy())
                ld.set_epoch(2)
                ref.draw_order(2)
                assert np.allclose(ld.effective_class_ratio, ref.effective_class_ratio)
                if not train:  # evaluation shares are contiguous in both backends
                    rows = [i for _, _, idx in ld for i in idx.tolist()]
                    assert rows == ref.shard(np.arange(len(table))).tolist()


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dali_graph_gets_run_time_settings_at_build(tiny_isic):
    from fastlesion.config import LoaderConfig
    from fastlesion.data.dali import build_pipeline

    files = _table(tiny_isic)["path"].tolist()[:6]
    cfg = dataclasses.replace(LoaderConfig(), workers=2, prefetch=3)
    pipe = build_pipeline(files, list(range(6)), cfg, 32, train=True, batch_size=3, seed=11)
    assert (pipe.max_batch_size, pipe.num_threads, pipe.device_id, pipe.seed) == (3, 2, None, 11)
    pipe.build()
    images, rows = pipe.run()
    assert images.as_tensor().shape() == [3, 3, 32, 32] and sorted(np.array(rows.as_tensor()).ravel()) == [0, 1, 2]
