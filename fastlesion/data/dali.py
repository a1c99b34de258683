"""NVIDIA DALI loader: JPEGs decoded and augmented by DALI, on the GPU (nvJPEG, ``device="mixed"``) or on CPU threads.

Same contract as the reference torch loader (:class:`fastlesion.data.loader.Loader`): iterating yields
``(images, labels, idx)`` on the training device, ``len()`` is known up front and equal on every rank for training.

Pipelines:

* **train** — ``fn.readers.file`` over the table's files (row indices travel as the reader's labels) →
  ``fn.decoders.image_random_crop`` (only the crop window is decoded: libjpeg-turbo ROI decoding on CPU, nvJPEG on
  GPU) → resize to ``image_size`` → random horizontal/vertical flips → rotation (nearest neighbour, zero fill, like
  torchvision's ``RandomRotation``) → colour jitter (``color_twist``)
  → ``crop_mirror_normalize`` (ImageNet mean/std, CHW or HWC, float32/float16; bfloat16 is converted by torch).
  Rotation and jitter are left out of the graph when their strength is 0.
* **eval** — ``fn.decoders.image`` → resize the shorter side to ``image_size / eval_crop`` → center crop → normalise.
* **segmentation** (a table with a ``mask`` column) — a second ``fn.readers.file`` over the masks, with the same
  file order and the same sharding settings (no shuffling inside the reader: the order is already drawn), so the
  two readers yield the same rows batch after batch; both return the row indices and the loader checks that they
  agree. The mask PNG is decoded on CPU as ``GRAY`` and binarised at full resolution (the rule of
  :func:`~fastlesion.data.transforms.binarize_mask`: ``> 127`` when its maximum is above 127, else ``> 0``).
  Training: ``fn.peek_image_shape`` → ``fn.random_crop_generator`` (``loader.scale`` / ``loader.ratio``) gives one
  window, which ``fn.decoders.image_slice`` decodes from the JPEG (ROI decoding, as above) and ``fn.slice`` cuts
  from the mask in coordinates relative to the image's size; both are resized to ``image_size`` square (the mask
  with nearest neighbour), flipped by the same ``coin_flip`` nodes and rotated by the same angle node (the mask
  nearest neighbour, zero fill); colour jitter and normalisation touch only the image. Evaluation: the whole
  image and mask squashed to ``image_size`` square (no center crop). The mask leaves the graph as float32
  ``1 x S x S`` in {0, 1}; on a GPU pipeline it moves to the GPU after the crop and is resized there.

Both decoders apply a JPEG's EXIF orientation tag (``adjust_orientation=True``, DALI's default, spelled out), and so
does the torch loader (:func:`fastlesion.data.torch_loader.open_rgb`): a photo is seen upright by both backends.

Orders come from :mod:`fastlesion.data.sampling`, so both backends visit the same samples for the same
(seed, epoch): the reader gets the whole epoch order (identical on every rank) laid out so that DALI's contiguous
shard ``shard_id=rank`` of ``num_shards=world_size`` is exactly ``sampling.shard(order, rank, world_size)``, with
``random_shuffle=False`` (the order is already a seeded shuffle) and ``pad_last_batch=True``. A new order (every
training epoch; oversampling draws a new resampled file list) means a new pipeline, built lazily on the first
``iter()`` after :meth:`DaliLoader.set_epoch` (a few milliseconds for ~30k files, see the README).

Evaluation is sharded the DALI way (rank ``r`` reads the contiguous rows ``[r*N/W, (r+1)*N/W)``), with padding
removed by the iterator and, as a guard, by the row indices: every row is yielded exactly once over all ranks.

A file DALI cannot decode stops the run with a :class:`~fastlesion.errors.DatasetError` naming it (DALI raises,
it never hangs): the name DALI gives ("Failed to decode sample #i : <path>"), else the first file of the batches
in flight that DALI's own decoder fails on when they are decoded again one at a time (:func:`find_undecodable`),
else the list of candidates, never a guess by another decoder. ``fastlesion check`` writes the exclusion list that
keeps such files out of the table. A JPEG with corrupt scan data is *not* an error for DALI: libjpeg-turbo prints a
warning without the file name ("Corrupt JPEG data: ...") and the image decodes to wrong pixels; ``fastlesion
check`` reports it as ``corrupt``.

Batch sizes, threads and queue depth are the clamped values of :class:`~fastlesion.data.loader.ShardedLoader`
(``self.batch_size``, ``self.workers``, ``self.prefetch``), checked before any pipeline is built.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from fastlesion.config import LoaderConfig
from fastlesion.data import sampling
from fastlesion.data.loader import ShardedLoader
from fastlesion.data.transforms import MASK_THRESHOLD, MEAN_255, STD_255, eval_resize_size, jitter
from fastlesion.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

READER = "reader"
"""Name of the ``fn.readers.file`` operator, given to the iterator as ``reader_name``."""
MASK_READER = "mask_reader"
"""Name of the second ``fn.readers.file`` of a segmentation pipeline (the masks, in the same order)."""

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DECODE_FAILED = re.compile(r"Failed to decode sample\s*#?\d*\s*:\s*(\S[^\n]*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BOILERPLATE = ("Critical error", "Error in", "which was", "encountered", "Current pipeline", "Traceback")
_MAX_REASON = 200
_MAX_CANDIDATES = 5


def _pipeline_seed(seed: int, rank: int, epoch: int, train: bool) -> int:
    """Seed of DALI's random operators for (seed, rank, epoch): reproducible, different per rank and epoch."""
    return int(np.random.SeedSequence([seed, rank, epoch, int(train)]).generate_state(1)[0] & 0x7FFFFFFF)


