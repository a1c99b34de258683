"""``fastlesion explain``: class-activation maps of a checkpoint (Grad-CAM, Grad-CAM++, Score-CAM) from the
``grad-cam`` package (import name ``pytorch_grad_cam``), one PNG per image plus an ``index.csv``.

The map is taken at the model's last convolutional stage, found by :func:`find_target_layer`: timm's
``feature_info`` (the last feature map before the global pooling: ``layer4`` of a ResNet, ``blocks.6`` of an
EfficientNet, ``features.norm5`` of a DenseNet, ``stages.3`` of a ConvNeXt), torchvision's ``layer4`` /
``features[-1]``, else the last ``nn.Conv2d`` (LeNet). A layer that yields no ``[N, C, h, w]`` map (a vision
transformer) is refused.

Each PNG shows what the model sees (the eval resize + center crop, drawn at >= 224 px) beside the same crop with the
heat map of the explained class (the predicted one unless ``target_class``) overlaid; its title gives the
prediction, the label when known and the class probabilities.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fastlesion.errors import DatasetError, FastlesionError

log = logging.getLogger(__name__)

METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM"}
INSTALL = "pip install grad-cam   (or: pip install 'fastlesion[explain]')"
DISPLAY_MIN = 224  # PNG panels are drawn at least this large (the CAM is upsampled), whatever the model's input


def require_gradcam() -> Any:
    """The ``pytorch_grad_cam`` module, or one line saying how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError:
        raise FastlesionError(f"explanations need the grad-cam package: {INSTALL}") from None
    return pytorch_grad_cam


# ------------------------------------------------------------------------------------------------- target layer
def _timm_layer(model: nn.Module) -> str | None:
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    try:
        last = info[-1]
        name = last["module"] if isinstance(last, dict) else None
    except (IndexError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def _torchvision_layer(model: nn.Module) -> str | None:
    if not type(model).__module__.startswith("torchvision."):
        return None
    if isinstance(getattr(model, "layer4", None), nn.Module):  # ResNet family
        return "layer4"
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) and any(
            isinstance(m, nn.Conv2d) for m in features.modules()):
        return f"features.{list(features._modules)[-1]}"  # EfficientNet, MobileNet, DenseNet (norm5), VGG
    return None


def _last_conv(model: nn.Module) -> str | None:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n]
    return convs[-1] if convs else None


def find_target_layer(model: nn.Module, image_size: int | None = None) -> tuple[str, nn.Module]:
    """The module whose output the CAM is computed on, and its name: timm ``feature_info[-1]``, torchvision
    ``layer4`` / ``features[-1]``, else the last ``nn.Conv2d``. With ``image_size`` a dry run checks it yields a
    ``[N, C, h, w]`` map.

    Raises:
        FastlesionError: no convolutional layer, or a layer whose output is no 4-D map (vision transformers).
    """
    arch = getattr(model, "fastlesion_name", None) or type(model).__name__
    name = _timm_layer(model) or _torchvision_layer(model) or _last_conv(model)
    if name is None:
        raise FastlesionError(f"{arch}: no convolutional layer to explain")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        name = _last_conv(model)
        if name is None:
            raise FastlesionError(f"{arch}: no convolutional layer to explain") from None
        layer = model.get_submodule(name)
    if image_size is not None:
        seen: list[Any] = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
        device = next(model.parameters()).device
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
        finally:
            handle.remove()
            model.train(was_training)
        out = seen[-1] if seen else None
        if not (torch.is_tensor(out) and out.dim() == 4):
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise FastlesionError(f"{arch}: its last feature layer {name} yields {shape}, no [N, C, h, w] map "
                                  "(a vision transformer?): class-activation maps need a convolutional model")
    return name, layer


def _no_inplace(model: nn.Module) -> None:
    """Turn in-place activations off: a CAM hook on a tensor that a later ReLU overwrites would see its new value."""
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False


