"""Helpers the test files share (pytest puts tests/ on sys.path: ``from helpers import train_tiny``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastlesion.config import Config, load_config

HF_REV = "0123456789abcdef0123456789abcdef01234567"
HF_HUB_ID = "timm/test_resnet.r160_in1k"  # timm's tiny test architecture and its default pretrained tag


def tiny_config(root: Path, out: Path, dataset: str = "isic2020", model: str = "lenet", **over: Any) -> Config:
    """One epoch of ``model`` at 32 px from ``root`` into ``out`` (torch loader, no workers, quiet), its own folds
    file beside ``out``; ``over``: more dotted keys."""
    return load_config(None, {
        "data.dataset": dataset, "data.root": str(root), "data.image_size": 32, "model.name": model,
        "loader.backend": "torch", "loader.workers": 0, "loader.batch_size": 16, "train.epochs": 1,
        "optim.warmup_epochs": 0.0, "run.out": str(out), "run.quiet": True,
        "data.folds_file": str(out.parent / f"{out.name}-folds.csv"), **over})


def train_tiny(root: Path, out: Path, **kw: Any) -> Path:
    """Train :func:`tiny_config` and return the run's ``best.pt``."""
    from fastlesion.engine.train import train

    train(tiny_config(root, out, **kw))
    return out / "best.pt"


def fill_hf_cache(hf_home: Path) -> dict:
    """Put made-up ``test_resnet`` ImageNet weights where huggingface_hub reads them offline
    (``hub/models--<org>--<name>/{refs/main, snapshots/<rev>/<file>}``); returns the state dict written."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", pretrained=False).state_dict().items()}
    repo = hf_home / "hub" / ("models--" + HF_HUB_ID.replace("/", "--"))
    (repo / "snapshots" / HF_REV).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HF_REV)
    save_file(state, str(repo / "snapshots" / HF_REV / "model.safetensors"))
    return state


def read_rows(path: Path) -> list[dict]:
    """The JSON lines a benchmark script appended to ``path``."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_jpeg(path: Path, image: Any, orientation: int | None = None, quality: int = 90) -> str:
    """Save ``image`` (a PIL image or an H x W x 3 uint8 array) as a JPEG at ``path``, with an EXIF orientation tag
    when ``orientation`` is given; returns the path as a string."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if orientation is None:
        im.save(path, quality=quality)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, quality=quality, exif=exif)
    return str(path)
