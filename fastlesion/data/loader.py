"""One loader interface over the backends (``dali``, ``torch``); the engine and benchmarks use only this.

The contract (:class:`Loader`) names everything the engine uses; both backends inherit the bookkeeping behind it
(labels, batch size, this rank's share, ``drop_last``, length, epoch orders) from :class:`ShardedLoader`, so they
differ only in how a batch is decoded:

* ``for images, labels, idx in loader`` — images ``float [N, 3, H, W]`` (normalised, channels_last memory format
  when asked) and labels ``int64 [N]`` on the training device; ``idx`` are row indices into the table given, so
  evaluation can match predictions to rows and count each sample exactly once;
* ``len(loader)`` — steps per epoch, known up front, equal on every DDP rank for training;
* ``loader.set_epoch(e)`` — new shuffle / oversampled order for epoch ``e`` (the same on every rank);
* ``loader.labels`` / ``loader.num_classes`` — the table's labels (the loss's class weights come from them);
* ``loader.effective_class_ratio`` — each class's share of the current epoch's order (after oversampling);
* ``loader.num_samples``, ``loader.batch_size``, ``loader.drop_last``; ``loader.backend`` (``dali`` | ``torch``)
  and ``loader.device_name`` (where images are decoded: ``cpu`` | ``gpu``).
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from fastlesion.config import LoaderConfig
from fastlesion.data import sampling

log = logging.getLogger(__name__)


@runtime_checkable
class Loader(Protocol):
    """What the engine, the benchmarks and the tests use of a loader (see the module docstring)."""

    backend: str
    device_name: str
    labels: np.ndarray
    num_classes: int
    num_samples: int
    batch_size: int
    drop_last: bool
    effective_class_ratio: np.ndarray

    def __iter__(self): ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class ShardedLoader:
    """The bookkeeping both backends share: labels, batch size, this rank's share, ``drop_last``, length, orders.

    Training: every rank sees ``ceil(n / world_size)`` samples of the epoch's order (padded by wrapping around, so
    all ranks take the same number of steps); evaluation: the contiguous :func:`~fastlesion.data.sampling.eval_share`,
    unpadded, so each row is evaluated exactly once over all ranks.
    """

    backend = ""
    device_name = "cpu"

    def __init__(self, table: pd.DataFrame, cfg: LoaderConfig, train: bool, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.labels = table["label"].to_numpy().astype(np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.batch_size = cfg.batch_size if train else (cfg.eval_batch_size or 2 * cfg.batch_size)
        n = len(self.labels)
        self.num_samples = -(-n // world_size) if train else len(sampling.eval_share(n, rank, world_size))
        self.drop_last = train and self.num_samples >= self.batch_size
        self.epoch = 0
        self.effective_class_ratio = sampling.class_ratio(self.labels, np.arange(n), self.num_classes)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def draw_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the whole table, the same on every rank: a seeded shuffle (resampled when
        oversampling) for training, the table order for evaluation. Updates ``effective_class_ratio``."""
        power = self.cfg.oversample_power if self.train and self.cfg.oversample else None
        order = sampling.epoch_order(self.labels, epoch, self.cfg.seed, shuffle=self.train, oversample_power=power)
        self.effective_class_ratio = sampling.class_ratio(self.labels, order, self.num_classes)
        return order

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's rows of ``order``: its padded share (training) or its contiguous share (evaluation)."""
        if self.train:
            return sampling.shard(order, self.rank, self.world_size, pad=True)
        return order[sampling.eval_share(len(order), self.rank, self.world_size)]


_warned = False


def dali_available() -> bool:
    """DALI is importable on this platform (Linux x86_64 / aarch64 only)."""
    return platform.system() == "Linux" and importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(cfg: LoaderConfig) -> str:
    """``auto`` -> ``dali`` when installed, else ``torch``; ``auto`` or ``dali`` without DALI (or on an unsupported
    platform) warns once per process and falls back to ``torch``."""
    global _warned
    if cfg.backend == "torch":
        return "torch"
    if dali_available():
        return "dali"
    if not _warned:
        warnings.warn("NVIDIA DALI is not installed (or this platform is unsupported): using the torch loader. "
                      "Install it with `pip install nvidia-dali-cuda120` on Linux x86_64.", stacklevel=2)
        _warned = True
    return "torch"


def resolve_dali_device(cfg: LoaderConfig) -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``."""
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.device


def build_loader(table: pd.DataFrame, cfg: LoaderConfig, image_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = False) -> Loader:
    """The loader of the configured backend over ``table`` (a catalog table or one of its splits)."""
    backend = resolve_backend(cfg)
    if backend == "dali":
        from fastlesion.data.dali import DaliLoader

        return DaliLoader(table, cfg, image_size, train, rank=rank, world_size=world_size, device=device,
                          channels_last=channels_last, dali_device=resolve_dali_device(cfg))
    from fastlesion.data.torch_loader import TorchLoader

    return TorchLoader(table, cfg, image_size, train, rank=rank, world_size=world_size, device=device,
                       channels_last=channels_last)
