"""Reference loader: torch DataLoader + torchvision transforms (fallback and benchmark baseline).

Same contract as the DALI loader (:class:`fastlesion.data.loader.Loader`): iterating yields
``(images, labels, idx)`` already on the training device, ``len()`` is the number of steps per epoch, known up front.
An EXIF orientation tag is applied, as cameras, viewers and DALI's decoders do (:func:`open_rgb`).

A table with a ``mask`` column yields ``(images, masks, idx)`` instead (:class:`ImageMaskTable`): each mask is read
as greyscale, binarised at full resolution (:func:`~fastlesion.data.transforms.binarize_mask`), resized to its
image's size with nearest neighbour when the sizes differ, and transformed together with its image by torchvision
v2 (``tv_tensors.Mask``: nearest neighbour, zero fill; colour jitter leaves it alone).

With ``loader.dct_scaling`` (the default) JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the crop (training) or
the resize (evaluation) would shrink them that much anyway (:mod:`fastlesion.data.decode`): the crop's window is
drawn on the original size first, from the same generator and with the same distribution, so the augmentation is
unchanged. Where the window needs the whole image (no reduction possible, e.g. 600x450 photos at 224 px) a JPEG is
decoded by libjpeg-turbo directly (simplejpeg) and resized by torch's uint8 kernel, which on 600x450 JPEGs took
1.3 ms per crop against 2.2 ms for PIL's decode + resize. A segmentation mask is cut with the same window in
original coordinates. For classification the workers yield uint8 images and the batches are normalised where they
arrive (:class:`~fastlesion.data.transforms.NormalizeUint8`: on the GPU when training there), a quarter of the
bytes of float images through shared memory and to the device. ``dct_scaling=false`` is the plain reference:
``Image.open`` + the torchvision v2 pipeline of :mod:`fastlesion.data.transforms`.

Each sample's random draws come from its own seed (given by the sampler). In a worker process the seed goes
straight into torch's default generator (``torch.manual_seed`` would also queue a CUDA seeding with a formatted
stack trace per call); without workers the main process's generator is saved and restored around the sample.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastlesion.config import LoaderConfig
from fastlesion.data import decode
from fastlesion.data.exif import orientation
from fastlesion.data.loader import ShardedLoader
from fastlesion.data.transforms import (
    NormalizeUint8,
    after_crop,
    binarize_mask,
    eval_resize_size,
    eval_transform,
    seg_eval_transform,
    seg_train_transform,
    to_normalized,
    train_transform,
)
from fastlesion.errors import DatasetError


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` as RGB, turned upright by its EXIF orientation tag (if any, other than 1).

    DALI's ``fn.decoders.image*`` apply the tag too (``adjust_orientation=True``), so both backends see a photo
    the way a viewer shows it.
    """
    with Image.open(path) as im:
        if orientation(im) != 1:  # a broken EXIF block reads as 1: the pixels as stored
            im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


@contextlib.contextmanager
def seeded(seed: int):
    """Draw a sample's augmentation from ``seed``: torch's default generator seeded directly in a DataLoader worker
    (its generator is the sample's), saved and restored around the block in the main process (``workers=0``)."""
    if torch.utils.data.get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _decode_error(path: str, e: Exception) -> DatasetError:
    return DatasetError(f"{path}: cannot decode image ({e}); run `fastlesion check` and set data.exclude_file")


class ImageTable(torch.utils.data.Dataset):
    """Images of a catalog table: item ``(i, seed)`` is ``(tensor CHW float, label, i)``.

    ``load(path)`` decodes (:func:`open_rgb`, or a DCT-scaled crop of :mod:`fastlesion.data.decode`) and
    ``transform`` (None: nothing) does the rest; both draw from the sample's own seed (given by the sampler,
    :func:`seeded`), so a run is reproducible and independent of the number of workers.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, transform: Callable | None,
                 load: Callable = open_rgb) -> None:
        self.paths, self.labels, self.transform, self.load = paths, labels, transform, load

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: str):
        try:
            return self.load(path)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise _decode_error(path, e) from None

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        with seeded(seed):
            x = self._load(self.paths[i])
            if self.transform is not None:
                x = self.transform(x)
        return x, int(self.labels[i]), i


def _crop(path: str, image_size: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """The DCT-scaled random resized crop of ``path`` (PIL image ``image_size`` square)."""
    return decode.random_resized_crop(path, image_size, scale, ratio)[0]


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
    moving both.

    ``pair`` (None: the full image and its mask at the image's size) is a DCT-scaled decode of
    :func:`crop_pair` / :func:`squash_pair` that has already cut and resized both with one window."""

    def __init__(self, paths: list[str], mask_paths: list[str], labels: np.ndarray, transform,
                 pair: Callable | None = None) -> None:
        super().__init__(paths, labels, transform)
        self.mask_paths, self.pair = mask_paths, pair

    def __getitem__(self, item: tuple[int, int]):
        from torchvision import tv_tensors

        i, seed = item
        with seeded(seed):
            if self.pair is None:
                img = self._load(self.paths[i])
                mask = torch.from_numpy(open_mask(self.mask_paths[i], img.size)).unsqueeze(0)
            else:
                try:
                    img, mask = self.pair(self.paths[i], self.mask_paths[i])
                except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                    raise _decode_error(self.paths[i], e) from None
            x, m = self.transform(img, tv_tensors.Mask(mask))
        return x, m.as_subclass(torch.Tensor).to(torch.float32), i


