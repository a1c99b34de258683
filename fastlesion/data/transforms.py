"""torchvision transforms of the reference loader, and the constants shared with the DALI pipeline.

Both backends normalise with the same ImageNet mean/std (in the 0..255 scale for DALI, 0..1 for torchvision) and
apply the same augmentation parameters from :class:`~fastlesion.config.LoaderConfig`.
"""

from __future__ import annotations

import math

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


def train_transform(cfg: LoaderConfig, image_size: int):
    """RandomResizedCrop, flips, rotation, ColorJitter, ToTensor, Normalize."""
    from torchvision import transforms as T

    j = jitter(cfg)
    ops = [T.RandomResizedCrop(image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), antialias=True)]
    if cfg.hflip > 0:
        ops.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(T.RandomVerticalFlip(cfg.vflip))
    if j["rotate"] > 0:
        ops.append(T.RandomRotation(j["rotate"]))
    if any(j[k] > 0 for k in ("brightness", "contrast", "saturation", "hue")):
        ops.append(T.ColorJitter(j["brightness"], j["contrast"], j["saturation"], j["hue"]))
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(ops)


def eval_transform(cfg: LoaderConfig, image_size: int):
    """Resize the shorter side to ``image_size / eval_crop``, center crop, ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(eval_resize_size(image_size, cfg.eval_crop), antialias=True),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])
