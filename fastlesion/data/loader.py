"""One loader interface over the backends (``dali``, ``torch``); the engine and benchmarks use only this.

Contract of every loader:

* ``for images, labels, idx in loader`` — images ``float [N, 3, H, W]`` (normalised, channels_last memory format
  when asked) and labels ``int64 [N]`` on the training device; ``idx`` are row indices into the table given, so
  evaluation can match predictions to rows and count each sample exactly once;
* ``len(loader)`` — steps per epoch, known up front, equal on every DDP rank for training;
* ``loader.set_epoch(e)`` — new shuffle / oversampled order for epoch ``e``;
* ``loader.num_samples`` — samples this rank sees per epoch; ``loader.backend`` and ``loader.device_name``.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import warnings
from typing import Protocol

import pandas as pd
import torch

from fastlesion.config import LoaderConfig

log = logging.getLogger(__name__)


class Loader(Protocol):
    backend: str
    device_name: str
    num_samples: int

    def __iter__(self): ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


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
