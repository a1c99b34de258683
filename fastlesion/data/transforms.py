"""torchvision v2 transforms of the reference loader, and the constants shared with the DALI pipeline.

Both backends normalise with the same ImageNet mean/std (in the 0..255 scale for DALI, 0..1 for torchvision) and
apply the same augmentation parameters from :class:`~fastlesion.config.LoaderConfig`.

Segmentation (a table with a ``mask`` column) uses torchvision v2 on an ``(image, tv_tensors.Mask)`` pair
(:func:`seg_train_transform`, :func:`seg_eval_transform`): one draw of each random op moves both, the mask with
nearest neighbour and zero fill, colour jitter and normalisation touch only the image. Masks are binarised once,
at full resolution, by :func:`binarize_mask` (the rule DALI's graph applies too).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fastlesion.config import LoaderConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_255 = tuple(m * 255 for m in MEAN)
STD_255 = tuple(s * 255 for s in STD)


def eval_resize_size(image_size: int, eval_crop: float) -> int:
    """Shorter side before the center crop: ``image_size / eval_crop`` (224 / 0.875 = 256)."""
    return int(math.floor(image_size / eval_crop + 0.5))


def jitter(cfg: LoaderConfig) -> dict[str, float]:
    """Colour jitter and rotation scaled by ``aug_strength``."""
    s = cfg.aug_strength
    return {"brightness": cfg.brightness * s, "contrast": cfg.contrast * s, "saturation": cfg.saturation * s,
            "hue": min(cfg.hue * s, 0.5), "rotate": min(cfg.rotate * s, 180.0)}


def train_transform(cfg: LoaderConfig, image_size: int, crop: bool = True):
    """The plain training pipeline, torchvision v2 on a PIL image: RandomResizedCrop (``loader.scale`` /
    ``loader.ratio``, bilinear with antialias), flips, rotation (nearest, zero fill), ColorJitter (those whose
    strength is above 0), ToImage, ToDtype(float32, scale=True), Normalize.

    What a user writes without the library; the benchmark's ``pil`` peer runs this very builder. ``crop=False``
    leaves the crop out (the ``pil-draft`` peer crops itself). The library's DCT-scaled path uses
    :func:`after_crop` instead.
    """
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), antialias=True)] \
        if crop else []
    return v2.Compose(ops + _jitter_ops(cfg, v2) + _to_normalized(v2))


def after_crop(cfg: LoaderConfig):
    """The training augmentation after the DCT-scaled crop (:mod:`fastlesion.data.decode`, a uint8 ``3 x S x S``
    tensor), still uint8: flips, rotation and colour jitter as :func:`train_transform` (on a PIL image when
    rotation or jitter is on, :func:`_from_tensor`); the loader normalises whole batches (:class:`NormalizeUint8`).
    The crop's window was drawn first from the same generator, so the remaining draws line up with the plain
    path's. None when there is nothing to do (no flips, rotation or jitter)."""
    from torchvision.transforms import v2

    pil = _from_tensor(cfg, v2)
    ops = pil + _jitter_ops(cfg, v2) + ([v2.PILToTensor()] if pil else [])
    return v2.Compose(ops) if ops else None


class NormalizeUint8:
    """A uint8 batch ``N x 3 x H x W`` (or one image ``3 x H x W``) -> float32 normalised with the ImageNet
    mean/std in one expression, ``(x - 255 mean) / (255 std)``, on the tensor's device: what v2 ToImage +
    ToDtype(float32, scale=True) + Normalize compute per image (to float rounding).

    The torch loader's DCT-scaled path hands uint8 batches to it after they reach the training device: a quarter
    of the bytes through the workers' shared memory and to the GPU, and no per-image v2 dispatch (one thread,
    224 px: 0.37 ms per image for the three v2 ops)."""

    def __init__(self) -> None:
        import torch

        self.mean = torch.tensor(MEAN_255, dtype=torch.float32).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(STD_255, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x):
        import torch

        if self.mean.device != x.device:  # moved once, not per batch (a host-to-device copy each on a GPU)
            self.mean, self.inv_std = self.mean.to(x.device), self.inv_std.to(x.device)
        return (x.to(torch.float32) - self.mean).mul_(self.inv_std)


def eval_transform(cfg: LoaderConfig, image_size: int, normalize: bool = True):
    """torchvision v2: Resize the shorter side to ``image_size / eval_crop``, CenterCrop, ToImage, ToDtype(float32,
    scale=True) and, unless ``normalize`` is False (a float RGB image in [0, 1]), Normalize."""
    from torchvision.transforms import v2

    ops = [v2.Resize(eval_resize_size(image_size, cfg.eval_crop), antialias=True), v2.CenterCrop(image_size)]
    tail = _to_normalized(v2)
    return v2.Compose(ops + (tail if normalize else tail[:-1]))


def to_normalized():
    """ToImage, ToDtype(float32, scale=True), Normalize (v2): what follows a crop done by
    :mod:`fastlesion.data.decode` in evaluation."""
    from torchvision.transforms import v2

    return v2.Compose(_to_normalized(v2))


