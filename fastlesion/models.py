"""Model registry: curated timm names, torchvision models (``tv_`` prefix), a small LeNet and segmentation networks.

Every network is built with random weights (timm ``pretrained=False``, torchvision ``weights=None``) unless asked
otherwise: ``pretrained_path`` loads a local file (:func:`load_pretrained`), and ``pretrained=True`` the
architecture's ImageNet weights through the library's own mechanism (timm: the Hugging Face hub cache, downloaded
when online, read from the cache offline; torchvision: its weights API and the torch hub cache). Offline without a
cached copy that is one error saying where to get the file. Registering a model stores a builder; nothing is
instantiated until :func:`create_model` asks for it. Any other architecture timm knows is accepted by
:func:`create_model` too, so users can try names outside the curated list. :func:`split_head` tells the classifier
head from the body (fine-tuning schedules).

Segmentation networks (``task="segmentation"``, :func:`model_task`): U-Net, FPN and DeepLabV3+ from
segmentation-models-pytorch over a timm encoder (``tu-<timm name>``), mapping ``N x 3 x S x S`` images to
``N x num_classes x S x S`` mask logits (S divisible by 32). ``pretrained=True`` loads the encoder's timm ImageNet
weights exactly as for the classifier of that name (Hugging Face hub cache); ``pretrained_path`` takes a segmentation
checkpoint or the encoder's weights alone (a timm file or a fastlesion classification checkpoint of that encoder).

Example:
    >>> model = create_model("lenet", num_classes=2)
    >>> count_params(model)
    61326
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlesion.errors import FastlesionError
from fastlesion.metrics import TASKS

log = logging.getLogger(__name__)

# Prefixes written by wrappers around a model: DistributedDataParallel / DataParallel, and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which a checkpoint keeps its weights (fastlesion checkpoints use "model").
_STATE_KEYS = ("model", "state_dict", "model_state_dict", "net")


class ModelError(FastlesionError):
    """An unknown model name, bad model arguments or a weights file that does not fit the model."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: Registry name (what ``model.name`` in the config holds).
        builder: Called as ``builder(num_classes=, in_chans=, drop_rate=, drop_path_rate=)``; returns the module.
        family: Architecture family shown by ``fastlesion models`` (resnet, efficientnet, torchvision, unet, ...).
        note: One short line shown next to it.
        task: ``classification`` (logits ``N x classes``) or ``segmentation`` (mask logits ``N x classes x H x W``).
    """

    name: str
    builder: Callable[..., nn.Module]
    family: str = ""
    note: str = ""
    task: str = "classification"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module], family: str = "", note: str = "",
                   task: str = "classification") -> None:
    """Add an architecture to the registry (nothing is built now).

    Args:
        name: Registry name; must not be registered already.
        builder: Called as ``builder(num_classes=, in_chans=, drop_rate=, drop_path_rate=)``.
        family: Architecture family for listings.
        note: One short descriptive line for listings.
        task: ``classification`` or ``segmentation`` (:data:`fastlesion.metrics.TASKS`).

    Raises:
        ModelError: The name is empty or taken, the builder is not callable or the task unknown.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ModelError(f"model {name!r} is already registered")
    if not callable(builder):
        raise ModelError(f"model {name!r}: builder must be callable, got {type(builder).__name__}")
    if task not in TASKS:
        raise ModelError(f"model {name!r}: task must be one of {TASKS}, got {task!r}")
    _REGISTRY[name] = ModelEntry(name, builder, family, note, task)


def list_models(task: str | None = None) -> list[str]:
    """Sorted names of the curated registry (``create_model`` also accepts any other timm name); ``task`` keeps
    only the models of that task."""
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def model_task(name: str) -> str:
    """``"classification"`` or ``"segmentation"``: what the model ``name`` predicts (any timm name outside the
    registry is a classifier).

    Raises:
        ModelError: ``name`` is neither registered nor a timm architecture.
    """
    if name in _REGISTRY:
        return _REGISTRY[name].task
    _resolve(name)  # the unknown-name error, with suggestions
    return "classification"


# ----------------------------------------------------------------------------------------------------------- LeNet


