"""Fine-tuning: the classifier head found in every model family, body/head learning rates that keep their ratio,
a frozen body that does not move (nor decay) and resumes exactly, early stopping's min_delta, and the search space."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from fastlesion import models as M
from fastlesion.config import load_config
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.optim import create_optimizer, set_lr
from fastlesion.engine.rundir import RunDir
from fastlesion.engine.state import EarlyStop
from fastlesion.engine.train import seed_everything, train
from fastlesion.errors import ConfigError


@pytest.mark.parametrize("name, head", [("lenet", "fc3"), ("resnet18", "fc"), ("efficientnet_b0", "classifier"),
                                        ("tv_resnet18", "fc"), ("tv_mobilenet_v2", "classifier.1")])
def test_split_head_finds_the_classifier(name: str, head: str) -> None:
    model = M.create_model(name, num_classes=3)
    body, head_params = M.split_head(model)
    named = dict(model.named_parameters())
    assert {id(p) for p in head_params} == {id(named[f"{head}.weight"]), id(named[f"{head}.bias"])}
    assert len(body) + len(head_params) == len(list(model.parameters()))


def test_backbone_lr_mult_keeps_the_ratio() -> None:
    cfg = load_config(None, {"optim.backbone_lr_mult": 0.1, "optim.lr": 0.01})
    model = M.create_model("lenet", num_classes=2)
    opt = create_optimizer(model, cfg.optim)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    head_ids = {id(p) for p in M.split_head(model)[1]}
    for lr in (0.01, 3e-4):
        set_lr(opt, lr)
        for g in opt.param_groups:
            is_head = all(id(p) in head_ids for p in g["params"])
            assert g["lr"] == pytest.approx(lr if is_head else lr * 0.1)
    assert len(create_optimizer(model, load_config().optim).param_groups) == 2  # the default: as before


def test_config_ranges() -> None:
    for bad in ({"optim.backbone_lr_mult": 0}, {"optim.backbone_lr_mult": 1.5}, {"model.freeze_epochs": -1},
                {"train.min_delta": -0.1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_config(None, bad)


def _cfg(root, out, folds, **over):
    base = {"data.dataset": "isic2020", "data.root": str(root), "data.image_size": 32, "model.name": "lenet",
            "loader.backend": "torch", "loader.workers": 0, "loader.batch_size": 8, "train.epochs": 3,
            "train.patience": 0, "run.out": str(out), "run.quiet": True, "data.folds_file": str(folds),
            "model.freeze_epochs": 2, "optim.backbone_lr_mult": 0.5, "optim.weight_decay": 0.1}
    base.update(over)
    return load_config(None, base)


def test_frozen_body_does_not_move_then_trains(tiny_isic, tmp_path, monkeypatch) -> None:
    seed_everything(42)  # build_session seeds train.seed (42) before create_model: the run's initial weights
    init = M.create_model("lenet", num_classes=2).state_dict()
    after: dict[int, dict] = {}
    real = RunDir.record

    def keep(self, s, *a, **k):
        after[s.epoch] = {k: v.clone() for k, v in s.net.raw.state_dict().items()}
        body, head = M.split_head(s.net.raw)
        assert s.frozen == (s.epoch <= 2) and all(p.requires_grad == (s.epoch > 2) for p in body)
        assert all(p.requires_grad for p in head)
        real(self, s, *a, **k)

    monkeypatch.setattr(RunDir, "record", keep)
    train(_cfg(tiny_isic, tmp_path / "r", tmp_path / "folds.csv"))
    body = [k for k in init if not k.startswith("fc3.")]
    for epoch in (1, 2):  # weight decay 0.1 and AdamW moments leave the frozen body exactly as it was
        assert all(torch.equal(after[epoch][k], init[k]) for k in body), epoch
        assert not torch.equal(after[epoch]["fc3.weight"], init["fc3.weight"])
    assert not all(torch.equal(after[3][k], init[k]) for k in body)
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert len(m) == 3


@pytest.mark.parametrize("cut", [1, 2])
def test_resume_with_freeze_equals_uninterrupted(tiny_isic, tmp_path, monkeypatch, cut: int) -> None:
    """Cut in the frozen phase (after epoch 1) or at its end (after epoch 2, the next epoch unfreezes)."""
    folds = tmp_path / "folds.csv"
    train(_cfg(tiny_isic, tmp_path / "whole", folds, **{"optim.ema": True}))
    real = RunDir.record

    def interrupt(self, s, *a, **k):
        real(self, s, *a, **k)
        if s.epoch == cut:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "record", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_isic, tmp_path / "cut", folds, **{"optim.ema": True}))
    monkeypatch.setattr(RunDir, "record", real)
    train(_cfg(tiny_isic, tmp_path / "cut", folds, **{"optim.ema": True}), resume=tmp_path / "cut")
    a, b = ckpt.load(tmp_path / "whole" / "last.pt"), ckpt.load(tmp_path / "cut" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    cols = ["epoch", "train_loss", "val_loss", "val_auc", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "metrics.csv")[cols],
                                  pd.read_csv(tmp_path / "cut" / "metrics.csv")[cols])


def test_min_delta() -> None:
    e = EarlyStop("max", patience=2, min_delta=0.01)
    assert e.update(0.5, 1) and not e.update(0.505, 2) and e.bad_epochs == 1
    assert e.update(0.52, 3) and e.best_epoch == 3
    assert not e.update(float("nan"), 4)
    lo = EarlyStop("min", patience=2, min_delta=0.1)
    assert lo.update(1.0, 1) and not lo.update(0.95, 2) and lo.update(0.8, 3)
    plain = EarlyStop("max")  # the default 0: any improvement counts, as before
    assert plain.update(0.5, 1) and plain.update(0.5 + 1e-12, 2) and not plain.update(0.5 + 1e-12, 3)
    nan_first = EarlyStop("max", min_delta=0.5)
    assert nan_first.update(float("nan"), 1) and nan_first.update(0.1, 2) and math.isclose(nan_first.best, 0.1)


def test_search_space_accepts_the_new_keys() -> None:
    from fastlesion.tune.space import check_space, parse_space

    space = parse_space({"model.freeze_epochs": {"choice": [0, 1, 3]},
                         "optim.backbone_lr_mult": {"loguniform": [0.01, 1.0]},
                         "train.min_delta": {"uniform": [0.0, 0.01]},
                         "model.pretrained_strict": {"choice": [True, False]}})
    check_space(space, load_config(None, {"model.name": "resnet18"}))
    with pytest.raises(ConfigError, match="backbone_lr_mult"):
        check_space(parse_space({"optim.backbone_lr_mult": {"uniform": [0.5, 2.0]}}), load_config())
