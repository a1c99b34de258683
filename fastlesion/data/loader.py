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

Segmentation: a table with a ``mask`` column (the path of each image's binary mask) makes a segmentation loader
(``loader.task == "segmentation"``, the same for both backends): ``for images, masks, idx in loader`` with images as
above and ``masks`` float32 ``[N, 1, H, W]`` in {0, 1}, contiguous, on the training device. Training crops, resizes
(mask: nearest neighbour), flips and rotates (mask: nearest, zero fill) image and mask with one draw; colour jitter
touches the image only. Evaluation squashes the whole image to ``image_size`` square (no center crop: every mask
pixel is scored). A mask of another size than its image is first resized to the image's size (nearest neighbour).
Sharding, exactly-once evaluation and the limits below carry over; ``loader.oversample`` has no effect (one class).

Limits (:class:`ShardedLoader`, before any pipeline or DataLoader exists, the same for both backends): a batch
larger than this process's shard is clamped to the shard (one warning naming the key; a derived eval batch, i.e.
``eval_batch_size`` None, silently); ``loader.workers`` above :data:`WORKERS_PER_CORE` x the usable CPU cores and
``loader.prefetch`` above :data:`MAX_PREFETCH` are clamped with one warning each; ``data.image_size`` above
:data:`MAX_IMAGE_SIZE` and batches whose prefetched outputs alone would not fit in the decoding device's memory
are refused with a :class:`~fastlesion.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from fastlesion.config import LoaderConfig
from fastlesion.data import sampling
from fastlesion.data.transforms import rotates_or_jitters
from fastlesion.errors import ConfigError

log = logging.getLogger(__name__)

WORKERS_PER_CORE = 4
"""``loader.workers`` is clamped to this many DALI threads / DataLoader processes per usable CPU core."""
MAX_PREFETCH = 16
"""``loader.prefetch`` (DALI queue depth / DataLoader prefetch factor) is clamped to this."""
MAX_IMAGE_SIZE = 4096
"""Largest ``data.image_size`` accepted (one 4096 px image is 201 MB as float32)."""


@functools.cache
def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


_limit_warnings: set[str] = set()
"""Limit warnings already given by this process (each is given once)."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@runtime_checkable
class Loader(Protocol):
    """What the engine, the benchmarks and the tests use of a loader (see the module docstring)."""

    backend: str
    device_name: str
    task: str
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

    ``task`` is ``segmentation`` when the table has a ``mask`` column (``mask_paths`` its values), else
    ``classification``.

    Training: every rank sees ``ceil(n / world_size)`` samples of the epoch's order (padded by wrapping around, so
    all ranks take the same number of steps); evaluation: the contiguous :func:`~fastlesion.data.sampling.eval_share`,
    unpadded, so each row is evaluated exactly once over all ranks.

    The limits of the module docstring are applied here, before a backend builds anything: ``batch_size`` is the
    clamped batch, ``workers`` and ``prefetch`` the clamped ``cfg.workers`` / ``cfg.prefetch`` that the backends
    use (never the raw config values).
    """

    backend = ""
    device_name = "cpu"

    def __init__(self, table: pd.DataFrame, cfg: LoaderConfig, train: bool, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 image_size: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.image_size = image_size
        self.task = "segmentation" if "mask" in table.columns else "classification"
        self.mask_paths: list[str] | None = table["mask"].astype(str).tolist() if "mask" in table.columns else None
        self.labels = table["label"].to_numpy().astype(np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        n = len(self.labels)
        self.num_samples = -(-n // world_size) if train else len(sampling.eval_share(n, rank, world_size))
        self._check_image_size()
        self.batch_size = self._clamped_batch_size()
        self.workers = self._clamped(cfg.resolved_workers(), WORKERS_PER_CORE * usable_cpus(), "loader.workers",
                                     f"{WORKERS_PER_CORE} x the {usable_cpus()} CPU core(s) this process may use")
        if cfg.prefetch < 1:
            raise ConfigError(f"loader.prefetch must be >= 1, got {cfg.prefetch}")
        self.prefetch = self._clamped(cfg.prefetch, MAX_PREFETCH, "loader.prefetch",
                                      f"the maximum of {MAX_PREFETCH} batches")
        self.drop_last = train and self.num_samples >= self.batch_size
        if train and cfg.oversample and self.task == "segmentation":
            self._warn("loader.oversample has no effect on a segmentation table (one class): ignored")
        self._check_memory()
        self.epoch = 0
        self.effective_class_ratio = sampling.class_ratio(self.labels, np.arange(n), self.num_classes)

    # ------------------------------------------------------------------------------------------------- limits
    def _warn(self, msg: str) -> None:
        """One warning line, from rank 0 only (every rank takes the same decision), once per process (the
        training and the evaluation loader share ``workers`` and ``prefetch``)."""
        if self.rank == 0 and msg not in _limit_warnings:
            _limit_warnings.add(msg)
            log.warning("%s", msg)

    def _check_image_size(self) -> None:
        size = self.image_size
        if size is not None and size > MAX_IMAGE_SIZE:
            raise ConfigError(f"data.image_size {size} is above the maximum of {MAX_IMAGE_SIZE} px (one {size} px "
                              f"image is {_gib(3 * size * size * 4)} as float32); use a model input size such as "
                              f"224, 384 or 512")

    def _clamped_batch_size(self) -> int:
        """The configured batch size, clamped to this process's shard: a larger batch only costs memory (the
        whole shard is one batch either way). Warns when the value was given; a derived eval batch (``None`` =
        2 x batch_size) is clamped silently."""
        cfg, shard = self.cfg, self.num_samples
        if self.train:
            key, value, given = "loader.batch_size", cfg.batch_size, True
        else:
            given = cfg.eval_batch_size is not None
            key, value = "loader.eval_batch_size", cfg.eval_batch_size if given else 2 * cfg.batch_size
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
        if value <= max(shard, 1):
            return value
        if given:
            kind = "training" if self.train else "evaluation"
            self._warn(f"{key} {value} is larger than this process's {kind} shard ({shard} images): using {shard}")
        return max(shard, 1)

    def _clamped(self, value: int, limit: int, key: str, what: str) -> int:
        if value <= limit:
            return value
        self._warn(f"{key} {value} is more than {what}: using {limit}")
        return limit

    def held_batches(self) -> int:
        """Output batches the backend may hold at once (queue, prefetch, the batch in use): DALI's default."""
        return self.prefetch + 2

    def value_bytes(self) -> int:
        """Bytes per output value (float32 by default)."""
        return 4

    def _check_memory(self) -> None:
        """Refuse a batch whose held outputs alone exceed the memory of the device that decodes them."""
        if self.image_size is None:
            return
        budget, where = physical_memory(), "this machine's memory"
        if self.device_name == "gpu" and torch.cuda.is_available():
            index = self.device.index if self.device.type == "cuda" and self.device.index is not None else None
            budget = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)\
                .total_memory
            where = "the GPU's memory"
        if not budget:
            return
        batch = self.batch_size * 3 * self.image_size**2 * self.value_bytes()
        if self.task == "segmentation":
            batch += self.batch_size * self.image_size**2 * 4  # the float32 masks
        held = self.held_batches()
        if batch * held > budget:
            key = "loader.batch_size" if self.train else "loader.eval_batch_size"
            raise ConfigError(f"{key} {self.batch_size} at data.image_size {self.image_size}: one batch is "
                              f"{_gib(batch)} and the {self.backend} loader holds up to {held} "
                              f"({_gib(batch * held)}), more than {where} ({_gib(budget)}); lower {key} "
                              f"(or loader.prefetch / loader.workers)")

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def draw_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the whole table, the same on every rank: a seeded shuffle (resampled when
        oversampling) for training, the table order for evaluation. Updates ``effective_class_ratio``."""
        oversample = self.train and self.cfg.oversample and self.task == "classification"
        power = self.cfg.oversample_power if oversample else None
        order = sampling.epoch_order(self.labels, epoch, self.cfg.seed, shuffle=self.train, oversample_power=power)
        self.effective_class_ratio = sampling.class_ratio(self.labels, order, self.num_classes)
        return order

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's rows of ``order``: its padded share (training) or its contiguous share (evaluation)."""
        if self.train:
            return sampling.shard(order, self.rank, self.world_size, pad=True)
        return order[sampling.eval_share(len(order), self.rank, self.world_size)]


_warned = False

DCT_AUTO_SIDE = 5.0
"""``loader.backend=auto`` without CUDA picks the torch loader with DCT-scaled decoding when the median image's
shorter side is at least this many times ``data.image_size`` (1120 px at 224), else DALI on CPU threads (unless a
classification run augments with crops and flips only: torch then, :func:`choose_backend`). Measured on 2 cores at
224 px with the default augmentation (README, Benchmarks): DALI was 1.12x the DCT-scaled torch loader on 1200x900
JPEGs (shorter side 4.0x), the torch loader 1.06x DALI on 1600x1200 (5.4x) and 2.0x on the ISIC-sized 3024x2016
set; on 600x450 DALI leads by 1.39x. With crops and flips only the torch loader led on 600x450 (1.08x) and
1200x900 (1.09x)."""
HEADER_SAMPLE = 64
"""Images whose header ``auto`` reads (spread over the table) for the median size."""
_said: set[str] = set()


def dali_available() -> bool:
    """DALI is importable on this platform (Linux x86_64 / aarch64 only)."""
    return platform.system() == "Linux" and importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(cfg: LoaderConfig) -> str:
    """``dali`` or ``torch`` without looking at the data: ``auto`` -> ``dali`` when installed, else ``torch``;
    ``auto`` or ``dali`` without DALI (or on an unsupported platform) warns once per process and falls back to
    ``torch``. :func:`choose_backend` refines ``auto`` by the device and the images."""
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


def median_image_size(paths: list[str], sample: int = HEADER_SAMPLE) -> tuple[int, int] | None:
    """Median ``(width, height)`` of up to ``sample`` images spread over ``paths``, read from their headers (PIL
    decodes no pixels for this; EXIF orientation ignored); None when none can be read."""
    from PIL import Image

    if len(paths) > sample:
        paths = [paths[i * len(paths) // sample] for i in range(sample)]
    sizes = []
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except Exception:  # noqa: BLE001 - an unreadable file is the loader's error to report, not auto's
            continue
    if not sizes:
        return None
    return int(np.median([w for w, _ in sizes])), int(np.median([h for _, h in sizes]))


def choose_backend(cfg: LoaderConfig, table: pd.DataFrame, image_size: int | None) -> tuple[str, str | None]:
    """The backend to build, and for ``auto`` the one line that says which and why.

    ``auto``: DALI decoding on the GPU (nvJPEG, ``mixed``) when DALI decodes there (``loader.device`` resolves to
    gpu); on CPU the torch loader with DCT-scaled decoding (``loader.dct_scaling`` on) when the median image
    (:func:`median_image_size`) has a shorter side of at least :data:`DCT_AUTO_SIDE` x ``image_size``, or when a
    classification table is augmented with crops and flips only (no rotation, no colour jitter: DALI's CPU
    strength is its fused augmentation; without it the torch loader's libjpeg-turbo decode and uint8 resize were
    faster, README, Benchmarks), else DALI on CPU threads; torch wherever DALI is missing (:func:`resolve_backend`
    warns). ``dali`` / ``torch`` as asked.
    """
    if cfg.backend != "auto":
        return resolve_backend(cfg), None
    if resolve_dali_device(cfg) == "gpu" and dali_available():
        return "dali", "loader: auto -> dali, decoding on the GPU (nvJPEG, CUDA)"
    size = median_image_size(table["path"].astype(str).tolist()) if "path" in table.columns else None
    seen = f"median image {size[0]}x{size[1]} px, CPU" if size else "image sizes unknown, CPU"
    if cfg.dct_scaling and size and image_size and min(size) >= DCT_AUTO_SIDE * image_size:
        return "torch", f"loader: auto -> torch with DCT-scaled decoding ({seen})"
    if cfg.dct_scaling and "mask" not in table.columns and not rotates_or_jitters(cfg):
        return "torch", f"loader: auto -> torch with DCT-scaled decoding ({seen}; crops and flips only)"
    backend = resolve_backend(cfg)
    if backend == "dali":
        return "dali", f"loader: auto -> dali on CPU threads ({seen})"
    how = "with DCT-scaled decoding" if cfg.dct_scaling else "with full decoding"
    return "torch", f"loader: auto -> torch {how} ({seen}; DALI not installed)"


def build_loader(table: pd.DataFrame, cfg: LoaderConfig, image_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = False) -> Loader:
    """The loader of the configured backend over ``table`` (a catalog table or one of its splits).

    A ``mask`` column in ``table`` makes it a segmentation loader yielding ``(images, masks, idx)`` (see the module
    docstring); both backends read the column themselves, so a backend built directly behaves the same.
    ``loader.backend=auto`` is resolved by :func:`choose_backend`, whose line rank 0 prints once per process."""
    backend, line = choose_backend(cfg, table, image_size)
    if line and rank == 0 and line not in _said:
        _said.add(line)
        print(line, flush=True)
    if backend == "dali":
        from fastlesion.data.dali import DaliLoader

        return DaliLoader(table, cfg, image_size, train, rank=rank, world_size=world_size, device=device,
                          channels_last=channels_last, dali_device=resolve_dali_device(cfg))
    from fastlesion.data.torch_loader import TorchLoader

    return TorchLoader(table, cfg, image_size, train, rank=rank, world_size=world_size, device=device,
                       channels_last=channels_last)