def lesion_pipeline(files: list[str], rows: list[int], cfg: LoaderConfig, image_size: int, train: bool,
                    shard_id: int = 0, num_shards: int = 1, dali_device: str = "cpu", channels_last: bool = False,
                    masks: list[str] | None = None):
    """The DALI graph, declared once: outputs ``images`` and ``rows`` (the reader's labels, the table rows); with
    ``masks`` also ``masks`` (float32 1 x S x S in {0, 1}) and ``mask_rows`` (the mask reader's rows).

    A ``@pipeline_def`` graph function (applied in :func:`build_pipeline`, which keeps DALI's import lazy): the
    run-time settings (batch size, threads, device, seed, queue depth) are not its arguments but the Pipeline's,
    given when it is built, as in NVIDIA's PyTorch ResNet-50 example.

    Args:
        files: image paths in reading order (the reader splits them into ``num_shards`` contiguous shards).
        rows: one integer per file, returned with its image (the row index into the table).
        cfg: augmentation parameters, IDCT choice and output dtype.
        image_size: square output size.
        train: training (random crop + augmentation) or evaluation (resize + center crop) graph.
        shard_id: this process's shard.
        num_shards: number of shards (DDP world size).
        dali_device: ``cpu`` (everything on CPU threads) or ``gpu`` (nvJPEG ``mixed`` decode, GPU operators).
        channels_last: output HWC (to become a channels_last NCHW tensor) instead of CHW.
        masks: the mask of each file, in the same order (a segmentation graph), or None.
    """
    from nvidia.dali import fn, types

    dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT
    layout = "HWC" if channels_last else "CHW"
    decode_device = "mixed" if dali_device == "gpu" else "cpu"
    # the order is drawn by fastlesion.data.sampling: the reader neither shuffles nor reorders, so a second reader
    # with the same settings over a parallel list (the masks) yields the same rows
    reading = {"shard_id": shard_id, "num_shards": num_shards, "random_shuffle": False, "pad_last_batch": True,
               "stick_to_shard": True}
    jpegs, row = fn.readers.file(files=files, labels=rows, name=READER, **reading)
    if masks is not None:
        pngs, mask_row = fn.readers.file(files=masks, labels=rows, name=MASK_READER, **reading)
        img, mask = _segmentation_pair(jpegs, pngs, cfg, image_size, train, decode_device)
        img = fn.crop_mirror_normalize(img, dtype=dtype, output_layout=layout, mean=list(MEAN_255), std=list(STD_255))
        mask = fn.crop_mirror_normalize(mask, dtype=types.FLOAT, output_layout="CHW")  # {0, 1} as float32
        return img, row, mask, mask_row
    if not train:
        img = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, adjust_orientation=True)
        img = fn.resize(img, resize_shorter=eval_resize_size(image_size, cfg.eval_crop), antialias=True)
        img = fn.crop_mirror_normalize(img, dtype=dtype, output_layout=layout, crop=[image_size, image_size],
                                       crop_pos_x=0.5, crop_pos_y=0.5, mean=list(MEAN_255), std=list(STD_255))
        return img, row
    # only the crop window is decoded (libjpeg-turbo ROI decoding on CPU, nvJPEG on GPU)
    img = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                        random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio),
                                        num_attempts=10, use_fast_idct=cfg.fast_idct, adjust_orientation=True)
    img = fn.resize(img, size=[image_size, image_size], antialias=True)
    img = _augment(img, cfg)
    img = fn.crop_mirror_normalize(img, dtype=dtype, output_layout=layout, mean=list(MEAN_255), std=list(STD_255))
    return img, row