class LeNet(nn.Module):
    """LeNet-5-style CNN for RGB inputs of any size: two conv-pool stages, a fixed 5x5 grid, FC 120-84-classes.

    The convolutions pad by 2 so that inputs down to 8 pixels still work; an ``AdaptiveAvgPool2d`` brings any
    feature map to 5x5 (LeNet-5's 16x5x5 = 400 features), so the fully connected layers do not depend on input size.

    Args:
        num_classes: Output logits.
        in_chans: Input channels.
        drop_rate: Dropout probability before the last fully connected layer.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.drop = nn.Dropout(drop_rate)
        self.fc3 = nn.Linear(84, num_classes)

    def get_classifier(self) -> nn.Module:
        """The classification head (timm convention)."""
        return self.fc3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]``."""
        x = torch.flatten(self.features(x), 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(self.drop(x))


def _build_lenet(num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 pretrained: bool = False) -> nn.Module:
    if pretrained:
        raise ModelError("lenet has no pretrained weights (it is always trained from scratch); drop model.pretrained "
                         "or choose a timm / torchvision model")
    if drop_path_rate > 0:
        log.warning("lenet has no stochastic depth; drop_path_rate=%s ignored", drop_path_rate)
    return LeNet(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


# ------------------------------------------------------------------------------------------------------------ timm


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0].strip()
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timm_source(arch: str) -> tuple[str | None, str, str | None]:
    """Where timm takes ``arch``'s pretrained weights from: ``(hf hub id, file name, url)`` (None where absent)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - an unknown tag: timm's own error comes when the model is built
        cfg = None
    if cfg is None:
        return None, "model.safetensors", None
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    return getattr(cfg, "hf_hub_id", None) or None, filename, getattr(cfg, "url", None) or None


def _torch_hub_file(url: str) -> str:
    import os

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))


def _timm_unavailable(arch: str, e: BaseException, what: str | None = None) -> ModelError:
    """One line for pretrained timm weights that cannot be had: which file, from where, and the ways around it
    (``what`` names the model in the message; default ``model <arch>``)."""
    what = what or f"model {arch}"
    hf_id, filename, url = _timm_source(arch)
    instead = ("or pass a downloaded weights file with --pretrained FILE (model.pretrained_path) instead of "
               "--model.pretrained")
    if hf_id:
        from huggingface_hub import constants

        return ModelError(f"{what}: cannot load its pretrained weights: {hf_id} ({filename}) is not in the "
                          f"Hugging Face cache {constants.HF_HUB_CACHE} and the hub cannot be reached "
                          f"({_first_line(e)}); on a machine with network run `hf download {hf_id} {filename}` "
                          f"(older huggingface_hub: `huggingface-cli download {hf_id} {filename}`) and copy that "
                          f"cache here (or set HF_HOME to it), {instead}")
    if url:
        return ModelError(f"{what}: cannot load its pretrained weights: {_torch_hub_file(url)} is not cached "
                          f"and {url} cannot be downloaded ({_first_line(e)}); download it on a machine with network "
                          f"into $TORCH_HOME/hub/checkpoints/, {instead}")
    return ModelError(f"{what}: cannot load its pretrained weights ({_first_line(e)}); {instead}")


def _build_timm(
    arch: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    pretrained: bool = False,
) -> nn.Module:
    """``timm.create_model(arch, pretrained=..., ...)``; drop_path_rate only where the architecture takes it.

    ``pretrained=True`` is timm's own loading (Hugging Face hub cache; HF_HOME, HF_HUB_OFFLINE are honoured); timm
    drops the ImageNet head when ``num_classes`` differs and adapts the stem to ``in_chans``.
    """
    import timm

    if pretrained:
        hf_id, _, url = _timm_source(arch)
        if hf_id is None and url is None:
            raise ModelError(f"model {arch}: timm has no pretrained weights for it; drop model.pretrained, or pass a "
                             "weights file with --pretrained FILE (model.pretrained_path)")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    while True:
        try:
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
        except TypeError as e:
            dropped = next((k for k in ("drop_path_rate", "drop_rate") if k in kwargs and k in str(e)), None)
            if dropped is None:
                if pretrained:
                    raise _timm_unavailable(arch, e) from e
                raise
            log.warning("%s does not take %s; %s=%s ignored", arch, dropped, dropped, kwargs.pop(dropped))
        except (ModelError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - hub, network and file errors come in many types
            if not pretrained:
                raise
            raise _timm_unavailable(arch, e) from e


# ----------------------------------------------------------------------------------------------------- torchvision


class _DropoutLinear(nn.Linear):
    """``nn.Linear`` with dropout on its input: adds dropout to a head without renaming its state-dict keys."""

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


def _build_torchvision(
    arch: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    pretrained: bool = False,
) -> nn.Module:
    """A torchvision classifier with ``weights=None``; dropout / stochastic depth where the constructor has them.

    ``pretrained=True``: the architecture's ``DEFAULT`` ImageNet weights through torchvision's weights API (torch hub
    cache, ``$TORCH_HOME/hub/checkpoints``), loaded into the model with the 1000-class head skipped.
    """
    import torchvision.models as tvm

    if in_chans != 3:
        raise ModelError(f"tv_{arch} takes 3 input channels, got in_chans={in_chans}; use a timm model instead")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch.startswith("efficientnet"):
        kwargs["dropout"] = drop_rate
        kwargs["stochastic_depth_prob"] = drop_path_rate
    elif arch.startswith("mobilenet"):
        kwargs["dropout"] = drop_rate
    elif arch.startswith("densenet"):
        kwargs["drop_rate"] = drop_rate  # dropout inside the dense layers, as torchvision defines it
    if drop_path_rate > 0 and not arch.startswith("efficientnet"):
        log.warning("tv_%s has no stochastic depth; drop_path_rate=%s ignored", arch, drop_path_rate)
    model = getattr(tvm, arch)(**kwargs)
    if arch.startswith("resnet") and drop_rate > 0:
        model.fc = _DropoutLinear(model.fc, drop_rate)
    if pretrained:
        _load_torchvision_weights(model, arch)
    return model


def _load_torchvision_weights(model: nn.Module, arch: str) -> None:
    """torchvision's ``DEFAULT`` weights of ``arch`` into ``model`` (built with another head): the weights are
    loaded by torchvision into a 1000-class twin (its own key fixes, e.g. DenseNet's, apply), then copied over."""
    import torchvision.models as tvm

    try:
        weights = tvm.get_model_weights(arch).DEFAULT
    except Exception as e:  # noqa: BLE001 - no weights enum for this builder
        raise ModelError(f"model tv_{arch}: torchvision has no pretrained weights for it ({_first_line(e)})") from None
    try:
        twin = getattr(tvm, arch)(weights=weights, progress=False)
    except Exception as e:  # noqa: BLE001 - network and file errors come in many types
        raise ModelError(f"model tv_{arch}: cannot load torchvision's pretrained weights {weights}: "
                         f"{_torch_hub_file(weights.url)} is not cached and {weights.url} cannot be downloaded "
                         f"({_first_line(e)}); download it on a machine with network into "
                         "$TORCH_HOME/hub/checkpoints/, or pass it with --pretrained FILE (model.pretrained_path) "
                         "instead of --model.pretrained") from None
    _load_state(model, twin.state_dict(), f"torchvision weights {weights}", f"tv_{arch}")


# ---------------------------------------------------------------------------------------------------- segmentation

_SMP_ARCHS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}


class _DropoutConv2d(nn.Conv2d):
    """``nn.Conv2d`` with channel dropout (``Dropout2d``) on its input: dropout before a segmentation head's
    convolution without renaming its state-dict keys."""

    def __init__(self, conv: nn.Conv2d, p: float) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        self.drop = nn.Dropout2d(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


def is_segmentation_model(model: nn.Module) -> bool:
    """True for a segmentation-models-pytorch network (an ``encoder``, a ``decoder`` and a ``segmentation_head``)."""
    return all(isinstance(getattr(model, k, None), nn.Module) for k in ("encoder", "decoder", "segmentation_head"))


def _build_smp(
    arch: str, encoder: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    pretrained: bool = False, **decoder_kwargs: Any,
) -> nn.Module:
    """A segmentation-models-pytorch ``arch`` (unet | fpn | deeplabv3plus) over the timm encoder ``encoder``
    (``tu-<encoder>``), ``num_classes`` mask channels, no output activation (logits).

    ``pretrained=True`` is timm's own loading of the encoder's ImageNet weights (the Hugging Face hub cache, as for
    the classifier of that name). ``drop_rate``: channel dropout on the segmentation head's input (FPN: its
    ``decoder_dropout``, which sits there, smp's default 0.2 replaced); ``drop_path_rate``: the encoder's stochastic
    depth. ``decoder_kwargs`` go to the smp constructor (``decoder_channels``, ...).
    """
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ModelError(f"{arch}_{encoder} needs segmentation-models-pytorch: pip install "
                         "segmentation-models-pytorch") from e
    what = f"segmentation model {arch} over encoder {encoder}"
    if pretrained:
        hf_id, _, url = _timm_source(encoder)
        if hf_id is None and url is None:
            raise ModelError(f"{what}: timm has no pretrained weights for {encoder}; drop model.pretrained, or pass "
                             "a weights file with --pretrained FILE (model.pretrained_path)")
    kwargs: dict[str, Any] = dict(decoder_kwargs)
    if arch == "fpn":
        kwargs["decoder_dropout"] = drop_rate
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate  # smp hands unknown keywords to timm.create_model
    cls = getattr(smp, _SMP_ARCHS[arch])
    while True:
        try:
            model = cls(encoder_name=f"tu-{encoder}", encoder_weights=True if pretrained else None,
                        in_channels=in_chans, classes=num_classes, activation=None, **kwargs)
            break
        except TypeError as e:
            if "drop_path_rate" in kwargs and "drop_path_rate" in str(e):
                log.warning("%s: encoder %s has no stochastic depth; drop_path_rate=%s ignored", arch, encoder,
                            kwargs.pop("drop_path_rate"))
                continue
            if pretrained:
                raise _timm_unavailable(encoder, e, what) from e
            raise
        except (ModelError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - hub, network and file errors come in many types
            if not pretrained:
                raise
            raise _timm_unavailable(encoder, e, what) from e
    if drop_rate > 0 and arch != "fpn":
        head = model.segmentation_head
        head[0] = _DropoutConv2d(head[0], drop_rate)
    return model


# name: (arch, timm encoder, decoder keywords, note)
_SEG_MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "unet_mobilenetv3_small_050": ("unet", "mobilenetv3_small_050", {"decoder_channels": (64, 32, 24, 16, 8)},
                                   "tiny U-Net (0.55M, narrow decoder) for quick CPU runs and tests"),
    "unet_resnet18": ("unet", "resnet18", {}, "U-Net, ResNet-18 encoder"),
    "unet_resnet34": ("unet", "resnet34", {}, "U-Net, ResNet-34 encoder (segmentation default)"),
    "unet_efficientnet_b0": ("unet", "efficientnet_b0", {}, "U-Net, EfficientNet-B0 encoder"),
    "unet_mobilenetv3_large_100": ("unet", "mobilenetv3_large_100", {}, "U-Net, MobileNetV3-Large encoder, light"),
    "fpn_resnet34": ("fpn", "resnet34", {}, "FPN, ResNet-34 encoder (masks at 1/4 scale, upsampled)"),
    "deeplabv3plus_resnet34": ("deeplabv3plus", "resnet34", {}, "DeepLabV3+, ResNet-34 encoder (output stride 16)"),
}


# -------------------------------------------------------------------------------------------------------- registry

_TIMM_MODELS: dict[str, tuple[str, str]] = {
    "resnet18": ("resnet", "ResNet-18, fast baseline"),
    "resnet34": ("resnet", "deeper basic-block ResNet"),
    "resnet50": ("resnet", "bottleneck ResNet, common ISIC baseline"),
    "resnet101": ("resnet", "large bottleneck ResNet"),
    **{f"efficientnet_b{i}": ("efficientnet", f"EfficientNet-B{i} (ISIC 2020 winners used B3-B7)") for i in range(8)},
    "densenet121": ("densenet", "DenseNet-121, common HAM10000 baseline"),
    "densenet169": ("densenet", "DenseNet-169"),
    "mobilenetv2_100": ("mobilenet", "MobileNetV2 1.0, light"),
    "mobilenetv3_large_100": ("mobilenet", "MobileNetV3-Large 1.0, light"),
    "convnext_tiny": ("convnext", "ConvNeXt-T, modern CNN"),
    "regnety_016": ("regnet", "RegNetY-1.6GF"),
    "vit_small_patch16_224": ("vit", "ViT-S/16, needs image_size 224"),
}
_TV_MODELS: dict[str, str] = {
    "resnet18": "torchvision ResNet-18 (dropout added before fc when drop_rate > 0)",
    "resnet50": "torchvision ResNet-50 (dropout added before fc when drop_rate > 0)",
    "efficientnet_b0": "torchvision EfficientNet-B0",
    "densenet121": "torchvision DenseNet-121 (drop_rate inside dense layers)",
    "mobilenet_v2": "torchvision MobileNetV2",
}


def _register_builtins() -> None:
    register_model("lenet", _build_lenet, "lenet", "LeNet-5-style CNN, any input size, trains fast on CPU")
    for arch, (family, note) in _TIMM_MODELS.items():
        register_model(arch, partial(_build_timm, arch), family, f"timm: {note}")
    for arch, note in _TV_MODELS.items():
        register_model(f"tv_{arch}", partial(_build_torchvision, arch), "torchvision", note)
    for name, (arch, encoder, decoder_kwargs, note) in _SEG_MODELS.items():
        register_model(name, partial(_build_smp, arch, encoder, **decoder_kwargs), arch, f"smp: {note}",
                       task="segmentation")


_register_builtins()


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _unknown(name: str) -> ModelError:
    registry = list_models()
    others = [n for n in _timm_names() if n not in _REGISTRY]
    close = difflib.get_close_matches(name, registry, n=3, cutoff=0.6)
    close += difflib.get_close_matches(name, others, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))[:3]
    hint = f"did you mean {', '.join(close)}?" if close else "`fastlesion models` lists the registry"
    return ModelError(f"unknown model {name!r}; {hint}")


def _resolve(name: str) -> Callable[..., nn.Module]:
    """The builder for a registry name or any architecture timm knows (pretrained tags like ``.a1_in1k`` allowed)."""
    if name in _REGISTRY:
        return _REGISTRY[name].builder
    import timm

    if isinstance(name, str) and name and timm.is_model(name):
        return partial(_build_timm, name)
    raise _unknown(str(name))


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained_path: str | None = None,
    pretrained: bool = False,
    pretrained_strict: bool = True,
) -> nn.Module:
    """Build a model with random weights, or the architecture's pretrained ones, or load a local weights file.

    Args:
        name: Registry name (:func:`list_models`) or any other timm architecture name.
        num_classes: Output logits (>= 1).
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate (ignored, with a warning, where the architecture has none).
        pretrained_path: Local weights file loaded with :func:`load_pretrained` (a different head is skipped).
        pretrained: The architecture's ImageNet weights through timm (Hugging Face hub cache) or torchvision (its
            weights API); the head of another shape stays at random init. Not with ``pretrained_path``.
        pretrained_strict: Refuse a ``pretrained_path`` file that leaves model tensors out or holds others.

    Returns:
        The model (in train mode, on CPU); ``model.fastlesion_name`` holds ``name``.

    Raises:
        ModelError: Unknown name, bad argument, a weights file that does not fit, or pretrained weights that
            cannot be had (offline without a cached copy; an architecture without any).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model {name!r}: num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"model {name!r}: in_chans must be an integer >= 1, got {in_chans!r}")
    for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0.0 <= value < 1.0:
            raise ModelError(f"model {name!r}: {key} must be in [0, 1), got {value}")
    if pretrained and pretrained_path is not None:
        raise ModelError(f"model {name!r}: pretrained and pretrained_path both give the starting weights; set one")
    builder = _resolve(name)
    kwargs: dict[str, Any] = {"pretrained": True} if pretrained else {}  # custom builders need not know the flag
    try:
        model = builder(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, **kwargs)
    except TypeError as e:
        if pretrained and "pretrained" in str(e):
            raise ModelError(f"model {name!r} was registered without pretrained weights (its builder takes no "
                             "'pretrained' argument); pass a weights file with --pretrained FILE") from None
        raise
    model.fastlesion_name = name
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path, strict=pretrained_strict)
    return model


# ----------------------------------------------------------------------------------------------------- weights file


def _read_weights(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ModelError(f"weights file {path} is .safetensors but the safetensors package is missing") from e
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise ModelError(f"weights file {path} cannot be read as safetensors: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"weights file {path} cannot be loaded with torch.load(weights_only=True): {first}") from e


def _strip_prefixes(key: str) -> str:
    key = key.replace("._orig_mod.", ".")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a raw state_dict or of a checkpoint dict keeping them under 'model' / 'state_dict'."""
    for _ in range(3):  # nested wrappers such as {"state_dict": {"model": {...}}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise ModelError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    state = {_strip_prefixes(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelError(f"weights file {path} holds no tensors (expected a state_dict, or one under 'model')")
    return state


