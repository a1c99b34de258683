"""Checkpoints: atomic writes (temp file + rename), loaded with ``weights_only=True``; EMA of the weights.

A checkpoint holds the raw module's ``state_dict`` (never a compiled or DDP wrapper's, so no ``_orig_mod.`` or
``module.`` prefixes), the optimizer, scaler and schedule state, the epoch, RNG states, early-stopping state, the
class names, the model name and the resolved config — everything ``--resume`` and ``fastlesion eval`` need.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastlesion.errors import FastlesionError


def unwrap(model: nn.Module) -> nn.Module:
    """The raw module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to ``path.tmp`` then rename: a crash mid-write never leaves a half checkpoint under ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a Python file, so that a full disk surfaces as the OSError behind torch's error
            torch.save(obj, f)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError) and cause.errno is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(tmp)) from e  # one line naming the file (cli.run_command)
        raise
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FastlesionError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise FastlesionError(f"{path}: not a readable fastlesion checkpoint ({str(e).splitlines()[0]})") from None


def rng_state() -> dict[str, Any]:
    """RNG states as plain types (tensors, ints, lists) so that ``weights_only=True`` can load them."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(py_state), "python_version": py_version,
             "python_gauss": py_gauss,
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state.get("python_gauss")))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Ema:
    """Exponential moving average of a module's weights (buffers copied), validated instead of the live weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model).state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.lerp_(src[k].detach(), 1.0 - self.decay)
            else:
                v.copy_(src[k])