def _segmentation_pair(jpegs, pngs, cfg: LoaderConfig, image_size: int, train: bool, decode_device: str):
    """Image and mask of one sample, cut, resized, flipped and rotated together (module docstring); the image
    uint8 HWC RGB with colour jitter, the mask uint8 HWC (one channel) in {0, 1}, both ``image_size`` square."""
    from nvidia.dali import fn, types

    mask = fn.decoders.image(pngs, device="cpu", output_type=types.GRAY)
    # binarize_mask's rule, per sample: > 127 when the mask's maximum is above 127, else > 0
    threshold = (fn.reductions.max(mask) > MASK_THRESHOLD) * MASK_THRESHOLD
    mask = fn.cast(mask > threshold, dtype=types.UINT8)
    if train:
        shape = fn.peek_image_shape(jpegs, adjust_orientation=True)  # H, W, C after the EXIF orientation
        anchor, window = fn.random_crop_generator(shape, random_area=list(cfg.scale),
                                                  random_aspect_ratio=list(cfg.ratio), num_attempts=10)  # H, W
        img = fn.decoders.image_slice(jpegs, anchor, window, device=decode_device, output_type=types.RGB, axes=[0, 1],
                                      normalized_anchor=False, normalized_shape=False, use_fast_idct=cfg.fast_idct,
                                      adjust_orientation=True)
        hw = fn.cast(shape[0:2], dtype=types.FLOAT)
        # the same window relative to the image's size (exact when the sizes agree, proportional when they do not)
        mask = fn.slice(mask, anchor / hw, window / hw, axes=[0, 1])
    else:
        img = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, adjust_orientation=True)
    if decode_device == "mixed":
        mask = mask.gpu()  # the CPU -> GPU hop of the mask: after the crop, before the resize
    img = fn.resize(img, size=[image_size, image_size], antialias=True)
    mask = fn.resize(mask, size=[image_size, image_size], interp_type=types.INTERP_NN, antialias=False)
    if not train:
        return img, mask
    img, mask = _flip_rotate([img, mask], cfg)
    return _colour(img, cfg), mask


