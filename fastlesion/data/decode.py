"""Decode no more JPEG pixels than the output needs: libjpeg's DCT scaling (1/2, 1/4, 1/8) through PIL's draft mode.

A random resized crop of a 3264x2448 photo to 224 px throws away 90 % or more of the decoded pixels. libjpeg can
decode a JPEG at 1/2, 1/4 or 1/8 of its size by scaling the inverse DCT (PIL: ``Image.draft``), which skips most of
the decoding work. The torch loader's fast path (``loader.dct_scaling``) therefore, per sample:

1. reads the header only (size, EXIF orientation) and draws the crop window on the *original* upright size with
   exactly the algorithm and random draws of torchvision v2's ``RandomResizedCrop`` (:func:`draw_crop`), so the
   crop's area and aspect ratio relative to the image are distributed as before, and the same seed gives the same
   window as the plain path;
2. picks the largest reduction (8, 4, 2) that still leaves the window at least ``image_size`` pixels on its
   shorter side (:func:`dct_factor`; 1, i.e. a full decode, when none does) and decodes at that scale;
3. stops decoding below the window: libjpeg decodes a JPEG top to bottom, so the rows under the window's bottom
   edge (past the few the resize filter reads) are never decoded (:func:`decode_scaled`'s ``rows``; a random
   resized crop of 0.35-1 of the area left 5 % of the rows below it on average on the synthetic ISIC-sized set);
4. resizes the window, mapped into the decoded image's coordinates with sub-pixel precision, to the output size
   (PIL bilinear with antialias, as v2 does for PIL images). The output is the same, bit for bit, as resizing
   the window out of the whole image decoded at that scale.

Where no reduction is possible (factor 1: the window's shorter side is under twice ``image_size``, e.g. every crop
of a 600x450 photo at 224 px) PIL's decode is not the fastest: a colour JPEG stored upright is decoded whole by
libjpeg-turbo through simplejpeg (:func:`decode_whole`, 0.76 against 1.22 ms on a 600x450 JPEG) and the window
resized by torch's uint8 bilinear kernel with antialias; a file libjpeg-turbo reports a problem with goes to PIL.
Every function returns a uint8 ``3 x S x S`` tensor either way.

Evaluation uses the same ideas for the shorter-side resize and center crop (:func:`resize_center_crop`) and the
scale for the squash of a segmentation image (:func:`squash`). A file PIL cannot draft (PNG; a progressive JPEG is
fine) is decoded in full, and so is one with an EXIF rotation (the window's rows are not the file's): the output is
the same, only slower. Decoding at a reduced scale averages each 2x2 .. 8x8 block in the DCT domain
before the resize, so outputs differ from a full decode + crop by a few grey levels (``tests/test_fast_decode.py``).
"""

from __future__ import annotations

import functools
import math

import torch
from PIL import Image

from fastlesion.data.exif import orientation

DCT_FACTORS = (8, 4, 2)
"""JPEG DCT reductions libjpeg (and PIL's ``Image.draft``) offers below 1/1, largest first."""

_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
"""EXIF orientation tag -> the transposition that turns the stored pixels upright (as ``ImageOps.exif_transpose``)."""


def dct_factor(short_side: float, needed: float) -> int:
    """The largest reduction (8, 4 or 2) that leaves ``short_side`` original pixels at least ``needed`` pixels;
    1 (full decode) when none does."""
    return next((f for f in DCT_FACTORS if short_side / f >= needed), 1)



