import numpy as np
import pandas as pd
import pytest

from fastlesion.config import load_config
from fastlesion.data import sampling
from fastlesion.data.catalog import load_dataset
from fastlesion.data.splits import HOLDOUT, assign_folds, split_dataset
from fastlesion.errors import DatasetError


def _synthetic_labels(n_groups=120, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    pos_group = rng.random(n_groups) < 0.15
    labels = (pos_group[groups] & (rng.random(len(groups)) < 0.7)).astype(int)
    return labels, groups


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_no_group_in_two_folds_and_stratified(holdout):
    labels, groups = _synthetic_labels()
    folds = assign_folds(labels, groups, 5, seed=3, holdout=holdout)
    per_group = pd.Series(folds).groupby(groups).nunique()
    assert (per_group == 1).all(), "a group straddles two folds"
    rate = labels.mean()
    for k in range(5):
        fold_rate = labels[folds == k].mean()
        assert abs(fold_rate - rate) < 0.06, (k, fold_rate, rate)
    if holdout:
        frac = (folds == HOLDOUT).mean()
        assert 0.1 < frac < 0.3
    else:
        assert (folds >= 0).all()


def test_folds_are_seeded():
    labels, groups = _synthetic_labels()
    a = assign_folds(labels, groups, 5, seed=1)
    assert (a == assign_folds(labels, groups, 5, seed=1)).all()
    assert (a != assign_folds(labels, groups, 5, seed=2)).any()


def test_folds_file_is_written_and_reused(tiny_isic, tmp_path):
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic), "data.fold": 1,
                             "data.folds_file": str(tmp_path / "folds.csv")})
    ds = load_dataset(cfg.data)
    s1 = split_dataset(ds, cfg.data)
    assert s1.folds_file.is_file()
    assert not set(s1.train["group"]) & set(s1.val["group"])
    assert len(s1.train) + len(s1.val) == len(ds)
    # a later run reuses the file unchanged, even with another split seed
    before = s1.folds_file.read_bytes()
    cfg2 = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic), "data.fold": 1,
                              "data.split_seed": 99, "data.folds_file": str(tmp_path / "folds.csv")})
    s2 = split_dataset(load_dataset(cfg2.data), cfg2.data)
    assert s2.val["path"].tolist() == s1.val["path"].tolist()
    assert s1.folds_file.read_bytes() == before


def test_default_folds_file_in_root(tiny_isic):
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(tiny_isic), "data.holdout": 0.2})
    s = split_dataset(load_dataset(cfg.data), cfg.data)
    assert s.folds_file.parent == tiny_isic and s.folds_file.name == "folds_k5_s42_h0.2.csv"
    assert len(s.test) > 0 and not set(s.test["group"]) & (set(s.train["group"]) | set(s.val["group"]))


def test_too_few_groups():
    with pytest.raises(DatasetError, match="too few groups"):
        assign_folds(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), 5, seed=0)


def test_shards_cover_and_oversampling():
    labels = np.array([0] * 90 + [1] * 10)
    order = sampling.epoch_order(labels, epoch=0, seed=0)
    shards = [sampling.shard(order, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    joined = np.concatenate(shards)
    assert set(joined) == set(range(100)) and len(joined) - 100 == 2  # padding only
    over = sampling.epoch_order(labels, epoch=0, seed=0, oversample_power=1.0)
    ratio = sampling.class_ratio(labels, over, 2)
    assert 0.35 < ratio[1] < 0.65  # balanced draw vs 10 % in the data
    assert (sampling.epoch_order(labels, 1, 0, oversample_power=1.0) != over).any()  # new list each epoch