def _head_prefixes(model: nn.Module) -> list[str]:
    """Module names of the output head: timm ``get_classifier`` / pretrained_cfg, else the last Linear; a
    segmentation model's ``segmentation_head`` (and smp's auxiliary ``classification_head`` when it has one)."""
    if is_segmentation_model(model):
        return [n for n in ("segmentation_head", "classification_head") if isinstance(getattr(model, n, None),
                                                                                    nn.Module)]
    names = {id(m): n for n, m in model.named_modules()}
    heads: list[str] = []
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            found = getter()
        except Exception:  # noqa: BLE001 - exotic models; fall back below
            found = None
        for module in found if isinstance(found, (tuple, list)) else [found]:
            if isinstance(module, nn.Module) and id(module) in names and names[id(module)]:
                heads.append(names[id(module)])
    cfg = getattr(model, "pretrained_cfg", None)
    classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    for name in classifier if isinstance(classifier, (tuple, list)) else [classifier]:
        if isinstance(name, str) and name:
            heads.append(name)
    if not heads:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        if linears:
            heads.append(linears[-1])
    return list(dict.fromkeys(heads))


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def split_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(body, head)`` parameters: the head is the classifier (timm ``get_classifier()`` /
    ``pretrained_cfg["classifier"]``, torchvision's ``fc`` / ``classifier`` and LeNet's ``fc3``, else the last
    ``nn.Linear``); the body is every other parameter. For a segmentation model the body is the (pretrained)
    encoder and the head everything else: decoder and segmentation head, all new. Shared tensors are listed once,
    in ``parameters()`` order.

    Raises:
        ModelError: No classifier head can be told apart (nothing to train alone, or to give another lr).
    """
    if is_segmentation_model(model):
        heads = [n for n, _ in model.named_children() if n != "encoder"]
    else:
        heads = _head_prefixes(model)
    head_ids = {id(p) for h in heads for n, p in model.named_parameters() if n == h or n.startswith(h + ".")}
    if not head_ids:
        arch = getattr(model, "fastlesion_name", None) or type(model).__name__
        raise ModelError(f"model {arch}: no classifier head found (get_classifier(), pretrained_cfg['classifier'] or "
                         "a last nn.Linear); model.freeze_epochs and optim.backbone_lr_mult need one")
    body, head = [], []
    for p in model.parameters():  # parameters() lists a shared tensor once
        (head if id(p) in head_ids else body).append(p)
    return body, head


def load_pretrained(model: nn.Module, path: str, strict_head: bool = False, strict: bool = True) -> dict:
    """Load a local weights file into ``model`` in place (nothing is downloaded).

    Accepts a raw state_dict, a checkpoint dict keeping it under ``'model'`` (fastlesion) or ``'state_dict'``,
    and timm / torchvision ``.pth`` or ``.safetensors`` files. ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
    prefixes are stripped. A classifier head whose shape differs (ImageNet's 1000 classes into a 2-class model) is
    skipped with a warning, so fine-tuning starts from the backbone.

    A segmentation model takes a segmentation checkpoint (keys ``encoder.*``, ``decoder.*``, ...) as above, or the
    weights of its encoder alone: a timm file of that architecture or a fastlesion classification checkpoint of it
    (``resnet34`` into ``unet_resnet34``). Those go into the encoder; the classifier's parts the encoder has no use
    for (``fc``, ``conv_head``, ...) are left out, and the decoder keeps its random init.

    Args:
        model: The freshly built model.
        path: The weights file.
        strict_head: Refuse a head whose shape differs instead of skipping it.
        strict: Refuse a file that leaves any tensor of the model's body out (the head may be absent) or holds
            tensors the model lacks: the mark of another architecture (resnet18 weights into resnet34). With
            False such files load what fits and the rest is a warning.

    Returns:
        ``{"path", "loaded", "missing", "skipped", "unexpected"}``: lists of keys loaded, left at their random init
        (absent from the file), skipped (head of another shape) and in the file but not in the model.

    Raises:
        ModelError: Missing or unreadable file, a backbone tensor of another shape, a differing head with
            ``strict_head``, a file matching fewer than half of the model's keys (another architecture), or with
            ``strict`` any tensor of the body absent from the file or any tensor of the file unknown to the model.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"weights file {file} not found" + (" (it is a directory)" if file.is_dir() else ""))
    raw = _read_weights(file)
    state = _extract_state_dict(raw, file)
    if isinstance(raw, Mapping) and raw.get("pruned_structure"):  # `fastlesion prune --method structured`
        _reshape_pruned(model, raw["pruned_structure"], state, file)
    if is_segmentation_model(model) and not any(k.startswith("encoder.") for k in state):
        info = _load_encoder_state(model, state, f"weights file {file}", strict=strict)
    else:
        info = _load_state(model, state, f"weights file {file}", strict_head=strict_head, strict=strict)
    return {"path": str(file), **info}


