"""``fastlesion prepare``: a resized copy of a dataset (the 23 GB ISIC originals become a ~1 GB set at 512 px).

The copy keeps the layout — the same relative paths and the same CSV files — so the catalog reads ``DST`` with the
same dataset kind as ``SRC``. JPEGs are decoded at reduced size first (PIL draft mode: libjpeg DCT scaling by 1/2,
1/4 or 1/8, never below the target), which makes a 6000x4000 original about 10x cheaper than a full decode, then
resized exactly (Lanczos) and written with the EXIF orientation applied.

* ``mode="shorter"`` — the shorter side becomes ``size``, the aspect ratio is kept; images already that small are
  copied byte for byte (never upscaled).
* ``mode="square"`` — every image becomes ``size x size`` (the aspect ratio is not kept, like the popular
  pre-resized ISIC sets).

Runs are resumable and atomic per file: each image is written to ``<name>.tmp`` in its folder and renamed into
place, so an interrupted run leaves no half-written image under its final name, and a second run skips the files
that exist and are newer than their source. ``DST/.fastlesion_prepare.json`` records the parameters; a ``DST``
prepared with other parameters is refused. CSV files are written last: ``train.csv``/``test.csv`` (isic2020; the
challenge download's ground-truth and test metadata CSVs), the ground-truth and metadata CSVs (isic2019), the
metadata CSV (ham10000), and ``prepared.csv`` (``path,label,group``, paths relative to ``DST``; ``mask`` too for a
segmentation csv set) for the csv and folder kinds.

Segmentation sets (isic2018-seg, with its Training / Validation / Test folders, or a csv set with
``task="segmentation"``) have their masks resized alongside, with nearest neighbour (:func:`resize_mask_file`), to
exactly the size the image gets (EXIF orientation included), so the values stay those of the source (0 and 255) and
the copy loads as the same kind.

Example:
    >>> result = prepare("/data/isic2020", "/data/isic2020-512", size=512)  # doctest: +SKIP
    >>> result.done, result.skipped, result.failed  # doctest: +SKIP
    (33126, 0, [])
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from fastlesion.config import DATASET_KINDS, DataConfig
from fastlesion.data import catalog
from fastlesion.data.exif import orientation
from fastlesion.errors import DatasetError

MODES = ("shorter", "square")
MARKER = ".fastlesion_prepare.json"
PREPARED_CSV = "prepared.csv"
PARALLEL_MIN_FILES = 8
"""Fewer files than this (or ``workers == 1``) are resized in-process."""

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP"}
_T = Image.Transpose
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
              7: _T.TRANSVERSE, 8: _T.ROTATE_90}  # EXIF orientation -> transpose that undoes it (as ImageOps)


@dataclass
class PrepareResult:
    """What :func:`prepare` did."""

    out: Path
    kind: str
    size: int
    mode: str
    total: int = 0
    done: int = 0  # images written (resized, or copied when already small enough)
    skipped: int = 0  # already there from an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    missing: list[str] = field(default_factory=list)  # listed by a CSV, not on disk
    csv_files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    masks: int = 0  # segmentation sets: masks written or already there (their failures are in ``failed``)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing

    def summary(self) -> str:
        """One line for the CLI."""
        masks = f" and {self.masks} masks" if self.masks else ""
        line = (f"prepared {self.total} images{masks} of {self.kind} into {self.out} ({self.mode} {self.size}px): "
                f"{self.done} written, {self.skipped} already done, {len(self.failed)} failed in {self.seconds:.1f}s")
        if self.failed:
            line += f"; first failure: {self.failed[0][0]} ({self.failed[0][1]})"
        if self.missing:
            line += f"; {len(self.missing)} listed image(s) missing (first: {self.missing[0]})"
        return line


def target_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """Output (width, height): the shorter side scaled to ``size`` (never up), or ``size x size``."""
    if mode == "square":
        return size, size
    short = min(width, height)
    if short <= size:
        return width, height
    scale = size / short
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return (size, h) if width <= height else (w, size)


def resize_file(src: str, dst: str, size: int, mode: str = "shorter", quality: int = 95) -> tuple[str, str]:
    """Resize one image ``src`` into ``dst`` atomically (``dst.tmp`` then rename).

    Returns:
        ``("done", "")``, ``("copied", "")`` when the source was already small enough, or ``("failed", reason)``.
    """
    tmp = dst + ".tmp"
    try:
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        with Image.open(src) as im:
            w, h = im.size
            tw, th = target_size(w, h, size, mode)
            if (tw, th) == (w, h) and orientation(im) in (0, 1):
                im.close()
                _copy_atomic(Path(src), Path(dst))
                return "copied", ""
            if im.format == "JPEG":
                im.draft("RGB", (tw, th))  # DCT scaling: decode at 1/2, 1/4 or 1/8 size, still >= target
            icc = im.info.get("icc_profile")
            img = im.convert("RGB") if im.mode not in ("RGB", "L") else im
            if img.size != (tw, th):
                img = img.resize((tw, th), Image.Resampling.LANCZOS)
            orient = orientation(im)
            if orient in _TRANSPOSE:  # bake the EXIF orientation in (the copy is written without EXIF)
                img = img.transpose(_TRANSPOSE[orient])
            fmt = _FORMATS.get(os.path.splitext(dst)[1].lower(), "JPEG")
            opts: dict[str, Any] = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
            if icc:
                opts["icc_profile"] = icc
            img.save(tmp, format=fmt, **opts)
        os.replace(tmp, dst)
        return "done", ""
    except Exception as e:  # noqa: BLE001 - reported per file, the run goes on
        return _failed(tmp, e)


def resize_mask_file(src: str, dst: str, image: str, size: int, mode: str = "shorter") -> tuple[str, str]:
    """Resize the mask ``src`` of ``image`` into ``dst`` atomically, with nearest neighbour (values stay as stored).

    The mask gets the size :func:`resize_file` gives the image (its target size, turned like the image when its
    EXIF orientation rotates it by 90 degrees); a mask whose size already is that is copied byte for byte.

    Returns:
        ``("done", "")``, ``("copied", "")`` or ``("failed", reason)``.
    """
    tmp = dst + ".tmp"
    try:
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        with Image.open(image) as im:
            w, h = im.size
            tw, th = target_size(w, h, size, mode)
            if orientation(im) in (5, 6, 7, 8):
                tw, th = th, tw
        with Image.open(src) as m:
            if m.size == (tw, th):
                m.close()
                _copy_atomic(Path(src), Path(dst))
                return "copied", ""
            out = m.resize((tw, th), Image.Resampling.NEAREST)
            fmt = _FORMATS.get(os.path.splitext(dst)[1].lower(), "PNG")
            out.save(tmp, format=fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, dst)
        return "done", ""
    except Exception as e:  # noqa: BLE001 - reported per file, the run goes on
        return _failed(tmp, e)


def _failed(tmp: str, e: Exception) -> tuple[str, str]:
    """``("failed", "<type>: <first line>")`` for a file that could not be written; its temp file is removed."""
    try:
        os.remove(tmp)
    except OSError:
        pass
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return "failed", f"{type(e).__name__}: {reason}"



def _resize_job(job: tuple[str, str, int, str, int, str | None]) -> tuple[str, str]:
    """One image (``job[5]`` None) or one mask (``job[5]``: its image)."""
    src, dst, size, mode, quality, image = job
    if image is None:
        return resize_file(src, dst, size, mode, quality)
    return resize_mask_file(src, dst, image, size, mode)


# ------------------------------------------------------------------------------------------------- layouts
def _sources(src: Path, kind: str, data: DataConfig | None,
             task: str = "classification",
             ) -> tuple[list[str], list[str], list[Path], pd.DataFrame | None, dict[str, str] | None]:
    """(image paths, missing paths, CSV files to copy verbatim, table for prepared.csv, ``{image: mask}`` of a
    segmentation set) of a dataset root."""
    if kind == "isic2020":  # Kaggle (train.csv, test.csv) or the ISIC challenge download (ground-truth CSVs)
        ds = catalog.load_isic2020(src, strict=False)
        paths, missing = ds.table["path"].tolist(), list(ds.missing)
        csvs = [c for c in (catalog.isic2020_train_csv(src), catalog.isic2020_test_csv(src)) if c is not None]
        if catalog.isic2020_test_csv(src) is not None:
            test = catalog.load_isic2020_test(src, strict=False)  # missing test images: reported, the rest done
            paths += test["path"].tolist()
            missing += test.attrs["missing"]
        return paths, missing, csvs, None, None
    if kind == "isic2019":
        ds = catalog.load_isic2019(src, strict=False)
        csvs = [c for c in (catalog._isic_csv(src, (catalog.ISIC2019_TRUTH_CSV,)),
                            catalog._isic_csv(src, (catalog.ISIC2019_META_CSV,))) if c is not None]
        return ds.table["path"].tolist(), list(ds.missing), csvs, None, None
    if kind == "ham10000":
        ds = catalog.load_ham10000(src, strict=False)
        csv = next(p for p in src.glob("*.csv") if p.name.lower() == "ham10000_metadata.csv")
        return ds.table["path"].tolist(), list(ds.missing), [csv], None, None
    if kind == "isic2018-seg":
        ds = catalog.load_isic2018_seg(src, strict=False)
        masks = dict(zip(ds.table["path"], ds.table["mask"], strict=True))
        return ds.table["path"].tolist(), list(ds.missing), [], None, masks
    if kind == "folder":
        ds = catalog.load_folder(src, strict=False)
        table = ds.table.assign(label=[ds.classes[i] for i in ds.table["label"]])
        return ds.table["path"].tolist(), [], [], table, None
    if kind == "csv":
        if data is None:
            raise DatasetError("prepare: the csv dataset kind needs its data config (data.csv, path/label columns)")
        data = DataConfig(**{**data.__dict__, "root": str(src), "dataset": "csv"})
        ds = catalog.load_csv(src, data, strict=False, task=task)
        table = ds.table.assign(label=[ds.classes[i] for i in ds.table["label"]])
        masks = dict(zip(ds.table["path"], ds.table["mask"], strict=True)) if ds.task == "segmentation" else None
        return ds.table["path"].tolist(), list(ds.missing), [], table, masks
    raise DatasetError(f"prepare: cannot prepare the {kind!r} dataset kind (use isic2020, ham10000, isic2018-seg, csv "
                       "or folder)")


def _relative(path: str, src: Path) -> Path:
    p = Path(path)
    for root in (src, src.resolve()):
        try:
            return p.relative_to(root)
        except ValueError:
            continue
    try:
        return p.resolve().relative_to(src.resolve())
    except ValueError:
        raise DatasetError(f"{path}: image is outside the source folder {src}") from None


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through ``dst.tmp`` and a rename, so ``dst`` is never half written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _check_marker(out: Path, params: dict[str, Any]) -> None:
    """Refuse a ``DST`` prepared with other parameters; record ours (before any image is written)."""
    marker = out / MARKER
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = {}
        keys = ("size", "mode", "quality")
        if isinstance(old, dict) and any(old.get(k) != params[k] for k in keys):
            raise DatasetError(f"{out}: was prepared with " + ", ".join(f"{k}={old.get(k)}" for k in keys)
                               + "; choose another --out folder (or delete it)")
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, marker)


def _is_done(src: str, dst: str) -> bool:
    """An output under its final name is complete (atomic rename); redo it only if the source is newer."""
    try:
        return os.stat(dst).st_mtime >= os.stat(src).st_mtime
    except OSError:
        return False


def _progress(results: Iterator[tuple[str, str]], total: int, title: str, enabled: bool) -> Iterator[tuple[str, str]]:
    if not enabled:
        yield from results
        return
    from rich import progress as rp
    from rich.console import Console

    columns = (rp.TextColumn(title), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
               rp.TextColumn("eta"), rp.TimeRemainingColumn())
    with rp.Progress(*columns, console=Console(stderr=True), auto_refresh=False) as bar:
        task = bar.add_task("prepare", total=total)
        last = 0.0
        for r in results:
            yield r
            bar.advance(task)
            if time.monotonic() - last > 0.1:
                bar.refresh()
                last = time.monotonic()
        bar.refresh()


def _run(jobs: list[tuple[str, str, int, str, int, str | None]], workers: int) -> Iterator[tuple[str, str]]:
    if workers <= 1 or len(jobs) < PARALLEL_MIN_FILES:
        for j in jobs:
            yield _resize_job(j)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunksize = max(1, min(16, len(jobs) // (workers * 8)))
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            yield from ex.map(_resize_job, jobs, chunksize=chunksize)
    except cf.process.BrokenProcessPool:
        raise DatasetError("prepare: a worker process died (a decoder crash?); run `fastlesion check` on the "
                           "source, then run prepare again: it resumes where it stopped") from None


# ------------------------------------------------------------------------------------------------- entry point
def prepare(src: str | Path, out: str | Path, size: int = 512, mode: str = "shorter", dataset: str | None = None,
            workers: int = 0, progress: bool = True, quality: int = 95,
            data: DataConfig | None = None, task: str = "classification") -> PrepareResult:
    """Write a resized copy of the dataset at ``src`` into ``out`` (same layout and CSVs, resumable).

    Args:
        src: dataset root.
        out: destination root (created; must not be ``src`` nor inside it).
        size: target size in pixels (the shorter side, or the side of the square).
        mode: ``shorter`` (keep the aspect ratio, never upscale) or ``square`` (``size x size``).
        dataset: layout kind (isic2020 | ham10000 | isic2018-seg | csv | folder); None = detected
            (:func:`catalog.detect_kind`).
        workers: processes (0 = ``os.cpu_count()``, 1 = in-process).
        progress: draw a rich progress bar on stderr.
        quality: JPEG quality of the written images.
        data: the csv kind's settings (``csv``, ``path_col``, ``label_col``, ``group_col``, ``mask_col``).
        task: ``segmentation`` reads a csv set's masks (``data.mask_col``) and resizes them too (isic2018-seg
            always has masks).

    Returns:
        A :class:`PrepareResult` (counts, failures naming each file, CSVs written).

    Raises:
        DatasetError: on a bad source, size, mode or destination.
    """
    t0 = time.perf_counter()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if mode not in MODES:
        raise DatasetError(f"prepare: mode {mode!r} is not one of {MODES}")
    if size < 8:
        raise DatasetError(f"prepare: size must be >= 8, got {size}")
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder not found")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DatasetError(f"{out}: the destination must be outside the source folder {src}")
    kind = dataset or catalog.detect_kind(src)
    if kind not in DATASET_KINDS or kind == "synthetic":
        raise DatasetError(f"prepare: unknown dataset kind {kind!r} (use isic2020, isic2019, ham10000, isic2018-seg, "
                           "csv or folder)")
    paths, missing, csvs, table, masks = _sources(src, kind, data, task)
    out.mkdir(parents=True, exist_ok=True)
    _check_marker(out, {"size": size, "mode": mode, "quality": quality, "kind": kind, "source": str(src.resolve())})

    result = PrepareResult(out=out, kind=kind, size=size, mode=mode, total=len(paths), missing=missing)
    jobs: list[tuple[str, str, int, str, int, str | None]] = []
    for p in paths:
        dst = str(out / _relative(p, src))
        if _is_done(p, dst):
            result.skipped += 1
        else:
            jobs.append((p, dst, size, mode, quality, None))
    for p, m in (masks or {}).items():  # each mask gets the size its image gets (read from the source image)
        if not os.path.isfile(m):
            result.missing.append(m)
            continue
        dst = str(out / _relative(m, src))
        if _is_done(m, dst) and _is_done(p, dst):  # redone when its image is newer too (its size may change)
            result.masks += 1
        else:
            jobs.append((m, dst, size, mode, quality, p))
    workers = workers or os.cpu_count() or 1
    for (p, *_, image), (status, reason) in zip(jobs, _progress(_run(jobs, workers), len(jobs),
                                                                f"resizing to {size}px", progress and bool(jobs)),
                                                strict=True):
        if status == "failed":
            result.failed.append((p, reason))
        elif image is None:
            result.done += 1
        else:
            result.masks += 1

    for csv in csvs:  # the CSVs last: a half-prepared copy is not mistaken for a finished one
        _copy_atomic(csv, out / _relative(str(csv), src))
        result.csv_files.append(out / _relative(str(csv), src))
    if table is not None:
        rel = [str(_relative(p, src)) for p in table["path"]]
        frame = pd.DataFrame({"path": rel, "label": table["label"].values, "group": table["group"].values})
        if masks is not None:
            frame["mask"] = [str(_relative(m, src)) for m in table["mask"]]
        tmp = out / (PREPARED_CSV + ".tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, out / PREPARED_CSV)
        result.csv_files.append(out / PREPARED_CSV)
    result.seconds = time.perf_counter() - t0
    return result