def upright_size(im: Image.Image, orient: int) -> tuple[int, int]:
    """``(width, height)`` of the image once turned upright by its orientation tag (5-8 swap the sides)."""
    w, h = im.size
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def decode_scaled(im: Image.Image, orient: int, factor: int, rows: float | None = None,
                  per_output: float = 1.0) -> tuple[Image.Image, float]:
    """Decode the opened ``im`` as upright RGB at 1/``factor`` of its size where the format allows (JPEG).

    ``rows``: only the image's first ``rows`` rows are needed, in *original* upright pixels (the window's bottom
    edge), for a resize that maps ``per_output`` original rows to one output row: a baseline or progressive JPEG
    stored upright is then decoded down to that row plus what the resize filter reads below it (:func:`_stop_rows`)
    and no further; the rows below stay black.

    Returns ``(image, scale)``: ``scale`` is decoded pixels per original pixel (``1 / factor``, or 1 when the file
    was decoded in full). libjpeg rounds the scaled size up, so pixel ``x`` of the original is ``x * scale`` here.
    The image may be ``im`` itself (an upright RGB JPEG): use it before ``im`` is closed.
    """
    scale = 1.0
    if factor > 1:
        width = im.size[0]
        drafted = im.draft("RGB", (im.size[0] // factor, im.size[1] // factor))
        if drafted is not None:
            scale = drafted[1][2] / width
    if rows is not None and orient == 1 and im.mode == "RGB" and im.format == "JPEG":
        _load_rows(im, _stop_rows(rows * scale, im.size[1], per_output * scale))
    # an RGB JPEG is used as decoded: convert("RGB") would copy the whole decoded image (~1 ms at 1/4 of a
    # 12-megapixel photo); the caller resizes it before the file is closed (closing frees the pixels)
    img = im if im.mode == "RGB" else im.convert("RGB")
    img.load()
    if orient in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orient])
    return img, scale


def _stop_rows(bottom: float, height: int, reduction: float) -> int:
    """Rows of a decoded image to decode for a window whose bottom edge is at ``bottom`` (decoded pixels), resized
    by ``reduction`` decoded rows per output row: PIL's bilinear filter reads ``max(reduction, 1)`` rows either side
    of an output row's centre, which for the last row lies half a step above the edge, so it reads at most
    ``reduction / 2 + 1`` rows below the edge; 2 more for rounding."""
    return min(height, math.ceil(bottom + max(reduction, 1.0) / 2 + 3))


def _load_rows(im: Image.Image, rows: int) -> None:
    """Decode only the first ``rows`` rows of the opened JPEG ``im`` (PIL's decoder goes top to bottom).

    PIL decodes a JPEG as one tile; narrowing the tile to the top ``rows`` rows makes its decoder stop there, and
    libjpeg then reports the unfinished image as a broken stream, which is expected here. Whether the rows were
    decoded is checked, not assumed: the last of them is filled with a pattern no JPEG decode writes (a
    pseudo-random row of bytes) before decoding; if it is still there afterwards the decoder failed above it (a
    truncated or corrupt file) and the error is raised as a full decode would raise it. A file that is not a
    single-tile JPEG, or a PIL whose internals differ, is left to the full decode.
    """
    if rows >= im.size[1] or len(getattr(im, "tile", ()) or ()) != 1:
        return
    tile = im.tile[0]
    if tile[0] != "jpeg":
        return
    width = im.size[0]
    extents = (0, 0, width, rows)
    try:
        narrowed = tile._replace(extents=extents) if hasattr(tile, "_replace") else (tile[0], extents, *tile[2:])
        core = Image.core.new(im.mode, im.size)
        marker = Image.frombytes(im.mode, (width, 1), _marker_row(width))
        core.paste(marker.im, (0, rows - 1, width, rows))
    except (AttributeError, TypeError, ValueError):
        return  # not the PIL internals this relies on: decode in full
    im.im, im.tile = core, [narrowed]
    try:
        im.load()
    except OSError as e:  # expected: libjpeg's "too few scanlines" after the stop, unless the rows were not reached
        error: OSError | None = e
    else:
        error = None
    if im.crop((0, rows - 1, width, rows)).tobytes() == marker.tobytes():
        raise error or OSError("image file is truncated")


@functools.lru_cache(maxsize=16)
def _marker_row(width: int) -> bytes:
    """``width`` RGB pixels of fixed pseudo-random bytes: a row that a JPEG decode never reproduces (decoded rows
    are smooth: the IDCT of at most 64 coefficients per 8x8 block)."""
    import random

    return random.Random(width).randbytes(3 * width)