def _load_encoder_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> dict:
    """Classifier weights of the encoder's architecture into a segmentation model's timm encoder.

    The keys the timm classifier has and the feature extractor lacks (its head: ``fc``, ``classifier``,
    ``conv_head``, ...) are dropped; with ``strict`` every encoder tensor must be in ``state`` and every other key of
    ``state`` must be one of those. Keys are reported with the model's names (``encoder.model.<key>``).
    """
    import timm

    arch = getattr(model, "fastlesion_name", None) or type(model).__name__
    encoder = getattr(model.encoder, "model", None)
    timm_name = getattr(model.encoder, "name", None)
    if not isinstance(encoder, nn.Module) or not isinstance(timm_name, str):
        raise ModelError(f"{source}: {arch} has no timm encoder to load classifier weights into; pass a "
                         "segmentation checkpoint (keys encoder.*, decoder.*)")
    prefix = "encoder.model."
    try:
        with torch.device("meta"):
            classifier_keys = set(timm.create_model(timm_name).state_dict())
    except Exception:  # noqa: BLE001 - some initialisers refuse meta tensors
        classifier_keys = set(timm.create_model(timm_name).state_dict())
    own = encoder.state_dict()
    extra = sorted(set(classifier_keys) - set(own))  # the classifier's head, unused by the feature extractor
    fitting = {k: v for k, v in state.items() if k in own}
    if len(fitting) * 2 < len(own):
        raise ModelError(f"{source} does not fit {arch}: neither a segmentation checkpoint (no encoder.* keys) nor "
                         f"the weights of its encoder {timm_name} (only {len(fitting)} of the encoder's {len(own)} "
                         "tensors are in the file)")
    for key, value in fitting.items():
        if value.shape != own[key].shape:
            raise ModelError(f"{source} does not fit {arch}'s encoder {timm_name}: {key} has shape {_shape(value)} "
                             f"in the file, {_shape(own[key])} in the model")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in classifier_keys]
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if strict and (real_missing or unexpected):
        what = []
        if real_missing:
            what.append(f"{len(real_missing)} of the encoder's tensors are not in the file (first: "
                        f"{', '.join(real_missing[:3])})")
        if unexpected:
            what.append(f"{len(unexpected)} tensors of the file are not in {timm_name} (first: "
                        f"{', '.join(unexpected[:3])})")
        raise ModelError(f"{source} does not fit {arch}'s encoder {timm_name}: {'; '.join(what)}; set "
                         "model.pretrained_strict false to load the tensors that fit")
    encoder.load_state_dict(fitting, strict=False)
    dropped = [k for k in state if k in extra]
    log.info("%s: loaded %d/%d encoder tensors from %s (classifier parts left out: %s); the decoder keeps its "
             "random init", arch, len(fitting), len(own), source, ", ".join(dropped) or "none")
    if real_missing or unexpected:
        log.warning("%s: encoder tensors absent from %s: %d; tensors of it unused: %d", arch, source,
                    len(real_missing), len(unexpected))
    decoder = [k for k in model.state_dict() if not k.startswith(prefix)]
    return {"loaded": [prefix + k for k in fitting], "missing": [prefix + k for k in missing] + decoder,
            "skipped": dropped, "unexpected": unexpected}