# ------------------------------------------------------------------------------------------------------ inputs
def image_paths(items: list[str | Path]) -> list[Path]:
    """Files as given and the images under folders (recursively, sorted); an error naming what is not there."""
    from fastlesion.data.catalog import IMAGE_EXTS

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DatasetError(f"{p}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise DatasetError(f"{p}: no such image or folder")
    return paths


def _open_rgb(path: str | Path):
    from PIL import UnidentifiedImageError

    from fastlesion.data.torch_loader import open_rgb

    try:
        return open_rgb(str(path))  # upright by its EXIF orientation, as both loaders see it
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e})") from None


def hardest_images(model: nn.Module, cfg, rt, classes: list[str], split: str, n: int,
                   path: str | Path) -> pd.DataFrame:
    """The ``n`` images of ``split`` (``val``: the checkpoint's fold, ``test``, ``all``) with the highest loss:
    columns ``path, label, loss`` (label as the class index), hardest first."""
    from fastlesion.data.loader import build_loader
    from fastlesion.engine.inference import split_table
    from fastlesion.engine.loop import evaluate

    _, table = split_table(cfg, split, classes, path)
    loader = build_loader(table, cfg.loader, cfg.data.image_size, train=False, device=rt.device,
                          channels_last=rt.channels_last)
    res = evaluate(model, loader, rt)
    p_true = res.probs[np.arange(len(res.labels)), res.labels]
    loss = -np.log(np.clip(p_true, 1e-12, None))
    order = np.argsort(-loss, kind="stable")[:n]
    rows = table.iloc[res.idx[order]]
    return pd.DataFrame({"path": rows["path"].astype(str).to_numpy(), "label": res.labels[order].astype(int),
                         "loss": loss[order]})


# ------------------------------------------------------------------------------------------------------ drawing
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display_crop(img, cfg, size: int) -> np.ndarray:
    """The eval resize + center crop of ``img`` drawn at ``size`` px: float RGB ``[size, size, 3]`` in [0, 1]."""
    from torchvision import transforms as T

    from fastlesion.data.transforms import eval_resize_size

    tf = T.Compose([T.Resize(eval_resize_size(size, cfg.loader.eval_crop), antialias=True), T.CenterCrop(size)])
    return np.asarray(tf(img), dtype=np.float32) / 255.0


def _title(classes: list[str], probs: np.ndarray, pred: int, target: int, label: int | None, method: str,
           layer: str) -> str:
    top = np.argsort(-probs)[:4]
    line1 = f"pred {classes[pred]} ({probs[pred]:.2f})"
    if label is not None:
        line1 += f"  |  label {classes[label]}" + ("" if label == pred else "  (wrong)")
    line2 = "  ".join(f"{classes[i]} {probs[i]:.3f}" for i in top) + ("  ..." if len(classes) > 4 else "")
    line3 = f"{method} of {classes[target]} at {layer}"
    return f"{line1}\n{line2}\n{line3}"


