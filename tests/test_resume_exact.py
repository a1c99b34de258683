"""Resume is exact: a run interrupted after an epoch and resumed ends with the same weights and metrics, bit for
bit, as the same run left alone (RNG, optimizer, scheduler, early stopping and the data order are all restored)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fastlesion.config import load_config
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.rundir import RunDir
from fastlesion.engine.train import train


def _cfg(root, out, folds):
    return load_config(None, {"data.dataset": "isic2020", "data.root": str(root), "data.image_size": 32,
                              "model.name": "lenet", "loader.backend": "torch", "loader.workers": 0,
                              "loader.batch_size": 8, "train.epochs": 3, "train.patience": 0, "optim.ema": True,
                              "run.out": str(out), "run.quiet": True, "data.folds_file": str(folds)})


def test_interrupted_and_resumed_equals_uninterrupted(tiny_isic, tmp_path, monkeypatch):
    folds = tmp_path / "folds.csv"
    train(_cfg(tiny_isic, tmp_path / "whole", folds))

    real = RunDir.record

    def interrupt_after_epoch_2(self, s, *a, **k):
        real(self, s, *a, **k)
        if s.epoch == 2:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) right after epoch 2's files were written

    monkeypatch.setattr(RunDir, "record", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_isic, tmp_path / "cut", folds))
    monkeypatch.setattr(RunDir, "record", real)
    assert ckpt.load(tmp_path / "cut" / "last.pt")["epoch"] == 2
    train(_cfg(tiny_isic, tmp_path / "cut", folds), resume=tmp_path / "cut")

    a, b = ckpt.load(tmp_path / "whole" / "last.pt"), ckpt.load(tmp_path / "cut" / "last.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    cols = ["epoch", "train_loss", "val_loss", "val_auc", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "metrics.csv")[cols],
                                  pd.read_csv(tmp_path / "cut" / "metrics.csv")[cols])
