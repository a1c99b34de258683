"""The EXIF orientation tag, read one way by every module that opens images (loaders, ``check``, ``prepare``)."""

from __future__ import annotations

from PIL import Image

ORIENTATION_TAG = 0x0112


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of an opened image: 1 when absent, 0 or unreadable (a broken EXIF block is no
    reason to reject the pixels, which are then used as stored)."""
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - PIL raises many types on a broken EXIF block
        return 1