def draw_crop(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]) \
        -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random resized crop of a ``height`` x ``width`` image: torchvision v2's
    ``RandomResizedCrop.make_params``, line for line, with the same draws from torch's default generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize_box(img: Image.Image, scale: float, box: tuple[float, float, float, float], size: tuple[int, int]) \
        -> Image.Image:
    """The window ``box`` (left, top, right, bottom) in *original* pixels, resized to ``size`` (W, H) from ``img``
    decoded at ``scale``: PIL bilinear, whose filter widens with the reduction (antialias), sub-pixel exact."""
    box = tuple(min(v * scale, lim) for v, lim in zip(box, (img.width, img.height) * 2))
    return img.resize(size, Image.Resampling.BILINEAR, box=box)


def random_resized_crop(path: str, image_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        dct_scaling: bool = True) -> tuple[torch.Tensor, tuple[int, int, int, int], tuple[int, int]]:
    """Decode ``path`` for a random resized crop to ``image_size`` square (module docstring).

    Returns ``(uint8 3 x image_size x image_size, (top, left, height, width) of the window in the original upright
    image, original upright (width, height))``: :func:`decode_window`, then the window resized (bilinear with
    antialias: PIL's for a reduced decode, torch's uint8 kernel for a whole decode by libjpeg-turbo).
    """
    with Image.open(path) as im:
        img, s, (top, left, h, w), size = decode_window(im, image_size, scale, ratio, dct_scaling, path=path)
        if isinstance(img, torch.Tensor):  # whole decode (s == 1): the window is whole pixels
            out = _resize_tensor(img[:, top:top + h, left:left + w], [image_size, image_size])
        else:
            out = _to_tensor(_resize_box(img, s, (left, top, left + w, top + h), (image_size, image_size)))
    return out, (top, left, h, w), size


def decode_window(im: Image.Image, image_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                  dct_scaling: bool = True, path: str | None = None) \
        -> tuple[Image.Image | torch.Tensor, float, tuple[int, int, int, int], tuple[int, int]]:
    """Draw a random resized crop's window on the opened ``im``'s upright size (:func:`draw_crop`, torch's default
    generator) and decode what it needs: at the DCT scale of :func:`dct_factor` for its shorter side and down to its
    bottom edge (in full without ``dct_scaling``). Returns ``(decoded image, scale, (top, left, height, width),
    original upright (width, height))``; use the image before ``im`` is closed (:func:`decode_scaled`).

    With ``dct_scaling`` and ``path`` (the file ``im`` was opened from), a window that needs the whole image
    (scale 1) of a plain JPEG is decoded by libjpeg-turbo directly (:func:`decode_whole`): the decoded image is then
    a uint8 ``3 x H x W`` tensor."""
    orient = orientation(im)
    width, height = upright_size(im, orient)
    top, left, h, w = draw_crop(height, width, scale, ratio)
    factor = dct_factor(min(h, w), image_size) if dct_scaling else 1
    whole = _whole(im, orient, path, factor, dct_scaling)
    if whole is not None:
        return whole, 1.0, (top, left, h, w), (width, height)
    img, s = decode_scaled(im, orient, factor, rows=top + h if dct_scaling else None, per_output=h / image_size)
    return img, s, (top, left, h, w), (width, height)


