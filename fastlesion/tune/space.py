"""The search space: a YAML file of dotted config keys, each a distribution or a constant::

    optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    model.name: {choice: [resnet18, efficientnet_b0]}
    optim.momentum: 0.9          # a plain value: the same in every trial

It is parsed into :class:`Param` per key (:func:`load_space`, :func:`parse_space`) and checked against the base
config before anything starts (:func:`check_space`): every value a key can take must make a valid config, so a
typo fails in a second here instead of in every trial on the cluster. :func:`param_space` turns it into Ray Tune's
samplers.

The default space depends on the base config's ``train.task`` (:func:`default_space`): classification searches
classifiers and their losses (:data:`DEFAULT_SPACE`, ``tune/space.yaml``), segmentation U-Nets and Dice/BCE
(:data:`DEFAULT_SEG_SPACE`, ``tune/space_seg.yaml``). A key that only one task reads (``optim.label_smoothing``
with a segmentation base, ``optim.dice_weight`` with a classification one) is refused: searching it would only
spend trials on a value the run never uses.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastlesion.config import SECTIONS, Config, ConfigError, check_key, lookup, read_yaml, replace
from fastlesion.errors import FastlesionError
from fastlesion.tune.resources import import_ray

SPACE_KINDS = ("loguniform", "uniform", "quniform", "randint", "choice")
# keys the search may not set: the tuner owns them
RESERVED_KEYS = {"train.epochs": "the epoch budget is --epochs (ASHA's max_t)",
                 "train.ddp": "a trial is one process; give it more GPUs with --gpus-per-trial",
                 "run.out": "every trial gets its own folder in the experiment"}
# the default search space; tune/space.yaml (what `python tune/asha.py` reads by default) is this, commented
DEFAULT_SPACE: dict[str, Any] = {
    "optim.lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "optim.weight_decay": {"loguniform": [1.0e-6, 1.0e-1]},
    "loader.batch_size": {"choice": [32, 64, 128]},
    "optim.name": {"choice": ["adamw", "sgd"]},
    "model.name": {"choice": ["resnet18", "efficientnet_b0", "mobilenetv2_100", "densenet121"]},
    "model.drop_rate": {"uniform": [0.0, 0.4]},
    "loader.aug_strength": {"uniform": [0.5, 1.5]},
    "optim.loss": {"choice": ["ce", "weighted_ce", "focal"]},
    "data.image_size": {"choice": [224, 256]},
}
# the default search space of a segmentation base (train.task=segmentation); tune/space_seg.yaml is this, commented
DEFAULT_SEG_SPACE: dict[str, Any] = {
    "optim.lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "optim.weight_decay": {"loguniform": [1.0e-6, 1.0e-1]},
    "loader.batch_size": {"choice": [8, 16, 32]},
    "optim.name": {"choice": ["adamw", "sgd"]},
    "model.name": {"choice": ["unet_resnet18", "unet_resnet34", "unet_efficientnet_b0", "fpn_resnet34"]},
    "model.drop_rate": {"uniform": [0.0, 0.3]},
    "loader.aug_strength": {"uniform": [0.5, 1.5]},
    "optim.loss": {"choice": ["dice_bce", "dice", "bce"]},
    "optim.dice_weight": {"uniform": [0.2, 0.8]},
    "data.image_size": {"choice": [224, 256]},
}
DEFAULT_SPACES: dict[str, dict[str, Any]] = {"classification": DEFAULT_SPACE, "segmentation": DEFAULT_SEG_SPACE}
"""``train.task`` -> its default search space (:func:`default_space`)."""
# keys only one task reads: searching them for the other task spends trials on a value the run ignores
TASK_ONLY_KEYS: dict[str, str] = {
    "optim.label_smoothing": "classification", "optim.focal_gamma": "classification",
    "loader.oversample": "classification", "loader.oversample_power": "classification",
    "loader.eval_crop": "classification", "data.class_map": "classification",
    "optim.dice_weight": "segmentation", "data.mask_col": "segmentation",
}
SEG_SIZE_MULTIPLE = 32  # a segmentation model's input side must be a multiple of this (the encoder's stride)


@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` is a :data:`SPACE_KINDS` entry or ``constant``; ``args`` its arguments."""

    key: str
    kind: str
    args: tuple

    def describe(self) -> str:
        if self.kind == "constant":
            return repr(self.args[0])
        return f"{self.kind}{list(self.args)}"


