"""Epoch orders and DDP shards, shared by every loader backend (pure functions of their inputs).

Training: each epoch draws a new order (a permutation, or with ``oversample`` a weighted draw with replacement
that favours minority classes), pads it to a multiple of ``world_size`` so every rank gets the same number of
samples, then rank ``r`` takes ``order[r::world_size]``.
Evaluation: no shuffle, no padding, rank ``r`` takes ``r::world_size``; every sample is seen exactly once.
"""

from __future__ import annotations

import numpy as np


def class_sample_weights(labels: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-sample draw weights ``(1 / count[label]) ** power`` normalised to sum 1 (power 1 = balanced)."""
    counts = np.bincount(labels)
    w = (1.0 / np.maximum(counts[labels], 1)) ** power
    return w / w.sum()


def epoch_order(labels: np.ndarray, epoch: int, seed: int, shuffle: bool = True,
                oversample_power: float | None = None) -> np.ndarray:
    """Indices to visit in ``epoch``: identical on every rank for the same (seed, epoch)."""
    n = len(labels)
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    if oversample_power:
        return rng.choice(n, size=n, replace=True, p=class_sample_weights(labels, oversample_power))
    return rng.permutation(n)


def shard(order: np.ndarray, rank: int, world_size: int, pad: bool = True) -> np.ndarray:
    """This rank's part of ``order``; with ``pad`` the order is wrapped around so all ranks get equal counts."""
    if world_size <= 1:
        return order
    if pad and len(order) % world_size:
        extra = world_size - len(order) % world_size
        order = np.concatenate([order, order[:extra]])
    return order[rank::world_size]


def eval_share(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rows ``[rank*n/W, (rank+1)*n/W)``: evaluation's contiguous, unpadded share (every row on exactly one rank).

    Contiguous because that is how DALI's reader shards (``shard_id`` of ``num_shards``), so both backends agree.
    """
    return np.arange(rank * n // world_size, (rank + 1) * n // world_size)


def class_ratio(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of each class among ``labels[indices]`` (the effective ratio after oversampling)."""
    return np.bincount(labels[indices], minlength=num_classes) / max(len(indices), 1)