def draw(crop: np.ndarray, cam: np.ndarray, title: str, out_png: Path) -> Path:
    """Image and image + heat map side by side under ``title``; a small PNG."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    overlay = show_cam_on_image(crop, cam, use_rgb=True, image_weight=0.55)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5.6, 3.3))
    try:
        axes[0].imshow(crop)
        axes[0].set_title("input (eval crop)", fontsize=8)
        axes[1].imshow(overlay)
        axes[1].set_title("class-activation map", fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=80)
    finally:
        plt.close(fig)
    return out_png


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80] or "image"


def _class_index(target_class: str | int | None, classes: list[str]) -> int | None:
    if target_class is None:
        return None
    if str(target_class) in classes:
        return classes.index(str(target_class))
    if str(target_class).isdigit() and int(target_class) < len(classes):
        return int(target_class)
    raise FastlesionError(f"--class {target_class!r} is none of the checkpoint's classes {classes}")


# ---------------------------------------------------------------------------------------------------- the story
def explain(checkpoint: str | Path, images: list[str | Path] | None = None, out: str | Path = "explain",
            method: str = "gradcam", split: str | None = None, n: int = 16, target_class: str | int | None = None,
            overrides: list[str] | dict | None = None) -> pd.DataFrame:
    """Write one class-activation PNG per image into ``out`` and ``out/index.csv``; returns the index.

    Args:
        checkpoint: A fastlesion ``best.pt``.
        images: Image files and/or folders (recursively); exclusive with ``split``.
        out: Output folder.
        method: ``gradcam`` | ``gradcam++`` | ``scorecam`` (Score-CAM runs one forward pass per channel of the
            target layer per image: slow).
        split: ``val`` (the checkpoint's fold), ``test`` or ``all``: explain the ``n`` images of that split with the
            highest loss (the ones the model got most wrong).
        n: How many images of ``split``.
        target_class: Class (name or index) to explain; default: each image's predicted class.
        overrides: Config overrides (e.g. ``data.root=...`` for ``split`` on a moved dataset).

    The index has ``image, label, pred, prob_<class>..., explained, png`` (and ``loss`` for a split); ``label`` is
    empty for images given by path.
    """
    from fastlesion.config import config_from_dict, replace
    from fastlesion.data.transforms import MEAN, STD
    from fastlesion.engine import checkpoint as ckpt
    from fastlesion.engine.inference import inference_runtime, load_checkpoint_model
    from fastlesion.export import pixel_transform

    if method not in METHODS:
        raise FastlesionError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if bool(images) == (split is not None):
        raise FastlesionError("give image files/folders or --split, not both" if images else
                              "give image files/folders to explain, or --split val")
    if n < 1:
        raise FastlesionError(f"--n must be >= 1, got {n}")
    cam_lib = require_gradcam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    state = ckpt.load(checkpoint)
    cfg = replace(config_from_dict(state["config"], str(checkpoint)), overrides)
    rt = inference_runtime(cfg)
    model, state, _ = load_checkpoint_model(checkpoint, rt)
    classes = list(state["classes"])
    explained = _class_index(target_class, classes)
    if split is not None:
        table = hardest_images(model, cfg, rt, classes, split, n, checkpoint)
    else:
        table = pd.DataFrame({"path": [str(p) for p in image_paths(images or [])]})
        table["label"] = pd.Series([None] * len(table), dtype=object)
    _no_inplace(model)
    size = cfg.data.image_size
    layer_name, layer = find_target_layer(model, size)
    tf = pixel_transform(cfg)
    mean = torch.tensor(MEAN, device=rt.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=rt.device).view(1, 3, 1, 1)
    disp = max(size, DISPLAY_MIN)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cam_cls = getattr(cam_lib, METHODS[method])
    with cam_cls(model=model, target_layers=[layer]) as cam:
        if method == "scorecam":
            cam.batch_size = 32
        for i, rec in enumerate(table.itertuples(index=False)):
            path = Path(rec.path)
            img = _open_rgb(path)
            x = ((tf(img)[None].to(rt.device) - mean) / std).contiguous(memory_format=rt.memory_format)
            with torch.no_grad(), rt.autocast():  # the precision of the pass that ranked the images
                probs = torch.softmax(model(x).float(), dim=1)[0].cpu().numpy()
            pred = int(probs.argmax())
            target = pred if explained is None else explained
            with contextlib.redirect_stderr(io.StringIO()):  # Score-CAM's tqdm bars
                grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
            grayscale = np.nan_to_num(np.asarray(grayscale, dtype=np.float32))
            up = F.interpolate(torch.from_numpy(grayscale)[None, None], size=(disp, disp), mode="bilinear",
                               align_corners=False)[0, 0].clamp(0, 1).numpy()
            label = None if rec.label is None or (isinstance(rec.label, float) and math.isnan(rec.label)) \
                else int(rec.label)
            png = out / f"{i:03d}_{_safe_stem(path)}.png"
            draw(_display_crop(img, cfg, disp), up,
                 _title(classes, probs, pred, target, label, method, layer_name), png)
            row = {"image": str(path), "label": classes[label] if label is not None else "",
                   "pred": classes[pred], **{f"prob_{c}": float(probs[k]) for k, c in enumerate(classes)},
                   "explained": classes[target], "png": str(png)}
            if "loss" in table.columns:
                row["loss"] = float(rec.loss)
            rows.append(row)
    index = pd.DataFrame(rows)
    index.attrs.update(layer=layer_name, method=method, out=str(out))
    index.to_csv(out / "index.csv", index=False)
    return index