@functools.cache
def turbo():
    """The ``simplejpeg`` module (libjpeg-turbo's TurboJPEG API) when installed, else None (then PIL decodes)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def turbo_decodable(im: Image.Image, orient: int) -> bool:
    """Whether :func:`decode_whole` can decode the opened ``im``: a colour JPEG (PIL mode RGB: YCbCr or RGB; not
    grey, not CMYK) stored upright, with simplejpeg installed."""
    return orient == 1 and im.format == "JPEG" and im.mode == "RGB" and turbo() is not None


def decode_whole(path: str) -> torch.Tensor | None:
    """The whole JPEG at ``path`` decoded by libjpeg-turbo through simplejpeg, as uint8 ``3 x H x W`` (a view of
    ``H x W x 3`` memory, the layout torch's uint8 antialiased resize reads fastest).

    Measured on 600x450 JPEGs (one thread): 0.76 ms against 1.22 ms for PIL's decode of the same file, which goes
    through PIL's 4-bytes-per-pixel RGB and its chunked reads.

    None when libjpeg-turbo reports any problem, a truncated file or corrupt data (simplejpeg's ``strict``): the
    caller then decodes the file with PIL, so such a file behaves exactly as on the PIL path (PIL raises on a
    truncated file, as far as the window needs it, and decodes corrupt entropy data to wrong pixels without a word,
    which ``fastlesion check`` finds), whichever window a sample draws."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        arr = turbo().decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None
    return torch.from_numpy(arr).permute(2, 0, 1)


def _whole(im: Image.Image, orient: int, path: str | None, factor: int, dct_scaling: bool) -> torch.Tensor | None:
    """:func:`decode_whole` of ``path`` (the file ``im`` was opened from) where the fast path needs the whole image
    (``factor`` 1, ``dct_scaling`` on) and libjpeg-turbo can decode it (:func:`turbo_decodable`); else None."""
    if not dct_scaling or factor != 1 or path is None or not turbo_decodable(im, orient):
        return None
    return decode_whole(path)


def _resize_tensor(x: torch.Tensor, size: int | list[int]) -> torch.Tensor:
    """``x`` (uint8 3 x H x W) resized by torchvision's bilinear with antialias (torch's vectorised uint8 kernel;
    within a grey level or two of PIL's filter): ``size`` an int resizes the shorter side, as v2 ``Resize``."""
    from torchvision.transforms.v2 import functional as F

    return F.resize(x, size if isinstance(size, list) else [size], antialias=True)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.pil_to_tensor(img)


def resize_center_crop(path: str, resize: int, crop: int, dct_scaling: bool = True) -> torch.Tensor:
    """Decode ``path``, resize its shorter side to ``resize`` and cut the central ``crop`` square: the geometry of
    v2 ``Resize(resize)`` + ``CenterCrop(crop)`` (same output size and window), decoded at the largest DCT reduction
    that keeps the shorter side at least ``resize`` pixels, down to the window's bottom edge. Where no reduction
    does (scale 1), a plain JPEG is decoded by libjpeg-turbo (:func:`decode_whole`) and resized and cropped by v2's
    own tensor kernels. Returns uint8 ``3 x crop x crop``."""
    with Image.open(path) as im:
        orient = orientation(im)
        width, height = upright_size(im, orient)
        factor = dct_factor(min(width, height), resize) if dct_scaling else 1
        whole = _whole(im, orient, path, factor, dct_scaling)
        if whole is not None:
            from torchvision.transforms.v2 import functional as F

            return F.center_crop(_resize_tensor(whole, resize), [crop, crop])
        box = _center_box(width, height, resize, crop)
        img, s = decode_scaled(im, orient, factor, rows=box[3] if dct_scaling else None,
                               per_output=(box[3] - box[1]) / crop)
        return _to_tensor(_resize_box(img, s, box, (crop, crop)))


def _center_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in original pixels of v2 ``Resize(resize)`` + ``CenterCrop(crop)``'s window."""
    # v2 Resize(int): the shorter side -> resize, the longer int(resize * long / short); CenterCrop rounds its offset
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))  # crop <= resize: inside
    fx, fy = width / new_w, height / new_h  # original pixels per resized pixel
    return left * fx, top * fy, (left + crop) * fx, (top + crop) * fy


def squash(path: str, size: int, dct_scaling: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode ``path`` and resize the whole image to ``size`` square (segmentation evaluation), at the largest DCT
    reduction keeping both sides at least ``size`` (scale 1: libjpeg-turbo where it can, :func:`decode_whole`).
    Returns ``(uint8 3 x size x size, original upright (width, height))``."""
    with Image.open(path) as im:
        orient = orientation(im)
        width, height = upright_size(im, orient)
        factor = dct_factor(min(width, height), size) if dct_scaling else 1
        whole = _whole(im, orient, path, factor, dct_scaling)
        if whole is not None:
            return _resize_tensor(whole, [size, size]), (width, height)
        img, s = decode_scaled(im, orient, factor)
        return _to_tensor(_resize_box(img, s, (0, 0, width, height), (size, size))), (width, height)