def _flip_rotate(nodes: list, cfg: LoaderConfig) -> list:
    """Random flips and rotation, one draw per sample applied to every node of ``nodes`` (an image and its mask);
    an operator whose strength is 0 is left out of the graph."""
    from nvidia.dali import fn, types

    j = jitter(cfg)
    if cfg.hflip > 0 or cfg.vflip > 0:
        horizontal = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip > 0 else 0
        vertical = fn.random.coin_flip(probability=cfg.vflip) if cfg.vflip > 0 else 0
        nodes = [fn.flip(n, horizontal=horizontal, vertical=vertical) for n in nodes]
    if j["rotate"] > 0:
        # nearest neighbour, as torchvision's RandomRotation: ~10x cheaper than linear on DALI's CPU warp
        angle = fn.random.uniform(range=[-j["rotate"], j["rotate"]])
        nodes = [fn.rotate(n, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN) for n in nodes]
    return nodes


def _augment(img, cfg: LoaderConfig):
    """Flips, rotation and colour jitter; an operator whose strength is 0 is left out of the graph."""
    (img,) = _flip_rotate([img], cfg)
    return _colour(img, cfg)


def _colour(img, cfg: LoaderConfig):
    """Colour jitter (``color_twist``), left out of the graph when its strength is 0."""
    from nvidia.dali import fn

    j = jitter(cfg)
    twist = {}
    for key in ("brightness", "contrast", "saturation"):
        if j[key] > 0:
            twist[key] = fn.random.uniform(range=[max(0.0, 1.0 - j[key]), 1.0 + j[key]])
    if j["hue"] > 0:  # torchvision: a fraction of the hue circle; DALI: degrees
        twist["hue"] = fn.random.uniform(range=[-360.0 * j["hue"], 360.0 * j["hue"]])
    return fn.color_twist(img, **twist) if twist else img


@functools.cache
def _pipeline_factory():
    """``pipeline_def(lesion_pipeline)``, made on first use so that importing this module needs no DALI."""
    from nvidia.dali import pipeline_def

    return pipeline_def(lesion_pipeline)


def build_pipeline(files: list[str], rows: list[int], cfg: LoaderConfig, image_size: int, train: bool,
                   batch_size: int, shard_id: int = 0, num_shards: int = 1, dali_device: str = "cpu",
                   device_id: int | None = None, seed: int = 0, channels_last: bool = False,
                   num_threads: int | None = None, prefetch: int | None = None, masks: list[str] | None = None):
    """The pipeline (not yet built) of one epoch: :func:`lesion_pipeline`'s graph with the run-time settings
    ``batch_size``, ``num_threads`` (default ``cfg.resolved_workers()``), ``device_id`` (None: a CPU-only
    pipeline), ``seed`` and ``prefetch_queue_depth`` (``prefetch``, default ``cfg.prefetch``). :class:`DaliLoader`
    passes its clamped ``workers`` and ``prefetch`` (see :class:`~fastlesion.data.loader.ShardedLoader`). ``masks``
    (one per file, same order) makes a segmentation graph."""
    threads = cfg.resolved_workers() if num_threads is None else num_threads
    depth = cfg.prefetch if prefetch is None else prefetch
    return _pipeline_factory()(files, rows, cfg, image_size, train, shard_id=shard_id, num_shards=num_shards,
                               dali_device=dali_device, channels_last=channels_last, masks=masks,
                               batch_size=batch_size, num_threads=max(1, threads),
                               device_id=device_id if dali_device == "gpu" else None, seed=seed,
                               prefetch_queue_depth=max(1, depth))


