"""Loader throughput: images/s of the library's loaders (DALI cpu/gpu, torch) against what users write without it.

The library's rows: ``dali-cpu``, ``dali-gpu`` (with CUDA), ``torch`` (the torch DataLoader with DCT-scaled JPEG
decoding, ``loader.dct_scaling``, the default) and ``torch-plain`` (the same loader with full decodes:
``loader.dct_scaling=false``, the plain reference). All run the same training augmentation (random resized crop,
flips, rotation, colour jitter, normalise; the ``LoaderConfig`` defaults) on synthetic ISIC-like sets at two scales,
with the same number of DALI threads and DataLoader workers:

* ``medium`` — 600x450 JPEGs (the size of HAM10000 and of the usual pre-resized ISIC sets);
* ``large``  — 2048-6000 px wide JPEGs like the ISIC 2020 originals (quality 90);
* ``large512`` (optional) — the large set after ``fastlesion prepare --size 512`` (shorter side 512).

Peers (``--backends``; all of them by default) run the same work with the same threads (DataLoader workers = DALI
threads), batch size and output size, so the library's loaders are compared with what users would write otherwise:

* ``pil`` — a plain DataLoader: ``Image.open(p).convert("RGB")``, then torchvision v2 ``RandomResizedCrop`` (the
  loader's ``scale``/``ratio``), flips, rotation and colour jitter (as ``LoaderConfig`` sets them), ``ToImage``,
  ``ToDtype(float32, scale=True)``, ``Normalize``: the builder of the library's reference,
  :func:`fastlesion.data.transforms.train_transform`, so ``pil`` and ``torch-plain`` differ only in the loader
  around it;
* ``pil-draft`` — the same, but the crop is drawn first (same distribution relative to the original image) and
  the JPEG is decoded by PIL's DCT scaling (``Image.draft("RGB", ...)``) at the smallest scale (1/2, 1/4, 1/8) that
  still leaves the crop at least ``--image-size`` pixels on its shorter side;
* ``torchvision-decode`` — ``torchvision.io.read_file`` + ``decode_jpeg`` on CPU in the DataLoader workers, then the v2
  transforms on uint8 tensors; with CUDA (``--device cuda``/``auto`` with a GPU) the workers only read the files'
  bytes and the main process decodes a whole batch with ``decode_jpeg(list_of_bytes, device="cuda")`` (nvJPEG),
  then runs the v2 transforms per sample on GPU tensors.

The ceiling (``--backends`` must name it; not in the default list): ``decode-bound`` decodes each image at the DCT
scale its crop needs and down to the crop's bottom edge (the crop drawn as the ``torch`` row draws it, with the
same rules: :mod:`fastlesion.data.decode`), with PIL's ``Image.draft`` (a whole decode by libjpeg-turbo through
simplejpeg where the crop needs scale 1), and does nothing else: no resize, no
augmentation, an empty tensor per image through the DataLoader. No loader that decodes with libjpeg and keeps at
least ``--image-size`` pixels across each crop can beat it on the same threads; ``vs_decode_bound`` says how close
a row comes.

``--data ROOT [--dataset KIND]`` measures on any catalog dataset (isic2020, isic2019, ham10000, csv, folder; the
kind is detected unless given) instead of the synthetic sets. The summary ends with one line per scale: the library's
default loader (what ``loader.backend=auto`` picks for these images here, :func:`fastlesion.data.loader.choose_backend`:
dali-gpu with CUDA; on CPU torch with DCT-scaled decoding for large images or with crops and flips only, else
dali-cpu) against the fastest peer;
rows carry ``vs_best_peer``, ``vs_pil``, ``vs_decode_bound`` (None where that row was not measured) and
``default_backend``.

Each repeat runs one epoch (a new shuffle), drops the first ``--warmup`` batches (pipeline start, worker start,
first decodes) and times the rest; the reported number is the median over ``--repeats``, the backends interleaved
so that a busy machine slows them alike. The ratio is to the torch loader measured in the same run.
``--aug-strength 0`` turns rotation and colour jitter off for every row alike (each row names the augmentation ran).
Results are printed as a table and appended as JSON lines to ``--out``: rows like the other benchmarks' (device name,
hardware fingerprint, settings, CPU use of the process tree while timed), plus the loader's own keys.

Example:
    python benchmarks/loader_throughput.py --threads 2 --out benchmarks/results.jsonl
    python benchmarks/loader_throughput.py --data /data/isic2020 --n 2000 --backends torch,dali-cpu,pil,pil-draft
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

SCALES = {"medium": {"size": 600, "large": False}, "large": {"size": None, "large": True},
          "large512": {"size": None, "large": True, "prepare": 512}}
DEFAULT_N = {"medium": 480, "large": 192, "large512": 192}
LIBRARY = ("torch", "torch-plain", "dali-cpu", "dali-gpu")
"""The library's own loaders (:func:`fastlesion.data.loader.build_loader`); ``torch-plain`` is the torch loader
with ``loader.dct_scaling=false`` (full decodes: the plain reference)."""
PEERS = ("pil", "pil-draft", "torchvision-decode")
"""What users write without the library: plain PIL, PIL with DCT-scaled decoding, torchvision's decoder."""
BOUNDS = ("decode-bound",)
"""Ceilings, not loaders: ``decode-bound`` only decodes (module docstring). Named in ``--backends`` only."""
BACKENDS = LIBRARY + PEERS
DRAFT_FACTORS = (8, 4, 2, 1)
"""JPEG DCT scalings PIL's ``Image.draft`` offers (1/8 .. 1/1), largest reduction first."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scales", default="medium,large",
                   help="comma-separated: medium (600x450), large (>=2048 px), large512 (large after `fastlesion "
                        "prepare --size 512`)")
    p.add_argument("--n", type=int, default=None,
                   help=f"images per synthetic set (default: {DEFAULT_N['medium']} medium, {DEFAULT_N['large']} large)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="DALI CPU threads = torch DataLoader workers (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--image-size", type=int, default=224, help="output image size (default 224)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per backend; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="batches dropped at the start of every repeat")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="untimed epochs per backend before the repeats (worker start, memory pools, page cache)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated subset of torch, torch-plain, dali-cpu, dali-gpu (the library's loaders; "
                        "gpu only with CUDA) and the peers pil, pil-draft, torchvision-decode (GPU decode with CUDA); "
                        "decode-bound (the ceiling: decode only) when named")
    p.add_argument("--data", default=None,
                   help="measure on this dataset root instead of the synthetic --scales (any catalog kind); "
                        "--n then keeps the first N images (default all)")
    p.add_argument("--scale-label", default=None,
                   help="with --data: the rows' image_scale (default: the root's folder name), e.g. medium to line "
                        "them up with the synthetic medium rows in compare.py")
    p.add_argument("--dataset", default=None,
                   help="kind of --data: isic2020, isic2019, ham10000, csv, folder (default: detected)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda or cpu: where dali-gpu "
                                                    "and torchvision-decode decode")
    p.add_argument("--aug-strength", type=float, default=1.0,
                   help="loader.aug_strength of every row: rotation and colour jitter scale (0 = crops and flips "
                        "only); every row runs the same augmentation")
    p.add_argument("--cache", default=None, help="folder of the synthetic sets (default ~/.cache/fastlesion/bench)")
    p.add_argument("--seed", type=int, default=0, help="synthetic set and shuffling seed")
    p.add_argument("--no-fast-idct", action="store_true", help="DALI: accurate IDCT in training too")
    p.add_argument("--out", default=None, help="append one JSON line per (scale, backend) to this file")
    return p.parse_args(argv)


def dataset(scale: str, n: int, seed: int, cache: Path, threads: int):
    """The synthetic ISIC 2020 set of ``scale`` (generated once into the cache) and its table."""
    from fastlesion.data.catalog import load_isic2020
    from fastlesion.data.synthetic import generate

    spec = SCALES[scale]
    kind = "large" if spec["large"] else scale
    root = cache / f"isic2020-{kind}-n{n}-s{seed}"
    generate("isic2020", root, n=n, seed=seed, size=spec["size"], large=spec["large"], workers=max(1, threads),
             progress=sys.stderr.isatty())
    if spec.get("prepare"):  # the large set through `fastlesion prepare --size 512` (resumable: done once)
        from fastlesion.data.resize import prepare

        small = cache / f"isic2020-{kind}-n{n}-s{seed}-prepared{spec['prepare']}"
        prepare(root, small, size=spec["prepare"], workers=max(1, threads), progress=sys.stderr.isatty())
        root = small
    return load_isic2020(root).table


def catalog_dataset(root: str, kind: str | None, limit: int | None):
    """(scale label, table) of a catalog dataset at ``root`` (``kind`` detected unless given), its first ``limit``
    rows when given."""
    from fastlesion.config import DATASET_KINDS, DataConfig
    from fastlesion.data.catalog import detect_kind, load_dataset

    path = Path(root).expanduser()
    if not path.is_dir():
        raise common.BenchmarkError(f"--data {root}: no such folder")
    if kind is not None and (kind not in DATASET_KINDS or kind == "synthetic"):
        raise common.BenchmarkError(f"--dataset: unknown kind {kind!r}; choose from "
                                    f"{', '.join(k for k in DATASET_KINDS if k != 'synthetic')}")
    ds = load_dataset(DataConfig(dataset=kind or detect_kind(path), root=str(path), limit=limit), progress=False)
    return (path.resolve().name or "data"), ds.table


def image_dims(paths: list[str], sample: int = 256) -> str:
    """Median width x height of the set (of ``sample`` images spread over it), e.g. ``600x450``."""
    from PIL import Image

    if len(paths) > sample:
        paths = [paths[i * len(paths) // sample] for i in range(sample)]
    dims = []
    for p in paths:
        with Image.open(p) as im:
            dims.append(im.size)
    w = statistics.median(d[0] for d in dims)
    h = statistics.median(d[1] for d in dims)
    return f"{int(w)}x{int(h)}"


def make_loader(backend: str, table, cfg, image_size: int, device: torch.device):
    """The training loader of ``backend``: the library's through :func:`fastlesion.data.loader.build_loader`, as
    training builds it, a peer's through :class:`PeerLoader`; batches land on ``device`` for dali-gpu and for
    torchvision-decode with CUDA, on the CPU for the rest."""
    if backend in PEERS + BOUNDS:
        return PeerLoader(backend, table, cfg, image_size, device)
    from fastlesion.data.loader import build_loader

    return build_loader(table, cfg, image_size, train=True, device=device if backend == "dali-gpu" else "cpu")


# ------------------------------------------------------------------------------------------------------ peers
def augmentation(cfg) -> str:
    """The augmentation every row runs, in words: ``rrc(0.35-1, 0.75-1.33) hflip 0.5 vflip 0.5 rotate 30 jitter
    (0.2, 0.2, 0.2, 0.02) normalise``."""
    from fastlesion.data.transforms import jitter

    j = jitter(cfg)
    parts = [f"rrc({cfg.scale[0]:g}-{cfg.scale[1]:g}, {cfg.ratio[0]:.3g}-{cfg.ratio[1]:.3g})"]
    parts += [f"{k} {getattr(cfg, k):g}" for k in ("hflip", "vflip") if getattr(cfg, k) > 0]
    if j["rotate"] > 0:
        parts.append(f"rotate {j['rotate']:g}")
    if any(j[k] > 0 for k in ("brightness", "contrast", "saturation", "hue")):
        parts.append("jitter(" + ", ".join(f"{j[k]:g}" for k in ("brightness", "contrast", "saturation", "hue"))
                     + ")")
    return " ".join(parts + ["normalise"])


def peer_transforms(cfg, image_size: int, crop: bool = True):
    """The v2 pipeline of the peers with ``cfg``'s augmentation: the library's own plain builder
    (:func:`fastlesion.data.transforms.train_transform`: RandomResizedCrop unless ``crop`` is False, as pil-draft
    crops itself, flips, rotation and colour jitter where their strength is above 0, ToImage, ToDtype(float32,
    scale=True), Normalize), so the ``pil`` peer and the ``torch-plain`` loader run the same transforms."""
    from fastlesion.data.transforms import train_transform

    return train_transform(cfg, image_size, crop=crop)


def draft_factor(crop_short_side: int, image_size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that leaves a crop whose shorter side is ``crop_short_side``
    original pixels at least ``image_size`` pixels."""
    return next(f for f in DRAFT_FACTORS if crop_short_side / f >= image_size or f == 1)