def _reshape_pruned(model: nn.Module, structure: dict, state: Mapping[str, torch.Tensor], file: Path) -> None:
    """Give ``model`` the channel counts of a structurally pruned checkpoint, so its weights fit (and a run that
    starts from it keeps the pruned, smaller network; its own checkpoints record the structure again)."""
    from fastlesion.prune import apply_structure

    n_out = [t.shape[0] for k, t in state.items() if k.endswith(".weight") and t.ndim == 2]
    want = model.state_dict()
    head = [k for k, t in want.items() if k.endswith(".weight") and t.ndim == 2]
    if head and n_out and want[head[-1]].shape[0] != n_out[-1]:
        raise ModelError(f"weights file {file}: a structurally pruned model of {n_out[-1]} classes cannot start a "
                         f"{want[head[-1]].shape[0]}-class model (its head's inputs were pruned with its body)")
    apply_structure(model, structure, dict(state))


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str | None = None,
                strict_head: bool = False, strict: bool = True) -> dict:
    """Copy the tensors of ``state`` that fit into ``model``; see :func:`load_pretrained` (``source`` names the
    weights in messages: ``weights file x.pth``, ``torchvision weights ResNet18_Weights.IMAGENET1K_V1``)."""
    arch = arch or getattr(model, "fastlesion_name", None) or type(model).__name__
    own = model.state_dict()

    common = [k for k in own if k in state]
    if len(common) * 2 < len(own):
        raise ModelError(
            f"{source} does not fit {arch}: only {len(common)} of the model's {len(own)} keys are in "
            f"the file (another architecture?)"
        )
    heads = _head_prefixes(model)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)
    loaded, skipped = [], []
    for key in common:
        if state[key].shape == own[key].shape:
            loaded.append(key)
        elif is_head(key) and not strict_head:
            skipped.append(key)
        elif is_head(key):
            raise ModelError(
                f"{source} has another classifier head than {arch}: {key} has shape "
                f"{_shape(state[key])} in the file, {_shape(own[key])} in the model (strict_head is on)"
            )
        else:
            raise ModelError(
                f"{source} does not fit {arch}: {key} has shape {_shape(state[key])} in the file, "
                f"{_shape(own[key])} in the model"
            )
    if len(loaded) * 2 < len(own):
        raise ModelError(
            f"{source} does not fit {arch}: only {len(loaded)} of the model's {len(own)} tensors match "
            f"(another architecture?)"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # the body must be whole: a head absent from the file (a backbone-only export) starts at random init anyway
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked") and not is_head(k)]
    if strict and (real_missing or unexpected):
        first = lambda keys: ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        what = []
        if real_missing:
            what.append(f"{len(real_missing)} of the model's tensors are not in the file (first: "
                        f"{first(real_missing)})")
        if unexpected:
            what.append(f"{len(unexpected)} tensors of the file are not in the model (first: {first(unexpected)})")
        raise ModelError(f"{source} does not fit {arch}: {'; '.join(what)} (weights of another architecture?); "
                         f"set model.pretrained_strict false to load the {len(loaded)} that fit and keep the rest "
                         "at random init")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    if skipped:
        log.warning("%s: classifier head of another shape not loaded from %s: %s", arch, source, ", ".join(skipped))
    if real_missing:
        log.warning(
            "%s: %d keys absent from %s keep their random init: %s",
            arch,
            len(real_missing),
            source,
            ", ".join(real_missing[:5]) + (" ..." if len(real_missing) > 5 else ""),
        )
    if unexpected:
        log.warning(
            "%s: %d keys of %s unused by the model: %s",
            arch,
            len(unexpected),
            source,
            ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""),
        )
    log.info("%s: loaded %d/%d tensors from %s", arch, len(loaded), len(own), source)
    return {"loaded": loaded, "missing": missing, "skipped": skipped, "unexpected": unexpected}


