"""Patient-grouped, stratified splits written to a folds file that later runs reuse unchanged.

A folds file is a CSV with one row per image: ``key`` (the image path relative to the data root), ``group``,
``label`` and ``fold`` (``0 .. K-1``; ``-1`` marks the grouped holdout test split). One group never appears in two
folds (scikit-learn ``StratifiedGroupKFold``), and each fold's class mix stays close to the whole. The split is
stratified on the training label, so with ``data.class_map`` on the mapped one: the default file name then carries
the mapping's digest (``folds_k5_s42_m<8 hex>.csv``), and a folds file whose labels differ from the dataset's is
refused rather than reused.

A table with an ``official_split`` column (the isic2018-seg kind: ``train``, ``validation``, ``test``, the parts of
the ISIC 2018 download) keeps the dataset's own split: only its ``train`` rows are cut into folds, every other row
goes to the holdout test split (``fold = -1``; ``data.holdout`` then holds out train groups on top). A one-class
table (segmentation: every label 0) is split like any other: grouped k-fold, the stratification a no-op.

``data.extra_train`` sets join the training table of a split (:func:`add_extra_train`), after the split: they are
never in the folds file, the validation fold or the holdout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from fastlesion import locks
from fastlesion.config import DataConfig
from fastlesion.data.catalog import Dataset, cache_dir, load_extra_train
from fastlesion.errors import DatasetError

log = logging.getLogger(__name__)
HOLDOUT = -1


@dataclass
class Split:
    """Train / validation / (optional) holdout test tables for one fold."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    folds_file: Path


def assign_folds(labels: np.ndarray, groups: np.ndarray, num_folds: int, seed: int, holdout: float = 0.0) -> np.ndarray:
    """Fold index per sample (``-1`` = holdout test), stratified by label and grouped by group.

    Args:
        labels: integer class per sample.
        groups: group id per sample; all samples of a group land in the same fold.
        num_folds: K of the k-fold.
        seed: shuffling seed (the split is a pure function of its inputs and the seed).
        holdout: fraction of groups held out first as a test split (0 = none).
    """
    n_groups = len(np.unique(groups))
    folds = np.full(len(labels), HOLDOUT, dtype=np.int64)
    idx = np.arange(len(labels))
    if holdout > 0:
        n_splits = max(2, round(1 / holdout))
        if n_groups < n_splits + num_folds:
            raise DatasetError(f"too few groups ({n_groups}) for data.holdout={holdout:g} and "
                               f"data.num_folds={num_folds}: need at least {n_splits + num_folds}; lower "
                               "data.num_folds or data.holdout")
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        keep, _ = next(sgkf.split(idx, labels, groups))
        idx = np.sort(keep)
    if len(np.unique(groups[idx])) < num_folds:
        raise DatasetError(f"too few groups ({len(np.unique(groups[idx]))}) for data.num_folds={num_folds}: each fold "
                           "needs at least one group (patient/lesion); lower data.num_folds")
    sgkf = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(sgkf.split(idx, labels[idx], groups[idx])):
        folds[idx[val]] = k
    return folds


def class_map_digest(mapping: dict[str, str] | None) -> str | None:
    """8 hex digits naming a ``data.class_map`` (its order counts: it fixes the class indices); None without one."""
    if not mapping:
        return None
    return hashlib.sha1(json.dumps(list(mapping.items())).encode()).hexdigest()[:8]


def default_folds_file(ds: Dataset, cfg: DataConfig) -> Path:
    """``<root>/folds_k5_s42.csv`` (``_h0.2`` appended with a holdout, ``_m<digest>`` with a ``data.class_map``), or
    the cache when the root is read-only."""
    digest = class_map_digest(cfg.class_map)
    name = (f"folds_k{cfg.num_folds}_s{cfg.split_seed}" + (f"_h{cfg.holdout:g}" if cfg.holdout else "")
            + (f"_m{digest}" if digest else "") + ".csv")
    if os.access(ds.root, os.W_OK):
        return ds.root / name
    digest = hashlib.sha1(str(ds.root).encode()).hexdigest()[:10]
    return cache_dir() / "folds" / f"{ds.root.name}-{digest}" / name


def _keys(ds: Dataset) -> pd.Series:
    return ds.table["path"].map(lambda p: os.path.relpath(p, ds.root))


def make_folds_table(ds: Dataset, cfg: DataConfig) -> pd.DataFrame:
    """The folds file's table: ``key``, ``group``, ``label``, ``fold`` (rows of an ``official_split`` other than
    ``train`` are holdout)."""
    labels, groups = ds.table["label"].to_numpy(), ds.table["group"].to_numpy()
    train = np.ones(len(labels), dtype=bool)
    if "official_split" in ds.table.columns:
        train = (ds.table["official_split"].astype(str) == "train").to_numpy()
    folds = np.full(len(labels), HOLDOUT, dtype=np.int64)
    folds[train] = assign_folds(labels[train], groups[train], cfg.num_folds, cfg.split_seed, cfg.holdout)
    return pd.DataFrame({"key": _keys(ds), "group": ds.table["group"].values,
                         "label": ds.table["label"].values, "fold": folds})


