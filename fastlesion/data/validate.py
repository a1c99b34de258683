"""Dataset checker behind ``fastlesion check``: decode every image once, report what would crash a long run.

NVIDIA DALI aborts the whole pipeline on one corrupt file, hours into training. :func:`run_check` decodes every
image up front (in parallel, with a progress bar), writes ``check_report.csv`` (one row per problem) and
``exclude.txt`` (one path a line), which training honours through the config option ``data.exclude_file``.

Problems (:data:`PROBLEMS`), decided from the raw bytes, PIL's header parse and one strict full decode
(:func:`strict_decode`: libjpeg-turbo through torchvision, its warnings treated as errors; PIL's ``load()`` where
that decoder is unavailable or fails):

* ``missing``   — listed by the dataset but not on disk;
* ``empty``     — 0 bytes;
* ``not_jpeg``  — does not start with the JPEG SOI marker ``FF D8 FF`` (the detail names what it is: png, gif, ...);
* ``truncated`` — the data ends before the EOI marker ``FF D9`` (or inside the headers), or the decoder reports
  truncation ("Premature end of JPEG file");
* ``corrupt``   — an invalid marker structure, PIL cannot open it, it cannot be fully decoded, or libjpeg-turbo
  *warns* while decoding it (corrupt scan data, e.g. "Corrupt JPEG data: 49 extraneous bytes before marker 0xd9",
  "bad Huffman code"): such a file still decodes, to wrong pixels, in PIL and in DALI, so it is excluded too;
* ``cmyk``      — mode CMYK (Adobe CMYK/YCCK JPEGs);
* ``grayscale`` — mode L, LA, 1, I or F;
* ``duplicate`` — the same bytes (sha1) as an earlier file in sorted path order; the detail names that first copy.

Segmentation sets (a table with a ``mask`` column) have their masks checked too (:func:`check_mask`), each report
row naming the mask file:

* ``mask_missing``    — the image's mask file does not exist;
* ``mask_corrupt``    — the mask cannot be opened or fully decoded;
* ``mask_size``       — the mask's width x height differs from its image's (as the loaders see the image: turned
  upright by its EXIF orientation);
* ``mask_not_binary`` — more values than 0 and one other (anti-aliased or JPEG-compressed edges, a soft mask): the
  loaders read a pixel above 127 as lesion (above 0 in a mask whose values are at most 127, e.g. 0/1 masks:
  :func:`fastlesion.data.transforms.binarize_mask`), so such masks are reported and kept unless
  ``exclude_nonbinary``.

The first three exclude the mask's image from training (``exclude.txt`` lists the mask, and the catalog drops the
row whose image or mask is listed).

Notes (:data:`NOTES`), report rows that exclude nothing:

* ``oriented``  — the file carries an EXIF orientation tag other than 1: both loaders (PIL through
  ``ImageOps.exif_transpose``, DALI through ``adjust_orientation``) turn it upright, as cameras and viewers do; the
  count is in the summary, so a set whose stored pixels are already upright but tagged otherwise can be spotted.

Progressive JPEGs are fine. ``cmyk`` and ``grayscale`` files are excluded by default (``exclude_color=True``):
DALI decodes them with a different channel count / colour path than the rest of the set, so a batch mixing them
either fails or silently trains on wrong colours.

Example:
    >>> result = run_check(paths, out_dir="runs/check", root="/data/isic2020")  # doctest: +SKIP
    >>> print(format_summary(result))  # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

from fastlesion.data.exif import orientation as exif_orientation
from fastlesion.errors import DatasetError

MASK_PROBLEMS = ("mask_missing", "mask_corrupt", "mask_size", "mask_not_binary")
"""Problems of a segmentation set's mask files (the report row names the mask)."""

PROBLEMS = ("missing", "empty", "truncated", "corrupt", "not_jpeg", "cmyk", "grayscale", "duplicate", *MASK_PROBLEMS)
"""Every problem name, in report order."""

NOTES = ("oriented",)
"""Report rows that are notes, not problems: the file is fine and never excluded."""

_ORIENTATIONS = {2: "mirrored", 3: "upside down", 4: "flipped vertically", 5: "transposed",
                 6: "rotated 90 degrees clockwise to display", 7: "transversed",
                 8: "rotated 90 degrees counter-clockwise to display"}