# ------------------------------------------------------------------------------------------------------- listings


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _count_for(name: str, num_classes: int) -> int:
    """Trainable parameters of ``name``: built on the meta device (no memory, fast), else normally."""
    try:
        with torch.device("meta"):
            return count_params(create_model(name, num_classes=num_classes))
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - some initialisers refuse meta tensors
        return count_params(create_model(name, num_classes=num_classes))


def count_flops(model: nn.Module, image_size: int = 224, in_chans: int = 3) -> int:
    """Forward FLOPs of one ``in_chans x image_size x image_size`` image, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs; convolutions, matmuls and
    attention are counted, elementwise ops such as activations and normalisation are not).

    The input is made on the device of the model's first parameter, so a model built on the meta device is counted
    without memory or compute. The model is run in eval mode under ``torch.no_grad`` and put back in its mode.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    x = torch.zeros(1, in_chans, image_size, image_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.dtype.is_floating_point else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _flops_for(name: str, num_classes: int, image_size: int) -> int | None:
    """Forward FLOPs of ``name`` at ``image_size``: built and run on the meta device (no memory, ~0.1 s a model on
    a 2-core CPU), else on CPU; None where the architecture cannot run at that size (a ViT at another size)."""
    try:
        with torch.device("meta"):
            return count_flops(create_model(name, num_classes=num_classes), image_size)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - some initialisers or ops refuse meta tensors
        pass
    try:
        return count_flops(create_model(name, num_classes=num_classes), image_size)
    except Exception as e:  # noqa: BLE001 - e.g. a fixed-size ViT at another image size
        log.warning("%s: no FLOPs at image size %d (%s)", name, image_size, _first_line(e))
        return None


def describe_models(names: list[str] | None = None, num_classes: int = 2, image_size: int | None = 224,
                    name_filter: str | None = None) -> list[dict]:
    """Rows for ``fastlesion models``: name, family, task, trainable parameters, forward FLOPs and note.

    Args:
        names: Models to describe (registry or timm names); None = the whole registry.
        num_classes: Head size the parameter counts of classifiers assume (segmentation models are counted with
            their one-channel lesion mask head).
        image_size: Input side the FLOPs are counted at (one ``3 x image_size x image_size`` image, forward);
            None leaves FLOPs out (``flops`` is None).
        name_filter: Keep only names containing this substring (case-insensitive).

    Returns:
        ``[{"name", "family", "task", "params", "flops", "note"}, ...]`` in the order asked (registry: sorted);
        ``flops`` is an int (see :func:`count_flops`) or None where the model cannot run at ``image_size``.

    Raises:
        ModelError: An unknown name.
    """
    rows = []
    for name in list_models() if names is None else names:
        if name_filter and name_filter.lower() not in name.lower():
            continue
        entry = _REGISTRY.get(name)
        task = entry.task if entry else "classification"
        classes = 1 if task == "segmentation" else num_classes
        rows.append(
            {
                "name": name,
                "family": entry.family if entry else "timm",
                "task": task,
                "params": _count_for(name, classes),
                "flops": _flops_for(name, classes, image_size) if image_size else None,
                "note": entry.note if entry else "timm architecture outside the curated registry",
            }
        )
    return rows