# --------------------------------------------------------------------------------------------------- parsing
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_range(where: str, kind: str, args: Any) -> None:
    """The arguments of a numeric distribution: ``[low, high]`` (``[low, high, q]`` for quniform)."""
    n = 3 if kind == "quniform" else 2
    shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
    if not isinstance(args, (list, tuple)) or len(args) != n or not all(_number(a) for a in args):
        raise ConfigError(f"{where}: {kind} needs {shape} numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {list(args)}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"{where}: quniform needs q > 0, got {args[2]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint needs integer bounds (high excluded), got {list(args)}")


def parse_param(key: Any, value: Any, source: str = "search space") -> Param:
    """One entry of a space file: ``{loguniform: [lo, hi]}``, ``{choice: [...]}``, ... or a plain constant."""
    if not isinstance(key, str):
        raise ConfigError(f"{source}: keys are dotted config keys (section.key), got {key!r}")
    where = f"{source}: {key}"
    if not isinstance(value, dict):
        return Param(key, "constant", (value,))
    if len(value) != 1 or next(iter(value)) not in SPACE_KINDS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{k}: [...]' for k in SPACE_KINDS)}}} or a "
                          f"plain value, got {value!r}")
    kind, args = next(iter(value.items()))
    if kind == "choice":
        if not isinstance(args, (list, tuple)):
            raise ConfigError(f"{where}: choice needs a list of values, got {args!r}")
        if not args:
            raise ConfigError(f"{where}: empty choice list")
    else:
        _check_range(where, kind, args)
    return Param(key, kind, tuple(args))


def parse_space(d: Any, source: str = "search space") -> dict[str, Param]:
    """A space mapping (dotted key -> distribution or constant) -> :class:`Param` per key (config not checked)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of dotted config keys, got {type(d).__name__}")
    return {p.key: p for p in (parse_param(k, v, source) for k, v in d.items())}


def default_space(task: str = "classification") -> dict[str, Any]:
    """The default space of a base config with ``train.task`` = ``task`` (a copy)."""
    if task not in DEFAULT_SPACES:
        raise ConfigError(f"unknown train.task {task!r}; choose one of {tuple(DEFAULT_SPACES)}")
    return dict(DEFAULT_SPACES[task])


def load_space(path: str | Path | None = None, task: str = "classification") -> dict[str, Param]:
    """Read a space YAML file (None: the default space of ``task``, :func:`default_space`)."""
    if path is None:
        return parse_space(default_space(task), f"default {task} search space")
    return parse_space(read_yaml(path, "search space file"), str(Path(path)))


def space_to_dict(space: dict[str, Param]) -> dict[str, Any]:
    """The YAML/JSON form of a space (what :func:`parse_space` reads)."""
    return {k: p.args[0] if p.kind == "constant" else {p.kind: list(p.args)} for k, p in space.items()}


# --------------------------------------------------------------------------------------------------- checks
def _field_type(key: str) -> Any:
    section, name = key.split(".")
    tp = typing.get_type_hints(SECTIONS[section])[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _check_model(name: Any, task: str = "classification") -> None:
    """An unknown model name fails now, with the registry's own message (close names suggested); so does a model of
    the other task (a classifier in a segmentation search, whose config would silently train the default U-Net)."""
    from fastlesion.models import list_models, model_task

    kind = model_task(str(name))  # raises ModelError("unknown model ...; did you mean ...?")
    if kind != task:
        raise ConfigError(f"{name!r} is a {kind} model but train.task is {task} (`fastlesion models` lists them; "
                          f"e.g. {', '.join(list_models(task)[:3])})")


def _probe_values(p: Param) -> list[Any]:
    """Values that stand for everything ``p`` can sample: every choice, or the ends of a range."""
    if p.kind in ("constant",):
        return [p.args[0]]
    if p.kind == "choice":
        return list(p.args)
    if p.kind == "randint":
        return [p.args[0], p.args[1] - 1]
    if p.kind == "quniform":
        lo, hi, q = p.args
        return [round(lo / q) * q, round(hi / q) * q]
    return [p.args[0], p.args[1]]


def _check_size(size: Any, task: str) -> None:
    if task == "segmentation" and isinstance(size, int) and size % SEG_SIZE_MULTIPLE:
        raise ConfigError(f"a segmentation model needs an input side that is a multiple of {SEG_SIZE_MULTIPLE}, "
                          f"got {size}")


def check_space(space: dict[str, Param], base: Config) -> None:
    """Every key is a config field the search may set and that the base config's task reads, and every value it
    can take makes a valid config (models of the base's task, segmentation sizes a multiple of 32)."""
    task = base.train.task
    for key, p in space.items():
        try:
            check_key(key)
        except ConfigError as e:
            raise ConfigError(f"search space: {e}") from None
        if key in RESERVED_KEYS:
            raise ConfigError(f"search space: {key} cannot be searched ({RESERVED_KEYS[key]})")
        if TASK_ONLY_KEYS.get(key, task) != task:
            raise ConfigError(f"search space: {key} has no effect on a {task} run (only {TASK_ONLY_KEYS[key]} reads "
                              "it); remove it from the space")
        tp = _field_type(key)
        if tp is int and p.kind in ("uniform", "loguniform"):
            raise ConfigError(f"search space: {key} is an integer; use randint, quniform or choice, not {p.kind}")
        for v in _probe_values(p):
            try:
                if key == "model.name":
                    _check_model(v, task)
                if key == "data.image_size":
                    _check_size(v, task)
                # the config refuses a value of the other task (replace: optim.loss ce on a segmentation base, ...)
                replace(base, **{key: v})
            except FastlesionError as e:
                raise ConfigError(f"search space: {key} = {v!r}: {e}") from None
    for key, check in (("model.name", _check_model), ("data.image_size", _check_size)):
        if key not in space:
            try:
                check(lookup(base, key), task)
            except FastlesionError as e:
                raise ConfigError(f"{key}: {e}") from None


# --------------------------------------------------------------------------------------------------- Ray Tune
def param_space(space: dict[str, Param]) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one sampler (or constant) per dotted key."""
    _, tune = import_ray()
    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "quniform": tune.quniform,
              "randint": tune.randint}
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.kind == "constant":
            out[key] = p.args[0]
        elif p.kind == "choice":
            out[key] = tune.choice(list(p.args))
        else:
            out[key] = makers[p.kind](*p.args)
    return out