def draft_open(path: str, image_size: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """pil-draft's decode: draw the random resized crop on the original size first (the distribution of
    ``RandomResizedCrop``), then decode the JPEG at the smallest DCT scale (``Image.draft``) that still leaves the
    crop >= ``image_size`` pixels on both sides. Returns ``(RGB image as decoded, (top, left, height, width) of the
    crop in the decoded image, reduction factor asked for)``."""
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    with Image.open(path) as im:
        width, height = im.size
        top, left, h, w = RandomResizedCrop.get_params(im, list(scale), list(ratio))
        factor = draft_factor(min(h, w), image_size)
        if factor > 1:  # PIL picks scale = min(W // req_w, H // req_h) >= factor (== factor for real sizes)
            im.draft("RGB", (width // factor, height // factor))
        img = im.convert("RGB")
    sx, sy = img.width / width, img.height / height
    h2, w2 = min(img.height, max(1, round(h * sy))), min(img.width, max(1, round(w * sx)))
    top2, left2 = min(round(top * sy), img.height - h2), min(round(left * sx), img.width - w2)
    return img, (top2, left2, h2, w2), factor


def decode_only(path: str, image_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """decode-bound's item: the ``torch`` row's decode of the crop's window
    (:func:`fastlesion.data.decode.decode_window`: the DCT scale that keeps the crop at least ``image_size`` pixels,
    down to its bottom edge; a whole decode by libjpeg-turbo where it needs scale 1), dropped; an empty tensor goes
    through the DataLoader."""
    from PIL import Image

    from fastlesion.data import decode

    with Image.open(path) as im:
        decode.decode_window(im, image_size, scale, ratio, path=path)
    return torch.empty(0)


class PeerImages(torch.utils.data.Dataset):
    """Item ``i`` of a peer: ``(CHW float tensor, label, i)``; for torchvision-decode on the GPU ``(the file's
    bytes, label, i)``, decoded by the loader a batch at a time."""

    def __init__(self, peer: str, paths: list[str], labels, cfg, image_size: int, gpu: bool = False) -> None:
        self.peer, self.paths, self.labels, self.gpu = peer, paths, labels, gpu
        self.image_size, self.scale, self.ratio = image_size, tuple(cfg.scale), tuple(cfg.ratio)
        self.transform = None if gpu or peer in BOUNDS else peer_transforms(cfg, image_size, crop=peer != "pil-draft")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path, label = self.paths[i], int(self.labels[i])
        if self.peer == "pil":
            from PIL import Image

            with Image.open(path) as im:
                return self.transform(im.convert("RGB")), label, i
        if self.peer == "pil-draft":
            from torchvision.transforms.v2 import functional as F

            img, (top, left, h, w), _ = draft_open(path, self.image_size, self.scale, self.ratio)
            img = F.resized_crop(img, top, left, h, w, [self.image_size, self.image_size], antialias=True)
            return self.transform(img), label, i
        if self.peer == "decode-bound":
            return decode_only(path, self.image_size, self.scale, self.ratio), label, i
        if self.gpu:  # plain bytes: pickled through the worker queue (a list of tensors would go as shared-memory
            return Path(path).read_bytes(), label, i  # file descriptors, one per image, and read_file's fail there)
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

        data = read_file(path)
        jpeg = data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8
        img = (decode_jpeg if jpeg else decode_image)(data, mode=ImageReadMode.RGB)
        return self.transform(img), label, i


def _bytes_collate(items):
    data, labels, idx = zip(*items)
    return list(data), torch.tensor(labels, dtype=torch.int64), torch.tensor(idx, dtype=torch.int64)


class _OrderSampler(torch.utils.data.Sampler):
    """This epoch's shard of the order (set by :meth:`PeerLoader.set_epoch`)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PeerLoader:
    """A peer in the loader contract the benchmark times: ``for x, y, idx in loader``, ``len``, ``set_epoch``,
    ``backend`` (the peer's name), ``device_name`` (where it decodes). A torch DataLoader with ``cfg.workers``
    workers, ``cfg.prefetch`` batches each and the library's epoch orders and batch bookkeeping
    (:class:`~fastlesion.data.loader.ShardedLoader`), so only the decoding and augmenting code differs."""

    def __init__(self, peer: str, table, cfg, image_size: int, device: torch.device) -> None:
        from fastlesion.data.loader import ShardedLoader

        self.backend = peer
        self.gpu = peer == "torchvision-decode" and torch.device(device).type == "cuda"
        self.device_name = "gpu" if self.gpu else "cpu"
        self.device = torch.device(device) if self.gpu else torch.device("cpu")
        self.orders = ShardedLoader(table, cfg, train=True, device=self.device, image_size=image_size)
        self.batch_size, self.workers = self.orders.batch_size, self.orders.workers
        self.image_size = image_size
        self.transform = peer_transforms(cfg, image_size) if self.gpu else None
        dataset = PeerImages(peer, table["path"].tolist(), self.orders.labels, cfg, image_size, gpu=self.gpu)
        self.sampler = _OrderSampler()
        self.set_epoch(0)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
            drop_last=self.orders.drop_last, persistent_workers=self.workers > 0,
            prefetch_factor=self.orders.prefetch if self.workers > 0 else None,
            collate_fn=_bytes_collate if self.gpu else None)

    def __len__(self) -> int:
        return len(self.orders)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.indices = self.orders.shard(self.orders.draw_order(epoch)).tolist()

    def __iter__(self):
        for x, y, idx in self.loader:
            if self.gpu:
                x = self.decode_gpu(x)
            yield x, y, idx

    def decode_gpu(self, data: list[bytes]) -> torch.Tensor:
        """A batch of JPEG files' bytes -> uint8 tensors -> nvJPEG's batched decode on the GPU
        (``decode_jpeg(list, device="cuda")``) -> the v2 transforms per sample there, stacked."""
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        return torch.stack([self.transform(img) for img in images])


def time_epoch(loader, epoch: int, warmup: int, device: torch.device) -> tuple[float, int, common.CpuMeter]:
    """(images/s, images timed, CPU meter of the timed part) of one epoch, after dropping ``warmup`` batches.

    The meter covers this process tree (DALI threads, DataLoader worker processes), read at the last batch,
    before the workers go idle.
    """
    loader.set_epoch(epoch)
    meter = common.CpuMeter()
    images, t0 = 0, None

    def start() -> float:
        common.sync(device)
        meter.start()
        return time.perf_counter()

    if warmup == 0:
        t0 = start()
    for i, (x, _, _) in enumerate(loader):
        if i + 1 == warmup:
            t0 = start()
        elif i + 1 > warmup:
            images += x.shape[0]
    common.sync(device)
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    meter.stop()
    if t0 is None or images == 0:
        raise common.BenchmarkError(f"an epoch of {len(loader)} batches is too short for --warmup {warmup}: "
                                    "raise --n or lower --warmup")
    return images / elapsed, images, meter


def _median(values: list[Any]) -> Any:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def resolve_backends(text: str, device: torch.device) -> tuple[list[str], list[str]]:
    """The backends asked for that can run here (torch always: the ratio needs it), and notes on the rest."""
    from fastlesion.data.loader import dali_available

    backends = common.split_list(text)
    bad = [b for b in backends if b not in BACKENDS + BOUNDS]
    if bad or not backends:
        raise common.BenchmarkError(f"--backends: unknown {bad or text!r}; choose from "
                                    f"{', '.join(BACKENDS + BOUNDS)}")
    notes = []
    if not dali_available() and any(b.startswith("dali") for b in backends):
        notes.append("NVIDIA DALI is not installed: only the torch loader is measured")
        backends = [b for b in backends if not b.startswith("dali")]
    if "dali-gpu" in backends and device.type != "cuda":
        notes.append("dali-gpu left out: no GPU")
        backends.remove("dali-gpu")
    if "torch" not in backends:
        backends.insert(0, "torch")  # the ratio needs it
    return backends, notes


def default_backend(device: torch.device, table=None, image_size: int = 224, aug_strength: float = 1.0) -> str:
    """The row of the library's default loader, what ``loader.backend=auto`` picks for ``table`` here with
    ``loader.aug_strength`` (:func:`fastlesion.data.loader.choose_backend`): dali-gpu with CUDA and DALI; on CPU
    torch (DCT-scaled decoding) for large images or crops and flips only, else dali-cpu; torch without DALI."""
    import pandas as pd

    from fastlesion.config import LoaderConfig
    from fastlesion.data.loader import choose_backend

    cfg = LoaderConfig(device="gpu" if device.type == "cuda" else "cpu", aug_strength=aug_strength)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-DALI warning: the rows' notes say it
        backend, _ = choose_backend(cfg, table if table is not None else pd.DataFrame({"path": []}), image_size)
    return f"dali-{cfg.device}" if backend == "dali" else "torch"


def peer_ratios(rows: list[dict[str, Any]], default: str) -> list[str]:
    """Set ``best_peer``, ``vs_best_peer``, ``vs_pil`` and ``vs_decode_bound`` in ``rows`` (one scale's; None where
    that row was not measured) and return the scale's summary lines: with those rows ``large: default torch vs pil:
    3.50x`` and ``large: default torch vs decode-bound: 0.85x (decode-bound vs pil: 4.10x)``, and always last
    ``large: default torch vs best peer pil-draft: 1.02x``."""
    peers = [r for r in rows if r["mode"] in PEERS]
    best = max(peers, key=lambda r: r["images_per_s"]) if peers else None
    pil = next((r for r in rows if r["mode"] == "pil"), None)
    bound = next((r for r in rows if r["mode"] == "decode-bound"), None)
    for r in rows:
        r["best_peer"] = best["mode"] if best else None
        r["vs_best_peer"] = round(r["images_per_s"] / best["images_per_s"], 3) if best else None
        r["vs_pil"] = round(r["images_per_s"] / pil["images_per_s"], 3) if pil else None
        r["vs_decode_bound"] = round(r["images_per_s"] / bound["images_per_s"], 3) if bound else None
        r["default_backend"] = default
    scale = rows[0]["image_scale"] if rows else "?"
    mine = next((r for r in rows if r["mode"] == default), None)
    if best is None:
        return [f"{scale}: default {default} vs best peer: no peer measured (add pil, pil-draft or "
                "torchvision-decode to --backends)"]
    if mine is None:
        return [f"{scale}: default {default} vs best peer {best['mode']}: {default} not measured"]
    lines = []  # the contract: each scale's summary ends with the default against the best peer
    if pil:
        lines.append(f"{scale}: default {default} vs pil: {mine['vs_pil']:.2f}x")
    if bound:
        lines.append(f"{scale}: default {default} vs decode-bound: {mine['vs_decode_bound']:.2f}x"
                     + (f" (decode-bound vs pil: {bound['vs_pil']:.2f}x)" if pil else ""))
    lines.append(f"{scale}: default {default} vs best peer {best['mode']}: {mine['vs_best_peer']:.2f}x")
    return lines


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also appended to ``--out``)."""
    args = parse_args(argv)
    from fastlesion.data.catalog import cache_dir

    cache = Path(args.cache).expanduser() if args.cache else cache_dir() / "bench"
    scales = common.split_list(args.scales)
    bad = [s for s in scales if s not in SCALES]
    if bad or not scales:
        raise common.BenchmarkError(f"--scales: unknown scale {bad[0] if bad else args.scales!r} "
                                    f"(choose from {', '.join(SCALES)})")
    if args.aug_strength < 0:
        raise common.BenchmarkError(f"--aug-strength must be >= 0, got {args.aug_strength}")
    device = common.resolve_device(args.device)
    backends, run_notes = resolve_backends(args.backends, device)
    if device.type == "cpu":
        run_notes.append("no GPU: CPU rows")
    datasets = [catalog_dataset(args.data, args.dataset, args.n)] if args.data else None
    if datasets:
        scales = [args.scale_label or datasets[0][0]]
    torch.set_num_threads(max(1, args.threads))
    fast_idct = not args.no_fast_idct
    configs = {b: dataclasses.replace(common.loader_config(b if b in LIBRARY and b != "torch-plain" else "torch",
                                                           args.batch_size, args.threads, args.seed,
                                                           fast_idct=fast_idct),
                                      aug_strength=args.aug_strength, dct_scaling=b != "torch-plain")
               for b in backends}
    aug = augmentation(configs["torch"])
    summary: list[str] = []
    settings = dict(vars(args))
    settings.update(device_resolved=str(device), backends_resolved=backends, scales_resolved=scales,
                    argv=sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", "benchmarks/loader_throughput.py", *(argv or sys.argv[1:])])
    rows: list[dict[str, Any]] = []
    for scale in scales:
        if datasets:
            data = datasets[0][1]
            n = len(data)
        else:
            n = args.n or DEFAULT_N[scale]
            data = dataset(scale, n, args.seed, cache, args.threads)
        dims = image_dims(data["path"].tolist())
        default = default_backend(device, data, args.image_size, args.aug_strength)
        loaders = {b: make_loader(b, data, configs[b], args.image_size, device) for b in backends}
        runs: dict[str, list[float]] = {b: [] for b in backends}
        cpu_ms: dict[str, list[float]] = {b: [] for b in backends}
        cpu: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        timed: dict[str, int] = {}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for b in backends:
            for e in range(args.warmup_epochs):
                loaders[b].set_epoch(1000 + e)
                for _ in loaders[b]:
                    pass
        for r in range(args.repeats):
            for b in backends:  # interleaved: background load slows every backend alike
                ips, timed[b], meter = time_epoch(loaders[b], r, args.warmup, device)
                runs[b].append(ips)
                cpu_ms[b].append(1000 * meter.cpu_seconds / timed[b])
                cpu[b].append(meter.result)
                print(f"  {scale} {b} repeat {r + 1}/{args.repeats}: {ips:.1f} images/s, "
                      f"{cpu_ms[b][-1]:.1f} CPU ms/image", flush=True)
        kinds = {b: (loaders[b].backend, loaders[b].device_name) for b in backends}
        del loaders
        base = statistics.median(runs["torch"])
        scale_rows = []
        for b in backends:
            med = statistics.median(runs[b])
            name, loader_device = kinds[b]
            scale_rows.append({
                **common.base_row("loader_throughput", device, settings),
                "model": "loader", "mode": b, "backend": name,
                "device": loader_device,  # where the loader decodes (cpu / gpu), not the torch device
                "image_scale": scale, "image_dims": dims, "threads": args.threads,
                "batch_size": args.batch_size, "image_size": args.image_size, "images_per_s": round(med, 2),
                "runs_images_per_s": [round(v, 2) for v in runs[b]], "ratio_vs_torch": round(med / base, 3),
                "repeats": args.repeats, "warmup_batches": args.warmup,
                "warmup_epochs": args.warmup_epochs, "timed_images_per_repeat": timed[b],
                "cpu_ms_per_image": round(statistics.median(cpu_ms[b]), 2), "load_avg_1m_before": load,
                "n_images": n, "fast_idct": configs[b].fast_idct if name == "dali" else None,
                "dct_scaling": configs[b].dct_scaling if name == "torch" else None,
                "cpu_util_percent": _median([c["cpu_util_percent"] for c in cpu[b]]),
                "proc_cpu_percent": _median([c["proc_cpu_percent"] for c in cpu[b]]),
                "cpu_cores": cpu[b][0]["cpu_cores"],
                "command": command, "status": "ok", "error": None, "notes": "; ".join(run_notes),
                "peer": b in PEERS, "bound": b in BOUNDS, "augmentation": aug,
                "data_root": str(Path(args.data).expanduser().resolve()) if args.data else None,
            })
        summary += peer_ratios(scale_rows, default)
        common.append_jsonl(args.out, scale_rows)
        rows += scale_rows
    _print_results(rows, args)
    print(f"augmentation (every row): {aug}")
    common.print_notes(run_notes, rows, args.out)
    for line in summary:
        print(line)
    return rows


def _print_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = [[r["image_scale"], f"{r['image_dims']} x{r['n_images']}", r["mode"], r["device"], r["threads"],
              f"{r['images_per_s']:.1f}", f"{min(r['runs_images_per_s']):.1f}-{max(r['runs_images_per_s']):.1f}",
              f"{r['ratio_vs_torch']:.2f}x", "-" if r["vs_best_peer"] is None else f"{r['vs_best_peer']:.2f}x",
              f"{r['cpu_ms_per_image']:.1f}",
              "-" if r["proc_cpu_percent"] is None else f"{r['proc_cpu_percent']:.1f}"] for r in rows]
    common.print_table(f"loader throughput: train pipeline, {args.image_size}px, batch {args.batch_size}, "
                       f"{args.threads} threads/workers, median of {args.repeats}",
                       ["scale", "images", "backend", "device", "threads", "images/s", "range", "vs torch",
                        "vs best peer", "CPU ms/img", "proc CPU %"], table)
    if rows:
        fp = rows[0]["fingerprint"]
        print(f"machine: {rows[0]['machine']}, {fp.get('ram_gb')} GB RAM; torch {fp.get('torch')}, "
              f"DALI {fp.get('dali')}")


def main(argv: list[str] | None = None) -> int:
    return common.run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