MASK_THRESHOLD = 127
"""A mask pixel is lesion when above this value (0/255 masks, blurred edges included); a mask whose maximum is at
most this value (0/1 masks, label indices) counts every nonzero pixel as lesion. See :func:`binarize_mask`."""


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """A greyscale mask as uint8 {0, 1}: ``mask > 127`` when its maximum is above 127 (0/255 masks, also when a
    lossy format or resampling left grey edges), else ``mask > 0`` (0/1 masks). An all-zero mask stays all zero."""
    mask = np.asarray(mask)
    threshold = MASK_THRESHOLD if mask.size and int(mask.max()) > MASK_THRESHOLD else 0
    return (mask > threshold).astype(np.uint8)


def _jitter_ops(cfg: LoaderConfig, module) -> list:
    """Flips, rotation (nearest neighbour, zero fill) and colour jitter of ``module`` (torchvision v2)."""
    j = jitter(cfg)
    ops = []
    if cfg.hflip > 0:
        ops.append(module.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(module.RandomVerticalFlip(cfg.vflip))
    if j["rotate"] > 0:
        ops.append(module.RandomRotation(j["rotate"], fill=0))
    if any(j[k] > 0 for k in ("brightness", "contrast", "saturation", "hue")):
        ops.append(module.ColorJitter(j["brightness"], j["contrast"], j["saturation"], j["hue"]))
    return ops


def _from_tensor(cfg: LoaderConfig, v2) -> list:
    """What the rest of the augmentation needs in front of it for a uint8 tensor image (the DCT-scaled crop's
    output): v2 ``ToPILImage`` when rotation or colour jitter is on, whose PIL kernels are the faster on a 224 px
    image (one thread: rotation 0.09 against 0.93 ms, jitter with hue 2.8 against 4.8 ms), else nothing (flips
    are as fast on the tensor)."""
    return [v2.ToPILImage()] if rotates_or_jitters(cfg) else []


def rotates_or_jitters(cfg: LoaderConfig) -> bool:
    """Whether the augmentation has rotation or colour jitter (strengths scaled by ``aug_strength``), besides the
    crop and flips."""
    j = jitter(cfg)
    return any(j[k] > 0 for k in ("brightness", "contrast", "saturation", "hue", "rotate"))


@functools.cache
def _centred_nearest(name: str):
    """torchvision v2's ``name`` (``RandomResizedCrop`` or ``Resize``) with its mask resized by *centred* nearest
    neighbour (``NEAREST_EXACT``, as DALI's ``INTERP_NN`` and PIL), not v2's legacy ``NEAREST`` for masks, whose
    ``floor(dst * scale)`` shifts the mask against the image by up to ``(scale - 1) / 2`` source pixels."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    base = getattr(v2, name)

    class Joint(base):
        def transform(self, inpt, params):
            if not isinstance(inpt, tv_tensors.Mask):
                return super().transform(inpt, params)
            m = inpt.as_subclass(torch.Tensor)
            if "top" in params:  # RandomResizedCrop's window (always inside the image)
                top, left = params["top"], params["left"]
                m = m[..., top:top + params["height"], left:left + params["width"]]
            m = F.resize(m, list(self.size), interpolation=v2.InterpolationMode.NEAREST_EXACT, antialias=False)
            return tv_tensors.wrap(m, like=inpt)

    Joint.__name__ = Joint.__qualname__ = f"{name}CentredMask"
    return Joint


def _to_normalized(v2) -> list:
    import torch

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


def seg_train_transform(cfg: LoaderConfig, image_size: int, crop: bool = True):
    """torchvision v2 over ``(PIL image, tv_tensors.Mask)``: the classification augmentation applied to both.

    RandomResizedCrop (``loader.scale`` / ``loader.ratio``; the image bilinear with antialias, the mask centred
    nearest neighbour, see :func:`_centred_nearest`),
    flips, rotation (both nearest neighbour, zero fill), then colour jitter, ToImage, float and Normalize, which v2
    applies to the image only. Returns ``(image float 3xSxS, mask tv_tensors.Mask 1xSxS uint8)``. ``crop=False``
    leaves the crop out (the DCT-scaled path has cut both with one window, see :func:`train_transform`)."""
    from torchvision.transforms import v2

    rrc = _centred_nearest("RandomResizedCrop")
    ops = [rrc(image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), antialias=True)] if crop \
        else _from_tensor(cfg, v2)
    return v2.Compose(ops + _jitter_ops(cfg, v2) + _to_normalized(v2))


def seg_eval_transform(cfg: LoaderConfig, image_size: int):
    """torchvision v2 over ``(PIL image, tv_tensors.Mask)``: the whole image squashed to ``image_size`` square
    (no center crop, so every mask pixel is scored; the mask nearest neighbour), then ToImage, float, Normalize."""
    from torchvision.transforms import v2

    resize = _centred_nearest("Resize")
    return v2.Compose([resize((image_size, image_size), antialias=True)] + _to_normalized(v2))