def _mask_resized(mask: np.ndarray, size: int, window: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``mask`` (H x W {0, 1}), cut to ``window`` (top, left, height, width) when given, resized to ``size`` square
    by centred nearest neighbour (as :func:`~fastlesion.data.transforms.seg_train_transform`): ``1 x S x S`` uint8."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    m = torch.from_numpy(mask).unsqueeze(0)
    if window is not None:
        top, left, h, w = window
        m = m[:, top:top + h, left:left + w]
    return F.resize(m, [size, size], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)


def crop_pair(path: str, mask_path: str, image_size: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """Training pair, DCT-scaled: the image's random resized crop (:func:`fastlesion.data.decode.random_resized_crop`)
    and the mask cut with the same window in original coordinates, then resized to ``image_size`` (nearest)."""
    img, window, size = decode.random_resized_crop(path, image_size, scale, ratio)
    return img, _mask_resized(open_mask(mask_path, size), image_size, window)


def squash_pair(path: str, mask_path: str, image_size: int):
    """Evaluation pair, DCT-scaled: the whole image and its mask squashed to ``image_size`` square."""
    img, size = decode.squash(path, image_size)
    return img, _mask_resized(open_mask(mask_path, size), image_size)


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
    """DataLoader-based loader over a table, sharded per rank, with per-epoch shuffling/oversampling; JPEGs decoded
    at a reduced DCT scale where the output allows it (``loader.dct_scaling``, module docstring).

    A ``mask`` column makes it a segmentation loader: batches are ``(images, masks, idx)`` (module docstring)."""

    backend = "torch"

    def __init__(self, table: pd.DataFrame, cfg: LoaderConfig, image_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        super().__init__(table, cfg, train, rank=rank, world_size=world_size, device=device,
                         channels_last=channels_last, image_size=image_size)
        paths, dct, crop = table["path"].tolist(), cfg.dct_scaling, (tuple(cfg.scale), tuple(cfg.ratio))
        self.normalize: NormalizeUint8 | None = None  # set where the workers yield uint8 images
        if self.mask_paths is not None:
            if not dct:
                tf = seg_train_transform(cfg, image_size) if train else seg_eval_transform(cfg, image_size)
                pair = None
            elif train:
                tf, pair = seg_train_transform(cfg, image_size, crop=False), functools.partial(
                    crop_pair, image_size=image_size, scale=crop[0], ratio=crop[1])
            else:
                tf, pair = to_normalized(), functools.partial(squash_pair, image_size=image_size)
            self.dataset = ImageMaskTable(paths, self.mask_paths, self.labels, tf, pair=pair)
        elif not dct:
            tf = train_transform(cfg, image_size) if train else eval_transform(cfg, image_size)
            self.dataset = ImageTable(paths, self.labels, tf)
        elif train:
            load = functools.partial(_crop, image_size=image_size, scale=crop[0], ratio=crop[1])
            self.dataset = ImageTable(paths, self.labels, after_crop(cfg), load=load)
            self.normalize = NormalizeUint8()
        else:
            load = functools.partial(decode.resize_center_crop, resize=eval_resize_size(image_size, cfg.eval_crop),
                                     crop=image_size)
            self.dataset = ImageTable(paths, self.labels, None, load=load)
            self.normalize = NormalizeUint8()
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
            # uint8 from the workers (self.normalize) is laid out first, at a quarter of the float bytes, then
            # normalised where it arrived (on the GPU when training there); the elementwise float result keeps
            # the layout (NCHW or channels_last)
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
            if self.normalize is not None:
                x = self.normalize(x)
            yield (x,
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