def _read_folds(path: Path, ds: Dataset, cfg: DataConfig) -> pd.DataFrame:
    """A folds file, checked to cover every image of ``ds`` with ``cfg.num_folds`` folds."""
    folds = pd.read_csv(path, dtype={"key": str, "group": str})
    if not {"key", "fold"} <= set(folds.columns):
        raise DatasetError(f"{path}: a folds file needs the columns 'key' and 'fold'")
    unknown = set(_keys(ds)) - set(folds["key"])
    if unknown:
        raise DatasetError(f"{path}: {len(unknown)} image(s) of the dataset are not in this folds file "
                           f"(first: {sorted(unknown)[0]}); delete it or set data.folds_file to make a new one")
    n_folds = int(folds["fold"].max()) + 1
    if n_folds != cfg.num_folds:
        raise DatasetError(f"{path}: has {n_folds} folds but data.num_folds is {cfg.num_folds}")
    if "label" in folds.columns:  # stratified on other labels (another data.class_map): its folds do not fit
        keys = _keys(ds)
        saved = keys.map(dict(zip(folds["key"], folds["label"].astype(str)))).to_numpy()
        differ = saved != ds.table["label"].astype(str).to_numpy()
        if differ.any():
            i = int(differ.argmax())
            raise DatasetError(f"{path}: made with other labels than this dataset's ({int(differ.sum())} image(s) "
                               f"differ, first: {keys.iloc[i]} has label {saved[i]} there, {ds.table['label'].iloc[i]} "
                               "here: another data.class_map?); delete it or set data.folds_file to make a new one")
    return folds


def _write_atomic(folds: pd.DataFrame, path: Path) -> None:
    """A temp file of this process's own (never another's) beside ``path``, renamed over it when whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", newline="") as f:  # "x": created here, with the usual permissions (not mkstemp's 0600)
            folds.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_or_make_folds(ds: Dataset, cfg: DataConfig) -> tuple[pd.DataFrame, Path]:
    """Read the folds file if it exists (and covers this table), else make it and write it.

    Concurrent runs (Ray trials, several ``fastlesion train`` at once) share the file: the first to take its lock
    (``<folds>.lock``) writes it, through a temp file and an atomic rename; the others wait and then read that one.
    """
    path = Path(cfg.folds_file) if cfg.folds_file else default_folds_file(ds, cfg)
    if path.is_file():
        return _read_folds(path, ds, cfg), path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locks.locked(path.with_name(path.name + ".lock")):
            if path.is_file():  # another process wrote it while this one waited
                return _read_folds(path, ds, cfg), path
            folds = make_folds_table(ds, cfg)
            _write_atomic(folds, path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot write the folds file ({e.strerror or e}); set data.folds_file to a "
                           "writable place") from None
    log.info("wrote folds file %s", path)
    return folds, path


def split_dataset(ds: Dataset, cfg: DataConfig, fold: int | None = None) -> Split:
    """Train/val/test tables for ``fold`` (default ``cfg.fold``), from the reusable folds file."""
    fold = cfg.fold if fold is None else fold
    folds, path = load_or_make_folds(ds, cfg)
    fold_of = dict(zip(folds["key"], folds["fold"]))
    f = _keys(ds).map(fold_of).to_numpy()
    t = ds.table
    split = Split(train=t[(f != fold) & (f != HOLDOUT)].reset_index(drop=True),
                  val=t[f == fold].reset_index(drop=True),
                  test=t[f == HOLDOUT].reset_index(drop=True), folds_file=path)
    for name in ("train", "val"):
        part = getattr(split, name)
        if len(part) == 0:
            raise DatasetError(f"{path}: fold {fold} leaves the {name} split empty")
    return split


def add_extra_train(split: Split, ds: Dataset, cfg: DataConfig) -> Split:
    """``split`` with the ``data.extra_train`` sets (labelled with ``ds``'s classes) appended to its training table
    only; validation, holdout and the folds file are untouched. ``split`` itself when there are none."""
    if not cfg.extra_train:
        return split
    extra = load_extra_train(ds, cfg)
    log.info("data.extra_train: %d extra training image(s) from %d set(s)", len(extra), len(cfg.extra_train))
    train = pd.concat([split.train, extra], ignore_index=True)
    return Split(train=train, val=split.val, test=split.test, folds_file=split.folds_file)
