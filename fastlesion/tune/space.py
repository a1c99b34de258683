"""The search space: a YAML file of dotted config keys, each a distribution or a constant::

    optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    model.name: {choice: [resnet18, efficientnet_b0]}
    optim.momentum: 0.9          # a plain value: the same in every trial

It is parsed into :class:`Param` per key (:func:`load_space`, :func:`parse_space`) and checked against the base
config before anything starts (:func:`check_space`): every value a key can take must make a valid config, so a
typo fails in a second here instead of in every trial on the cluster. :func:`param_space` turns it into Ray Tune's
samplers.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastlesion.config import SECTIONS, Config, ConfigError, check_key, read_yaml, replace
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


def load_space(path: str | Path | None = None) -> dict[str, Param]:
    """Read a space YAML file (None: :data:`DEFAULT_SPACE`)."""
    if path is None:
        return parse_space(DEFAULT_SPACE, "default search space")
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


def _check_model(name: Any) -> None:
    """An unknown model name fails now, with create_model's own message (close names suggested)."""
    from fastlesion.models import create_model, list_models

    if name in list_models():
        return
    import timm

    if isinstance(name, str) and name and timm.is_model(name):
        return
    create_model(str(name), num_classes=2)  # raises ModelError("unknown model ...; did you mean ...?")


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


def check_space(space: dict[str, Param], base: Config) -> None:
    """Every key is a config field the search may set, and every value it can take makes a valid config."""
    for key, p in space.items():
        try:
            check_key(key)
        except ConfigError as e:
            raise ConfigError(f"search space: {e}") from None
        if key in RESERVED_KEYS:
            raise ConfigError(f"search space: {key} cannot be searched ({RESERVED_KEYS[key]})")
        tp = _field_type(key)
        if tp is int and p.kind in ("uniform", "loguniform"):
            raise ConfigError(f"search space: {key} is an integer; use randint, quniform or choice, not {p.kind}")
        for v in _probe_values(p):
            try:
                replace(base, **{key: v})
                if key == "model.name":
                    _check_model(v)
            except FastlesionError as e:
                raise ConfigError(f"search space: {key} = {v!r}: {e}") from None
    if "model.name" not in space:
        try:
            _check_model(base.model.name)
        except FastlesionError as e:
            raise ConfigError(f"model.name: {e}") from None


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