class DaliLoader(ShardedLoader):
    """DALI loader over a catalog table (or a split of it), sharded per rank, with per-epoch shuffling/oversampling.

    Args:
        table: rows with at least ``path`` (absolute) and ``label`` (int class index); a ``mask`` column (absolute
            paths of binary mask PNGs) makes a segmentation loader yielding ``(images, masks, idx)``.
        cfg: the loader section (batch sizes, ``workers`` = DALI CPU threads, augmentation, ``dtype``, seed).
        image_size: square input size of the model.
        train: training pipeline (shuffled, augmented, padded shards) or evaluation (each row exactly once).
        rank: this process's DDP rank.
        world_size: number of DDP processes.
        device: torch device the batches are delivered on.
        channels_last: deliver images in the channels_last memory format.
        dali_device: ``cpu`` (whole pipeline on CPU threads) or ``gpu`` (nvJPEG + GPU operators).

    The bookkeeping (``num_samples``, ``batch_size``, ``drop_last``, ``len()``, ``effective_class_ratio``, epoch
    orders) is :class:`~fastlesion.data.loader.ShardedLoader`'s, shared with the torch loader.
    """

    backend = "dali"

    def __init__(self, table: pd.DataFrame, cfg: LoaderConfig, image_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = False,
                 dali_device: str = "cpu") -> None:
        if dali_device not in ("cpu", "gpu"):
            raise ConfigError(f"loader.device: {dali_device!r} is not one of ('cpu', 'gpu')")
        if dali_device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("loader.device: 'gpu' needs CUDA, which is not available here (use loader.device=cpu)")
        if len(table) == 0:
            raise DatasetError("DALI loader: the table is empty (no images to load)")
        self.device_name = dali_device  # before the bookkeeping: its memory check needs it
        super().__init__(table, cfg, train, rank=rank, world_size=world_size, device=device,
                         channels_last=channels_last, image_size=image_size)
        self.paths: list[str] = table["path"].astype(str).tolist()
        self.dtype = _TORCH_DTYPES[cfg.dtype]
        self._files: list[str] = []  # the reader's file list (all shards)
        self._mask_files: list[str] | None = None  # the mask reader's list (segmentation), parallel to _files
        self._rows: list[int] = []
        self._pipe = None
        self._it = None
        self._stale = True  # the pipeline does not match the current order: rebuild before iterating
        self._needs_reset = False  # the iterator finished an epoch: reset it before reusing it
        self.set_epoch(0)

    def value_bytes(self) -> int:
        """DALI's output dtype: float16 is 2 bytes, float32 (and bfloat16, converted by torch) 4."""
        return 2 if self.cfg.dtype == "float16" else 4

    # ------------------------------------------------------------------------------------------------- orders
    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's order (same on all ranks; oversampled when configured) and schedule a new pipeline.

        Evaluation reads the table in order every epoch, so its pipeline is built once and reused."""
        if self._files and (epoch == self.epoch or not self.train):
            self.epoch = epoch
            return
        self.epoch = epoch
        order = self.draw_order(epoch)
        if self.train and self.cfg.oversample and self.task == "classification":
            log.info("epoch %d: oversampled class ratio %s", epoch,
                     " ".join(f"{r:.3f}" for r in self.effective_class_ratio))
        # training: lay the shards out contiguously, so that DALI's shard r of W is exactly ShardedLoader.shard for
        # rank r (evaluation's shares are contiguous already)
        arranged = np.concatenate([sampling.shard(order, r, self.world_size, pad=True)
                                   for r in range(self.world_size)]) if self.train else order
        self._rows = arranged.tolist()
        self._files = [self.paths[i] for i in self._rows]
        if self.mask_paths is not None:
            self._mask_files = [self.mask_paths[i] for i in self._rows]
        self._stale = True

    def shard_rows(self) -> np.ndarray:
        """Row indices this rank reads in the current epoch, in order (training: padded like the torch loader)."""
        begin = self.rank * self.num_samples if self.train else self.rank * len(self._rows) // self.world_size
        return np.asarray(self._rows[begin:begin + self.num_samples], dtype=np.int64)

    # ------------------------------------------------------------------------------------------------- pipeline
    def _close(self) -> None:
        self._it = None
        self._pipe = None  # DALI frees the pipeline (threads, buffers) when the last reference goes

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._close()
        pipe = build_pipeline(self._files, self._rows, self.cfg, self.image_size, self.train, self.batch_size,
                              shard_id=self.rank, num_shards=self.world_size, dali_device=self.device_name,
                              device_id=self._device_id(), seed=_pipeline_seed(self.cfg.seed, self.rank,
                                                                               self.epoch, self.train),
                              channels_last=self.channels_last, num_threads=self.workers, prefetch=self.prefetch,
                              masks=self._mask_files)
        pipe.build()
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        self._pipe = pipe
        outputs = ["images", "rows"] + (["masks", "mask_rows"] if self._mask_files is not None else [])
        self._it = DALIGenericIterator([pipe], outputs, reader_name=READER, last_batch_policy=policy,
                                       auto_reset=False)
        self._stale = self._needs_reset = False

    def _device_id(self) -> int | None:
        """The CUDA device DALI decodes on (None for a CPU pipeline)."""
        if self.device_name != "gpu":
            return None
        if self.device.type == "cuda" and self.device.index is not None:
            return self.device.index
        return torch.cuda.current_device()

    def _decode_error(self, err: Exception, position: int) -> DatasetError:
        """A one-line DatasetError naming the file DALI failed on.

        DALI names the file itself when libjpeg-turbo fails ("Failed to decode sample #i : <path>"); otherwise
        (e.g. "nvImageCodec failure: '#4'" for a file that is no image at all) the batches that may have been in
        flight, ``(prefetch + 2) x batch_size`` files from ``position`` on, are decoded again one file at a time
        by DALI's own decoder (:func:`find_undecodable`), and the first that fails is named. Where even that
        finds none, the message lists the candidates rather than guessing. A segmentation loader's candidates
        are each image followed by its mask; a file that does not exist is named before any decoding (the reader
        fails on it ahead of its turn, so the one-at-a-time probe would name its predecessor).
        """
        msg = str(err)
        hint = "run `fastlesion check` and set data.exclude_file"
        masks = set(self.mask_paths or ())
        m = _DECODE_FAILED.search(msg)
        if m:
            path = m.group(1).strip()
            what = "mask" if path in masks else "image"
            return DatasetError(f"{path}: DALI cannot decode {what} ({_describe(path, '', what)}); {hint}")
        reason = _dali_reason(msg)
        rows = self.shard_rows()[position: position + (self.prefetch + 2) * self.batch_size]
        files = [self.paths] if self.mask_paths is None else [self.paths, self.mask_paths]
        candidates = list(dict.fromkeys(f[int(r)] for r in rows for f in files))
        missing = next((p for p in candidates if not os.path.isfile(p)), None)
        if missing is not None:
            return DatasetError(f"{missing}: no such {'mask' if missing in masks else 'image'} file; {hint}")
        found = find_undecodable(candidates, self.device_name, self._device_id()) if candidates else None
        if found is not None:
            path, why = found
            what = "mask" if path in masks else "image"
            return DatasetError(f"{path}: DALI cannot decode {what} ({_describe(path, why or reason, what)}); {hint}")
        shown = ", ".join(candidates[:_MAX_CANDIDATES])
        more = f" (+{len(candidates) - _MAX_CANDIDATES} more)" if len(candidates) > _MAX_CANDIDATES else ""
        return DatasetError(f"DALI failed on a batch of rank {self.rank} ({reason or 'decoder error'}) and no single "
                            f"file of it fails on its own; the file is one of {len(candidates)}: {shown}{more}; "
                            f"{hint}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:
            return
        try:  # the iterator decodes its first batches as soon as it is made
            if self._it is None or self._stale:
                self._build()
            elif self._needs_reset:
                self._it.reset()
        except RuntimeError as e:
            self._close()
            raise self._decode_error(e, 0) from None
        it = self._it
        self._stale = True  # an epoch left unfinished (a `break`, an error) is not resumed: rebuild next time
        seen = None if self.train else np.zeros(len(self.paths), dtype=bool)
        position = 0
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                break
            except RuntimeError as e:
                self._close()
                raise self._decode_error(e, position) from None
            x, idx = out["images"], out["rows"].view(-1).to(torch.int64)
            # segmentation: the masks (float32 N x 1 x S x S); else the labels of the rows, looked up below
            y = out.get("masks")
            if y is not None and not torch.equal(out["mask_rows"].view(-1).to(torch.int64), idx):
                self._close()
                raise RuntimeError("DALI loader: the image and mask readers went out of step (a bug, not a data "
                                   "problem)")
            position += len(idx)
            if seen is not None:  # evaluation: never yield a padded duplicate
                keep = ~seen[idx.numpy()]
                seen[idx.numpy()] = True
                if not keep.all():
                    kept = torch.from_numpy(keep)
                    idx = idx[kept]
                    x = x[kept.to(x.device)]
                    y = y[kept.to(y.device)] if y is not None else None
                if len(idx) == 0:
                    continue
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)  # NHWC storage, NCHW logical shape: channels_last memory format
            if x.dtype != self.dtype:
                x = x.to(self.dtype)
            if y is None:
                y = torch.from_numpy(self.labels[idx.numpy()])
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx
        self._stale = False
        self._needs_reset = True


def _dali_reason(text: str) -> str:
    """The line of a DALI error message (or of DALI's stderr) that says what went wrong, without the pipeline's
    boilerplate and colour codes; "" when there is none."""
    text = _ANSI.sub("", text)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(_BOILERPLATE) or line.startswith(("File ", "img = ", "return ")):
            continue
        if "] " in line and line.startswith("["):  # "[ERROR] [libjpeg_turbo_decoder] Could not decode ... - why"
            line = line.rsplit("] ", 1)[-1]
            line = line.split(" - ", 1)[-1]
        return line[:_MAX_REASON]
    return ""


def _describe(path: str, reason: str, what: str = "image") -> str:
    """Why ``path`` cannot be decoded: what ``fastlesion check`` says of an image, else (and for a mask, which is
    no JPEG) DALI's reason."""
    from fastlesion.data.validate import check_image

    if what != "image":
        return reason or "decoder error"
    problems = check_image(path)
    if problems:
        return "; ".join(f"{p}: {d}" for p, d in problems)[:_MAX_REASON]
    return reason or "decoder error"


def find_undecodable(paths: list[str], dali_device: str = "cpu", device_id: int | None = None) \
        -> tuple[str, str] | None:
    """Decode ``paths`` one at a time with DALI's image decoder; the first file that fails and DALI's reason.

    Args:
        paths: candidate files, in the order to try.
        dali_device: ``cpu`` or ``gpu`` (nvJPEG, ``mixed``): the decoder of the pipeline that failed.
        device_id: the CUDA device for ``gpu``.

    Returns:
        ``(path, reason)`` of the first file DALI cannot decode, or None when every file decodes (or the probe
        itself cannot run). The decoder's own messages on stderr are captured, not printed.
    """
    from nvidia.dali import fn, pipeline_def, types

    from fastlesion.data.validate import captured_stderr

    @pipeline_def
    def one_by_one():
        jpegs, _ = fn.readers.file(files=list(paths), random_shuffle=False, name="probe")
        return fn.decoders.image(jpegs, device="mixed" if dali_device == "gpu" else "cpu", output_type=types.RGB)

    with captured_stderr() as err:
        try:
            pipe = one_by_one(batch_size=1, num_threads=1, device_id=device_id if dali_device == "gpu" else None,
                              prefetch_queue_depth=1, exec_pipelined=False, exec_async=False, seed=0)
            pipe.build()
        except Exception:  # noqa: BLE001 - the probe is best effort: the caller lists the candidates instead
            return None
        failed: tuple[int, str] | None = None
        for i in range(len(paths)):  # batch size 1, synchronous: run i decodes exactly paths[i]
            try:
                pipe.run()
            except RuntimeError as e:
                failed = (i, str(e))
                break
    if failed is None:
        return None
    return paths[failed[0]], _dali_reason(err.text) or _dali_reason(failed[1])
