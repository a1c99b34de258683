"""Model registry: curated timm names, torchvision models (``tv_`` prefix) and a small LeNet.

Nothing is ever downloaded: every network is built with random weights (timm ``pretrained=False``, torchvision
``weights=None``) and starts from a local file only when ``pretrained_path`` names one. Registering a model stores a
builder; nothing is instantiated until :func:`create_model` asks for it. Any other architecture timm knows is accepted
by :func:`create_model` too, so users can try names outside the curated list.

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
        family: Architecture family shown by ``fastlesion models`` (resnet, efficientnet, torchvision, ...).
        note: One short line shown next to it.
    """

    name: str
    builder: Callable[..., nn.Module]
    family: str = ""
    note: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module], family: str = "", note: str = "") -> None:
    """Add an architecture to the registry (nothing is built now).

    Args:
        name: Registry name; must not be registered already.
        builder: Called as ``builder(num_classes=, in_chans=, drop_rate=, drop_path_rate=)``.
        family: Architecture family for listings.
        note: One short descriptive line for listings.

    Raises:
        ModelError: The name is empty or taken, or the builder is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ModelError(f"model {name!r} is already registered")
    if not callable(builder):
        raise ModelError(f"model {name!r}: builder must be callable, got {type(builder).__name__}")
    _REGISTRY[name] = ModelEntry(name, builder, family, note)


def list_models() -> list[str]:
    """Sorted names of the curated registry (``create_model`` also accepts any other timm name)."""
    return sorted(_REGISTRY)


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


def _build_lenet(num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    if drop_path_rate > 0:
        log.warning("lenet has no stochastic depth; drop_path_rate=%s ignored", drop_path_rate)
    return LeNet(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


# ------------------------------------------------------------------------------------------------------------ timm


def _build_timm(
    arch: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, ...)``; drop_path_rate only where the architecture takes it."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    while True:
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as e:
            dropped = next((k for k in ("drop_path_rate", "drop_rate") if k in kwargs and k in str(e)), None)
            if dropped is None:
                raise
            log.warning("%s does not take %s; %s=%s ignored", arch, dropped, dropped, kwargs.pop(dropped))


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
    arch: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> nn.Module:
    """A torchvision classifier with ``weights=None``; dropout / stochastic depth where the constructor has them."""
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
    return model


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
) -> nn.Module:
    """Build a model with random weights, then optionally load a local weights file.

    Args:
        name: Registry name (:func:`list_models`) or any other timm architecture name.
        num_classes: Output logits (>= 1).
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate (ignored, with a warning, where the architecture has none).
        pretrained_path: Local weights file loaded with :func:`load_pretrained` (a different head is skipped).

    Returns:
        The model (in train mode, on CPU); ``model.fastlesion_name`` holds ``name``.

    Raises:
        ModelError: Unknown name, bad argument, or a weights file that does not fit.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model {name!r}: num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"model {name!r}: in_chans must be an integer >= 1, got {in_chans!r}")
    for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0.0 <= value < 1.0:
            raise ModelError(f"model {name!r}: {key} must be in [0, 1), got {value}")
    builder = _resolve(name)
    model = builder(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    model.fastlesion_name = name
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
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
    """Module names of the classifier head: timm ``get_classifier`` / pretrained_cfg, else the last Linear."""
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


def load_pretrained(model: nn.Module, path: str, strict_head: bool = False) -> dict:
    """Load a local weights file into ``model`` in place (nothing is downloaded).

    Accepts a raw state_dict, a checkpoint dict keeping it under ``'model'`` (fastlesion) or ``'state_dict'``,
    and timm / torchvision ``.pth`` or ``.safetensors`` files. ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
    prefixes are stripped. A classifier head whose shape differs (ImageNet's 1000 classes into a 2-class model) is
    skipped with a warning, so fine-tuning starts from the backbone.

    Args:
        model: The freshly built model.
        path: The weights file.
        strict_head: Refuse a head whose shape differs instead of skipping it.

    Returns:
        ``{"path", "loaded", "missing", "skipped", "unexpected"}``: lists of keys loaded, left at their random init
        (absent from the file), skipped (head of another shape) and in the file but not in the model.

    Raises:
        ModelError: Missing or unreadable file, a backbone tensor of another shape, a differing head with
            ``strict_head``, or a file matching fewer than half of the model's keys (another architecture).
    """
    file = Path(path)
    arch = getattr(model, "fastlesion_name", None) or type(model).__name__
    if not file.is_file():
        raise ModelError(f"weights file {file} not found" + (" (it is a directory)" if file.is_dir() else ""))
    state = _extract_state_dict(_read_weights(file), file)
    own = model.state_dict()

    common = [k for k in own if k in state]
    if len(common) * 2 < len(own):
        raise ModelError(
            f"weights file {file} does not fit {arch}: only {len(common)} of the model's {len(own)} keys are in "
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
                f"weights file {file} has another classifier head than {arch}: {key} has shape "
                f"{_shape(state[key])} in the file, {_shape(own[key])} in the model (strict_head is on)"
            )
        else:
            raise ModelError(
                f"weights file {file} does not fit {arch}: {key} has shape {_shape(state[key])} in the file, "
                f"{_shape(own[key])} in the model"
            )
    if len(loaded) * 2 < len(own):
        raise ModelError(
            f"weights file {file} does not fit {arch}: only {len(loaded)} of the model's {len(own)} tensors match "
            f"(another architecture?)"
        )
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if skipped:
        log.warning("%s: classifier head of another shape not loaded from %s: %s", arch, file, ", ".join(skipped))
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if real_missing:
        log.warning(
            "%s: %d keys absent from %s keep their random init: %s",
            arch,
            len(real_missing),
            file,
            ", ".join(real_missing[:5]) + (" ..." if len(real_missing) > 5 else ""),
        )
    if unexpected:
        log.warning(
            "%s: %d keys of %s unused by the model: %s",
            arch,
            len(unexpected),
            file,
            ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""),
        )
    log.info("%s: loaded %d/%d tensors from %s", arch, len(loaded), len(own), file)
    return {"path": str(file), "loaded": loaded, "missing": missing, "skipped": skipped, "unexpected": unexpected}


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


def describe_models(names: list[str] | None = None, num_classes: int = 2) -> list[dict]:
    """Rows for ``fastlesion models``: name, family, trainable parameters and note.

    Args:
        names: Models to describe (registry or timm names); None = the whole registry.
        num_classes: Head size the parameter counts assume.

    Returns:
        ``[{"name", "family", "params", "note"}, ...]`` in the order asked (registry: sorted).

    Raises:
        ModelError: An unknown name.
    """
    rows = []
    for name in list_models() if names is None else names:
        entry = _REGISTRY.get(name)
        rows.append(
            {
                "name": name,
                "family": entry.family if entry else "timm",
                "params": _count_for(name, num_classes),
                "note": entry.note if entry else "timm architecture outside the curated registry",
            }
        )
    return rows