FATAL = ("missing", "empty", "truncated", "corrupt", "not_jpeg")
"""Problems that always exclude a file (it cannot be decoded as a JPEG)."""

COLOR = ("cmyk", "grayscale")
"""Problems that exclude a file only when ``exclude_color`` is true."""

MASK_FATAL = ("mask_missing", "mask_corrupt", "mask_size")
"""Mask problems that always exclude the row (no mask, or one that does not fit its image); ``mask_not_binary``
excludes only when ``exclude_nonbinary`` is true."""

COLUMNS = ("path", "problem", "detail", "size_bytes", "width", "height", "mode", "format")
"""Columns of the report, in order."""

REPORT_NAME = "check_report.csv"
EXCLUDE_NAME = "exclude.txt"
PARALLEL_MIN_FILES = 32
"""Fewer files than this (or ``workers <= 1``) are checked in-process."""

_CMYK_MODES = {"CMYK", "YCCK"}
_GRAY_MODES = {"L", "LA", "1", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_MAX_DETAIL = 200
_DUP_PREFIX = "same bytes (sha1) as "
# Magic bytes -> format name, for files that are not JPEG.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (0, b"\xff\x4f\xff\x51", "jpeg2000"),
    (0, b"\xff\x0a", "jpegxl"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpegxl"),
    (0, b"%PDF", "pdf"),
    (0, b"<", "html/xml"),
)
_FTYP: dict[bytes, str] = {b"heic": "heic", b"heix": "heic", b"mif1": "heif", b"msf1": "heif", b"avif": "avif",
                           b"avis": "avif"}


# ----------------------------------------------------------------------------------------------- strict decode
class _Captured:
    text = ""


@contextlib.contextmanager
def captured_stderr() -> Iterator[_Captured]:
    """Capture what C libraries write to file descriptor 2 (libjpeg's warnings, DALI's log) during the block.

    The text is in the yielded object's ``text`` after the block; nothing of it reaches the terminal. Python's
    ``sys.stderr`` is flushed first, so nothing written before the block is captured.
    """
    captured = _Captured()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (closed by a daemon): nothing to capture
        yield captured
        return
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                captured.text = tmp.read().decode("utf-8", errors="replace")
    finally:
        os.close(saved)


@functools.cache
def _strict_decoder() -> Callable[[bytes], Any] | None:
    """torchvision's libjpeg-turbo JPEG decoder (None where it is unavailable): it prints libjpeg's warnings to
    stderr (see :func:`strict_decode`) where PIL swallows them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - no torchvision image support: PIL's decode only
        return None

    def decode(data: bytes) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice of its image decoders
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)

    return decode


def strict_decode(data: bytes) -> tuple[str, str] | None:
    """Fully decode JPEG ``data`` with libjpeg-turbo, treating its warnings as errors.

    libjpeg-turbo (behind PIL, torchvision and DALI's CPU decoder) only *warns* about damaged entropy-coded data
    ("Corrupt JPEG data: N extraneous bytes before marker 0xd9", "bad Huffman code", "Premature end of JPEG
    file") and returns an image with wrong pixels; PIL drops the warning, DALI prints it without the file name.
    Here the decoder's stderr is captured and any warning makes the file bad.

    Returns:
        None when the data decodes cleanly (or no strict decoder is available); ``("decode_error", message)``
        when the decoder fails outright (the caller classifies it with PIL); ``(problem, detail)`` with problem
        ``truncated`` or ``corrupt`` when it decodes with a warning.
    """
    decode = _strict_decoder()
    if decode is None:
        return None
    with captured_stderr() as err:
        try:
            decode(data)
        except Exception as e:  # noqa: BLE001 - any decoder failure
            failure: BaseException | None = e
        else:
            failure = None
    if failure is not None:  # "decode_jpeg, /path/decode_jpeg.cpp:171, Image is incomplete or truncated"
        return "decode_error", _clip(" ".join(str(failure).split()).rsplit(".cpp:", 1)[-1].split(", ", 1)[-1])
    text = " ".join(err.text.split())
    if not text:
        return None
    problem = "truncated" if "premature end" in text.lower() else "corrupt"
    return problem, _clip(f"libjpeg warns '{text}' (it decodes, to wrong pixels)")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


# ----------------------------------------------------------------------------------------------- one file
def _one_line(e: BaseException) -> str:
    """``Type: message`` of an exception, on one line and at most ``_MAX_DETAIL`` characters."""
    msg = " ".join(str(e).split())
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _sniff(data: bytes) -> str:
    """Name of the format of ``data`` from its magic bytes (``unknown`` when none matches)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP:
        return _FTYP[data[8:12]]
    for offset, magic, name in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return name
    if data[:2] == b"\xff\xd8":
        return "unknown (starts with FF D8 but not FF D8 FF)"
    return "unknown"


def _jpeg_structure(data: bytes) -> tuple[str, str] | None:
    """Walk the JPEG marker segments up to the image data and check the data ends with EOI.

    Returns ``None`` for a well-formed stream, else ``(problem, detail)`` with problem ``truncated`` (the bytes
    end inside the headers, or no EOI marker follows the last scan) or ``corrupt`` (an invalid marker).
    Entropy-coded data never contains ``FF D9`` or ``FF DA`` (an ``FF`` there is always followed by ``00`` or a
    restart marker), so "an EOI after the last SOS" tells a complete stream, trailing bytes after it allowed,
    from a cut one.
    """
    n = len(data)
    i = 2  # after SOI
    while True:
        if i >= n:
            return "truncated", f"ends inside the JPEG headers at byte {n} (no image data)"
        if data[i] != 0xFF:
            return "corrupt", f"invalid JPEG marker structure at byte {i} (0x{data[i]:02X} where 0xFF was expected)"
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return "truncated", f"ends inside the JPEG headers at byte {n} (no image data)"
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker == 0xD9:
            return "corrupt", f"EOI marker at byte {i - 2} before any image data"
        if marker < 0xC0 or marker == 0xD8:
            return "corrupt", f"invalid JPEG marker 0xFF{marker:02X} at byte {i - 2}"
        if i + 2 > n:
            return "truncated", f"ends inside the JPEG headers at byte {n} (no image data)"
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2:
            return "corrupt", f"invalid length {length} of JPEG segment 0xFF{marker:02X} at byte {i - 2}"
        if marker == 0xDA:  # SOS: the image data follows
            break
        i += length
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "truncated", f"no EOI marker (FF D9) after the image data: the file ends early at byte {n}"
    return None


def _inspect(path: str) -> dict[str, Any]:
    """Check one file: problems, size, sha1 and image metadata. Never raises (a failure is a ``corrupt`` row)."""
    info: dict[str, Any] = {"path": path, "problems": [], "size_bytes": None, "width": None, "height": None,
                            "mode": None, "format": None, "sha1": None}
    try:
        _inspect_into(path, info)
    except Exception as e:  # noqa: BLE001 - a checker must report, never crash
        info["problems"] = [("corrupt", f"checker failed: {_one_line(e)}")]
    return info


def _inspect_into(path: str, info: dict[str, Any]) -> None:
    problems: list[tuple[str, str]] = info["problems"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        problems.append(("missing", "file does not exist"))
        return
    except IsADirectoryError:
        problems.append(("corrupt", "is a directory, not an image file"))
        return
    except OSError as e:
        problems.append(("corrupt", f"cannot read: {_one_line(e)}"))
        return
    info["size_bytes"] = len(data)
    if not data:
        problems.append(("empty", "file is 0 bytes"))
        return
    info["sha1"] = hashlib.sha1(data, usedforsecurity=False).hexdigest()

    structural: tuple[str, str] | None = None
    if data[:3] != b"\xff\xd8\xff":
        kind = _sniff(data)
        structural = ("not_jpeg", f"file is {kind}, not JPEG (no FF D8 FF start marker)")
    else:
        structural = _jpeg_structure(data)

    with _strict_pil():
        try:
            img = Image.open(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
            problems.append(structural or ("corrupt", f"PIL cannot open it: {_one_line(e)}"))
            return
        with img:
            info["width"], info["height"] = img.size
            info["mode"], info["format"] = img.mode, img.format
            orientation = exif_orientation(img)
            if structural is not None:  # already known bad: metadata only, no decode
                problems.append(structural)
                return
            strict = strict_decode(data)  # the bytes start like a JPEG (structural is None)
            if strict is not None and strict[0] != "decode_error":
                problems.append(strict)  # decodes, with a libjpeg warning: wrong pixels
                return
            if strict is None and _strict_decoder() is not None:
                pass  # decoded cleanly by libjpeg-turbo: no second full decode by PIL
            else:
                try:
                    img.load()
                except Exception as e:  # noqa: BLE001
                    problem = "truncated" if "truncat" in str(e).lower() else "corrupt"
                    problems.append((problem, f"PIL cannot decode it: {_one_line(e)}"))
                    return
                if strict is not None:  # PIL decodes what libjpeg-turbo (as in DALI) refuses
                    problems.append(("corrupt", _clip(f"libjpeg-turbo cannot decode it: {strict[1]}")))
                    return
    if info["mode"] in _CMYK_MODES:
        problems.append(("cmyk", f"mode {info['mode']} (DALI decodes it through a different colour path)"))
    elif info["mode"] in _GRAY_MODES:
        problems.append(("grayscale", f"mode {info['mode']} (one channel where the rest of the set has three)"))
    if orientation != 1:
        what = _ORIENTATIONS.get(orientation, "unknown value")
        problems.append(("oriented", f"EXIF orientation {orientation} ({what}): both loaders turn it upright; "
                                     "not excluded"))



@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """PIL refusing truncated files (``LOAD_TRUNCATED_IMAGES`` off) and its warnings silenced, for the block; the
    global setting is put back however the block ends."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def check_image(path: str) -> list[tuple[str, str]]:
    """Check one image file.

    Args:
        path: the file.

    Returns:
        A list of ``(problem, detail)`` pairs (problem names from :data:`PROBLEMS`, never ``duplicate``, which
        needs the other files); ``[]`` when it is a clean RGB JPEG that decodes fully.
    """
    return list(_inspect(str(path))["problems"])


# ----------------------------------------------------------------------------------------------- one mask
_RAW_MASK_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F"}
_EXIF_SWAPS = {5, 6, 7, 8}  # orientations turned upright by a 90-degree rotation: width and height swap


def _upright_size(image: str) -> tuple[int, int, bool] | None:
    """``(width, height, swapped)`` of an image as the loaders see it (EXIF orientation applied); None when its
    header cannot be read (the image's own check reports that)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(image) as im:
                w, h = im.size
                swapped = exif_orientation(im) in _EXIF_SWAPS
    except Exception:  # noqa: BLE001 - any header failure: no size to compare with
        return None
    return (h, w, True) if swapped else (w, h, False)


def _mask_values(m: Image.Image) -> np.ndarray:
    """The mask's pixel values as the loaders read them: greyscale / integer masks as stored, others as 8-bit grey
    (``1``: 0/255; palette: the palette's grey level)."""
    return np.asarray(m if m.mode in _RAW_MASK_MODES else m.convert("L"))


def _inspect_mask(job: tuple[str, str]) -> dict[str, Any]:
    """Check the mask of one image (``job = (image path, mask path)``); never raises."""
    image, mask = job
    info: dict[str, Any] = {"path": mask, "problems": [], "size_bytes": None, "width": None, "height": None,
                            "mode": None, "format": None, "sha1": None}
    try:
        _inspect_mask_into(image, mask, info)
    except Exception as e:  # noqa: BLE001 - a checker must report, never crash
        info["problems"] = [("mask_corrupt", f"checker failed: {_one_line(e)}")]
    return info


def _inspect_mask_into(image: str, mask: str, info: dict[str, Any]) -> None:
    problems: list[tuple[str, str]] = info["problems"]
    of = Path(image).name
    try:
        info["size_bytes"] = os.path.getsize(mask)
    except FileNotFoundError:
        problems.append(("mask_missing", f"the mask of {of} does not exist"))
        return
    except OSError as e:
        problems.append(("mask_corrupt", f"cannot read the mask of {of}: {_one_line(e)}"))
        return
    with _strict_pil():
        try:
            with Image.open(mask) as m:
                info["width"], info["height"] = m.size
                info["mode"], info["format"] = m.mode, m.format
                m.load()
                values = _mask_values(m)
        except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
            problems.append(("mask_corrupt", f"the mask of {of} cannot be decoded: {_one_line(e)}"))
            return
    upright = _upright_size(image)
    size = (info["width"], info["height"])
    if upright is not None and size != upright[:2]:
        detail = f"mask {size[0]}x{size[1]}, its image {of} {upright[0]}x{upright[1]}"
        if upright[2] and size == upright[1::-1]:
            detail += (" (turned upright by its EXIF orientation; the mask fits the stored pixels: rotate the mask, "
                       "or strip the image's orientation tag)")
        problems.append(("mask_size", detail))
    uniq = np.unique(values)
    if len(uniq) > 2 or (len(uniq) == 2 and uniq[0] != 0):
        top = uniq[-1]
        soft = float(np.mean((values != 0) & (values != top)))
        shown = ", ".join(f"{v:g}" for v in uniq[:4]) + (", ..." if len(uniq) > 4 else "")
        rule = "above 127 reads as lesion" if top > 127 else "nonzero reads as lesion"
        why = (f"no 0 background: every pixel {rule}" if uniq[0] != 0 else
               f"{soft:.1%} of the pixels neither 0 nor {top:g} (anti-aliased or lossy edges); a pixel {rule}")
        problems.append(("mask_not_binary", f"{len(uniq)} values ({shown}): {why}"))


def check_mask(image: str | Path, mask: str | Path) -> list[tuple[str, str]]:
    """Check the mask of one image: present, decodable, the image's size (upright), binary.

    Args:
        image: the image file (only its header is read, for its size and EXIF orientation).
        mask: its mask file.

    Returns:
        A list of ``(problem, detail)`` pairs (names from :data:`MASK_PROBLEMS`); ``[]`` for a good mask: 0 and at
        most one other value, the image's width x height.
    """
    return list(_inspect_mask((str(image), str(mask)))["problems"])


# ----------------------------------------------------------------------------------------------- many files
def _progress_iter(results: Iterable[dict[str, Any]], total: int, progress: bool,
                   title: str = "checking images") -> Iterator[dict[str, Any]]:
    """Yield ``results``, drawing a rich progress bar on stderr when ``progress``.

    The bar is refreshed by hand (no refresh thread), so worker processes may be forked while it is shown.
    """
    if not progress:
        yield from results
        return
    from rich import progress as rp
    from rich.console import Console

    columns = (rp.TextColumn(title), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
               rp.TextColumn("eta"), rp.TimeRemainingColumn())
    with rp.Progress(*columns, console=Console(stderr=True), auto_refresh=False, transient=False) as bar:
        task = bar.add_task("check", total=total)
        last = 0.0
        for r in results:
            yield r
            bar.advance(task)
            now = time.monotonic()
            if now - last > 0.1:
                bar.refresh()
                last = now
        bar.refresh()


def _mp_context() -> Any:
    """``fork`` where available (no re-import of the caller's modules in the workers), else the default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _crashed(item: Any) -> dict[str, Any]:
    """The report of an image (a path) or a mask (an ``(image, mask)`` job) whose worker process died."""
    path, problem = (item[1], "mask_corrupt") if isinstance(item, tuple) else (item, "corrupt")
    return {"path": path, "problems": [(problem, "the decoder crashed (worker process died) on this file")],
            "size_bytes": None, "width": None, "height": None, "mode": None, "format": None, "sha1": None}


def _run_parallel(items: list[Any], workers: int,
                  fn: Callable[[Any], dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Inspect ``items`` (image paths, or ``(image, mask)`` jobs with ``fn=_inspect_mask``) in ``workers``
    processes, yielding results in order.

    If a worker process dies (a decoder crash), the rest is checked one file at a time in a fresh single-worker
    pool, so the file that kills its process is found and reported as corrupt instead of hanging or aborting.
    """
    fn = fn or _inspect  # looked up now, not at import: a test may replace it
    chunksize = max(2, min(64, len(items) // (workers * 8)))
    done = 0
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as ex:
            for r in ex.map(fn, items, chunksize=chunksize):
                done += 1
                yield r
        return
    except cf.process.BrokenProcessPool:
        pass
    ex = cf.ProcessPoolExecutor(max_workers=1, mp_context=_mp_context())
    try:
        for p in items[done:]:
            try:
                yield ex.submit(fn, p).result()
            except cf.process.BrokenProcessPool:
                ex.shutdown(wait=False, cancel_futures=True)
                ex = cf.ProcessPoolExecutor(max_workers=1, mp_context=_mp_context())
                yield _crashed(p)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _unique(paths: Iterable[str]) -> list[str]:
    """``paths`` as strings, each file once (the same file named twice would otherwise be its own duplicate)."""
    seen: set[str] = set()
    out: list[str] = []
    for p in map(str, paths):
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The report DataFrame: :data:`COLUMNS`, sorted by path then problem order, nullable integer sizes."""
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in ("size_bytes", "width", "height"):
        df[c] = df[c].astype("Int64")
    for c in ("path", "problem", "detail", "mode", "format"):
        df[c] = df[c].astype(object)
    if len(df):
        order = {p: i for i, p in enumerate(PROBLEMS + NOTES)}
        df = df.assign(_o=df["problem"].map(order)).sort_values(["path", "_o"], kind="stable").drop(columns="_o")
    return df.reset_index(drop=True)


def _check(paths: Sequence[str], workers: int, progress: bool) -> tuple[pd.DataFrame, int]:
    """Report rows and number of distinct files checked."""
    unique = sorted(_unique(paths))
    _strict_decoder()  # imported once here, before worker processes are forked
    if workers <= 0:
        workers = os.cpu_count() or 1
    if workers > 1 and len(unique) > PARALLEL_MIN_FILES:
        results: Iterable[dict[str, Any]] = _run_parallel(unique, min(workers, len(unique)))
    else:
        results = map(_inspect, unique)
    rows: list[dict[str, Any]] = []
    first_by_sha: dict[str, str] = {}
    for info in _progress_iter(results, len(unique), progress):
        meta = {k: info[k] for k in COLUMNS[3:]}
        for problem, detail in info["problems"]:
            rows.append({"path": info["path"], "problem": problem, "detail": detail, **meta})
        if info["sha1"] is None or any(p in FATAL for p, _ in info["problems"]):
            continue  # unreadable files are excluded anyway; identical bytes would repeat the same problem
        first = first_by_sha.setdefault(info["sha1"], info["path"])
        if first != info["path"]:
            rows.append({"path": info["path"], "problem": "duplicate",
                         "detail": f"{_DUP_PREFIX}{first}", **meta})
    return _frame(rows), len(unique)


def _check_masks(masks: Mapping[str, str], workers: int, progress: bool) -> tuple[list[dict[str, Any]], int]:
    """Report rows of the masks (``{image: mask}``) and the number of masks checked."""
    jobs = sorted({(str(i), str(m)) for i, m in masks.items()}, key=lambda j: j[1])
    if workers <= 0:
        workers = os.cpu_count() or 1
    if workers > 1 and len(jobs) > PARALLEL_MIN_FILES:
        results: Iterable[dict[str, Any]] = _run_parallel(jobs, min(workers, len(jobs)), _inspect_mask)
    else:
        results = map(_inspect_mask, jobs)
    rows = []
    for info in _progress_iter(results, len(jobs), progress, "checking masks"):
        meta = {k: info[k] for k in COLUMNS[3:]}
        rows.extend({"path": info["path"], "problem": p, "detail": d, **meta} for p, d in info["problems"])
    return rows, len(jobs)


def check_files(paths: Sequence[str], workers: int = 0, progress: bool = True) -> pd.DataFrame:
    """Check every file, in parallel, and find byte-identical duplicates.

    Args:
        paths: the image files (a path named twice is checked once).
        workers: processes to decode with (0 = ``os.cpu_count()``); with 1, or no more than
            :data:`PARALLEL_MIN_FILES` files, the check runs in-process.
        progress: draw a progress bar on stderr.

    Returns:
        The report: one row per problem found, columns :data:`COLUMNS` (``path``, ``problem``, ``detail`` and,
        where known, ``size_bytes``, ``width``, ``height``, ``mode``, ``format``), sorted by path. Files with
        identical bytes (sha1) get one ``duplicate`` row per extra copy (in sorted path order) naming the first.
        A clean set gives an empty report.
    """
    return _check(paths, workers, progress)[0]


# ----------------------------------------------------------------------------------------------- results
@dataclass
class CheckResult:
    """What :func:`run_check` found and wrote.

    Attributes:
        report: one row per problem (columns :data:`COLUMNS`).
        n_files: distinct files checked, the ``missing`` ones included.
        n_bad: distinct files to exclude from training (``len(excluded)``).
        excluded: paths to exclude: every file with a problem in :data:`FATAL`, duplicates beyond the first copy
            and, when ``exclude_color`` was true, ``cmyk`` and ``grayscale`` files; sorted.
        report_file: the ``check_report.csv`` written (None if not written).
        exclude_file: the ``exclude.txt`` written (None if not written).
        n_oriented: files with an EXIF orientation tag other than 1 (a note in the report, not a problem).
        n_masks: masks checked (segmentation sets; 0 otherwise), not counted in ``n_files``.
    """

    report: pd.DataFrame
    n_files: int
    n_bad: int
    excluded: list[str]
    report_file: Path | None = None
    exclude_file: Path | None = None
    n_oriented: int = 0
    n_masks: int = 0

    @property
    def problems(self) -> pd.DataFrame:
        """The report's problem rows (without the :data:`NOTES`)."""
        return self.report[~self.report["problem"].isin(NOTES)]

    @property
    def ok(self) -> bool:
        """True when no problem at all was found (notes such as ``oriented`` are not problems)."""
        return len(self.problems) == 0


def exclusion_key(path: str | Path, root: str | Path | None = None) -> str:
    """The form a path takes in the set :func:`read_exclude_file` returns: absolute and resolved.

    Args:
        path: a path; a relative one is taken against ``root`` (or the working directory when ``root`` is None).
        root: the dataset root.

    Returns:
        ``str`` of the absolute, symlink-resolved path; compare dataset paths in this form with the exclusion set.
    """
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root).expanduser() / p
    return str(p.resolve())


def _entry(path: str, root: Path | None) -> str:
    """How ``path`` is written in exclude.txt: relative to ``root`` when inside it, else absolute and resolved."""
    if root is not None:
        pairs = ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (Path(path).resolve(), root.resolve()))
        for p, r in pairs:
            if p.is_relative_to(r) and p != r:
                return p.relative_to(r).as_posix()
    return Path(path).resolve().as_posix()


def run_check(paths: Sequence[str], out_dir: str | Path, root: str | Path | None = None, workers: int = 0,
              progress: bool = True, missing: Sequence[str] = (), exclude_color: bool = True,
              masks: Mapping[str, str] | None = None, exclude_nonbinary: bool = False) -> CheckResult:
    """Check a dataset's files (and a segmentation set's masks) and write the report and the exclusion list.

    Args:
        paths: the image files listed by the dataset that exist (nonexistent ones are reported ``missing`` too).
        out_dir: folder receiving ``check_report.csv`` (every row) and ``exclude.txt`` (created if needed).
        root: the dataset root; exclude.txt entries inside it are written relative to it, others absolute.
        workers: decoding processes (0 = ``os.cpu_count()``).
        progress: draw a progress bar on stderr.
        missing: paths listed by the dataset CSV that do not exist (the catalog finds those).
        exclude_color: also exclude ``cmyk`` and ``grayscale`` files (they are reported either way).
        masks: segmentation sets: ``{image path: mask path}``; each mask is checked (:func:`check_mask`) and a bad
            one (:data:`MASK_FATAL`) is listed in exclude.txt, which drops its row from training.
        exclude_nonbinary: also exclude ``mask_not_binary`` masks (reported either way).

    Returns:
        The :class:`CheckResult`. Training honours exclude.txt through the config option ``data.exclude_file``.
    """
    keys = {os.path.realpath(str(p)) for p in paths}
    extra = [m for m in _unique(missing) if os.path.realpath(m) not in keys]
    report, n_files = _check(paths, workers, progress)
    mask_rows, n_masks = _check_masks(masks, workers, progress) if masks else ([], 0)
    if extra or mask_rows:
        gone = [{"path": m, "problem": "missing", "detail": "listed by the dataset but not on disk"} for m in extra]
        report = _frame(report.to_dict("records") + gone + mask_rows)
    kinds = (FATAL + ("duplicate",) + (COLOR if exclude_color else ()) + (MASK_FATAL if masks else ())
             + (("mask_not_binary",) if masks and exclude_nonbinary else ()))
    excluded = sorted(set(report.loc[report["problem"].isin(kinds), "path"]))

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report_file = out / REPORT_NAME
        report.to_csv(report_file, index=False)
        root_path = Path(root) if root is not None else None
        exclude_file = out / EXCLUDE_NAME
        lines = [f"# fastlesion check: {len(excluded)} of {n_files + len(extra)} files excluded "
                 f"({', '.join(k for k in kinds)}); paths relative to {root_path or 'nothing (absolute)'}"]
        lines += [_entry(p, root_path) for p in excluded]
        exclude_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{out}: cannot write the check report ({_one_line(e)})") from None
    n_oriented = int(report.loc[report["problem"] == "oriented", "path"].nunique())
    return CheckResult(report=report, n_files=n_files + len(extra), n_bad=len(excluded), excluded=excluded,
                       report_file=report_file, exclude_file=exclude_file, n_oriented=n_oriented, n_masks=n_masks)


def read_exclude_file(path: str | Path, root: str | Path | None = None) -> set[str]:
    """Read an exclusion list written by :func:`run_check` (or by hand).

    Args:
        path: the file: one image path a line; blank lines and lines starting with ``#`` are skipped.
        root: the dataset root relative entries are taken against (None = the working directory).

    Returns:
        The entries as absolute, resolved path strings (see :func:`exclusion_key`).

    Raises:
        DatasetError: the file does not exist or cannot be read.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{p}: exclusion file (data.exclude_file) not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p}: cannot read exclusion file ({_one_line(e)})") from None
    out: set[str] = set()
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.add(exclusion_key(entry, root))
    return out


def format_summary(result: CheckResult, max_names: int = 3) -> str:
    """Human summary: files checked, then one line per problem with its count and the first few file names.

    Args:
        result: what :func:`run_check` returned.
        max_names: file names shown per problem.

    Returns:
        The lines, joined by newlines (no trailing newline).
    """
    rep = result.problems
    checked = f"{result.n_files:,} files" + (f" and {result.n_masks:,} masks" if result.n_masks else "")
    if result.ok:
        lines = [f"checked {checked}: no problems found"]
    else:
        n_files_bad = rep["path"].nunique()
        lines = [f"checked {checked}: {len(rep):,} problem(s) in {n_files_bad:,} file(s); "
                 f"{result.n_bad:,} excluded from training"]
        excluded = set(result.excluded)
        width = max(len(p) for p in PROBLEMS)
        for problem in PROBLEMS:
            rows = rep[rep["problem"] == problem]
            if not len(rows):
                continue
            names = []
            for path, detail in zip(rows["path"][:max_names], rows["detail"][:max_names], strict=True):
                name = Path(path).name
                if problem == "duplicate":
                    name += f" (copy of {Path(detail.removeprefix(_DUP_PREFIX)).name})"
                names.append(name)
            more = f" (+{len(rows) - max_names:,} more)" if len(rows) > max_names else ""
            how = "exclude_nonbinary (--exclude-nonbinary)" if problem == "mask_not_binary" else "exclude_color"
            kept = "" if rows["path"].isin(excluded).all() else f"  [kept: set {how} to exclude]"
            lines.append(f"  {problem:<{width}} {len(rows):>6,}  {', '.join(names)}{more}{kept}")
    oriented = result.report.loc[result.report["problem"] == "oriented", "path"]
    if len(oriented):
        names = ", ".join(Path(p).name for p in oriented[:max_names])
        more = f" (+{len(oriented) - max_names:,} more)" if len(oriented) > max_names else ""
        lines.append(f"  {len(oriented):,} file(s) carry an EXIF orientation tag other than 1, turned upright when "
                     f"loaded (not excluded): {names}{more}")
    if result.report_file is not None:
        lines.append(f"report: {result.report_file}")
    if result.exclude_file is not None and result.n_bad:
        lines.append(f"exclusion list: {result.exclude_file} (train with data.exclude_file={result.exclude_file})")
    return "\n".join(lines)
