"""Reference loader: torch DataLoader + torchvision transforms (fallback and benchmark baseline).

Same contract as the DALI loader (:class:`fastlesion.data.loader.Loader`): iterating yields
``(images, labels, idx)`` already on the training device, ``len()`` is the number of steps per epoch, known up front.
An EXIF orientation tag is applied, as cameras, viewers and DALI's decoders do (:func:`open_rgb`).

A table with a ``mask`` column yields ``(images, masks, idx)`` instead (:class:`ImageMaskTable`): each mask is read
as greyscale, binarised at full resolution (:func:`~fastlesion.data.transforms.binarize_mask`), resized to its
image's size with nearest neighbour when the sizes differ, and transformed together with its image by torchvision
v2 (``tv_tensors.Mask``: nearest neighbour, zero fill; colour jitter leaves it alone).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastlesion.config import LoaderConfig
from fastlesion.data.loader import ShardedLoader
from fastlesion.data.transforms import (
    binarize_mask,
    eval_transform,
    seg_eval_transform,
    seg_train_transform,
    train_transform,
)
from fastlesion.errors import DatasetError


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` as RGB, turned upright by its EXIF orientation tag (if any, other than 1).

    DALI's ``fn.decoders.image*`` apply the tag too (``adjust_orientation=True``), so both backends see a photo
    the way a viewer shows it.
    """
    with Image.open(path) as im:
        try:
            orient = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block: decode the pixels as stored
            orient = 1
        if orient != 1:
            im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


class ImageTable(torch.utils.data.Dataset):
    """Images of a catalog table: item ``(i, seed)`` is ``(tensor CHW float, label, i)``.

    Each sample's augmentation is drawn from its own seed (given by the sampler), so a run is reproducible and
    independent of the number of workers.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def _open(path: str) -> Image.Image:
        try:
            return open_rgb(path)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{path}: cannot decode image ({e}); run `fastlesion check` and set "
                               "data.exclude_file") from None

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        img = self._open(self.paths[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.transform(img)
        return x, int(self.labels[i]), i


def open_mask(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The mask at ``path`` as uint8 {0, 1} of shape ``(H, W)`` (:func:`binarize_mask`), resized to ``size``
    ``(W, H)`` (PIL's order) with nearest neighbour when given and different. No EXIF orientation is applied:
    a mask is a PNG aligned with its image's pixels.

    Raises:
        DatasetError: one line naming the file when it cannot be read or decoded.
    """
    try:
        with Image.open(path) as im:
            mask = binarize_mask(np.asarray(im.convert("L")))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode mask ({e}); run `fastlesion check` and set "
                           "data.exclude_file") from None
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        mask = np.array(Image.fromarray(mask).resize(tuple(size), Image.Resampling.NEAREST))
    return mask


class ImageMaskTable(ImageTable):
    """Image and mask pairs of a segmentation table: item ``(i, seed)`` is ``(image float 3xSxS, mask float
    1xSxS in {0, 1}, i)``, one seeded draw of ``transform`` (a v2 transform of ``(PIL image, tv_tensors.Mask)``)
    moving both."""

    def __init__(self, paths: list[str], mask_paths: list[str], labels: np.ndarray, transform) -> None:
        super().__init__(paths, labels, transform)
        self.mask_paths = mask_paths

    def __getitem__(self, item: tuple[int, int]):
        from torchvision import tv_tensors

        i, seed = item
        img = self._open(self.paths[i])
        mask = tv_tensors.Mask(torch.from_numpy(open_mask(self.mask_paths[i], img.size)).unsqueeze(0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x, m = self.transform(img, mask)
        return x, m.as_subclass(torch.Tensor).to(torch.float32), i


class _ListSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)`` pairs for this epoch's shard."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.seeds: list[int] = []

    def __iter__(self):
        return iter(zip(self.indices, self.seeds))

    def __len__(self) -> int:
        return len(self.indices)


class TorchLoader(ShardedLoader):
    """DataLoader-based loader over a table, sharded per rank, with per-epoch shuffling/oversampling.

    A ``mask`` column makes it a segmentation loader: batches are ``(images, masks, idx)`` (module docstring)."""

    backend = "torch"

    def __init__(self, table: pd.DataFrame, cfg: LoaderConfig, image_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        super().__init__(table, cfg, train, rank=rank, world_size=world_size, device=device,
                         channels_last=channels_last, image_size=image_size)
        if self.mask_paths is not None:
            tf = seg_train_transform(cfg, image_size) if train else seg_eval_transform(cfg, image_size)
            self.dataset = ImageMaskTable(table["path"].tolist(), self.mask_paths, self.labels, tf)
        else:
            tf = train_transform(cfg, image_size) if train else eval_transform(cfg, image_size)
            self.dataset = ImageTable(table["path"].tolist(), self.labels, tf)
        self.sampler = _ListSampler()
        self.set_epoch(0)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
            persistent_workers=self.workers > 0, prefetch_factor=self.prefetch if self.workers > 0 else None)

    def held_batches(self) -> int:
        """Batches in flight: ``prefetch`` per worker (at most an epoch's worth), plus the one in use."""
        return (min(self.workers * self.prefetch, len(self)) if self.workers > 0 else 0) + 1

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's order (same on all ranks), take this rank's shard and one augmentation seed per sample."""
        self.epoch = epoch
        self.sampler.indices = self.shard(self.draw_order(epoch)).tolist()
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        self.sampler.seeds = rng.integers(0, 2**62, len(self.sampler.indices)).tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        it = iter(self.loader)
        while True:
            try:
                x, y, idx = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a worker's error comes back wrapped: keep its one line
                if isinstance(e, DatasetError) and "Original Traceback" not in str(e):
                    raise  # raised in this process (workers=0): already one line
                raise DatasetError(_worker_error_line(e)) from None
            # non_blocking pairs with pin_memory: the copy overlaps the next batch's work on CUDA; y is the labels,
            # or the float masks N x 1 x S x S of a segmentation table (contiguous, never channels_last)
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                   y.to(self.device, non_blocking=True), idx)


def _worker_error_line(e: BaseException) -> str:
    """The one line of an exception re-raised from a DataLoader worker.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as its message
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ...", ending with
    ``fastlesion.errors.DatasetError: <line>``): keep the last line, without the exception's type name.
    """
    text = str(e).strip()
    if not text:
        return repr(e)
    last = text.splitlines()[-1].strip()
    return last.split("DatasetError: ", 1)[-1]
