"""Ray itself and what it can run: the lazy import, starting or reaching Ray, and the CPUs/GPUs each trial gets.

Nothing here imports Ray at import time: :func:`import_ray` does, when an entry needs it, and turns its absence
into one :class:`FastlesionError` line (:data:`INSTALL_HINT`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastlesion.errors import FastlesionError
from fastlesion.tune.settings import TuneSettings

INSTALL_HINT = "Ray Tune is not installed: pip install 'ray[tune]'"


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.tune)``, or a :class:`FastlesionError` saying how to install Ray Tune."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise FastlesionError(INSTALL_HINT) from e
    return ray, tune


def local_resources() -> dict[str, float]:
    """What ``ray.init()`` gets on this machine: every core and every visible GPU."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def cluster_resources(ray: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(total, largest node) CPUs and GPUs of the connected Ray cluster."""
    total = {k: float(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU")}
    largest = {"CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", True)):
            res = node.get("Resources", {})
            for k in largest:
                largest[k] = max(largest[k], float(res.get(k, 0)))
    return total, largest


def resolve_resources(settings: TuneSettings, total: dict[str, float], largest: dict[str, float] | None = None,
                      where: str = "this machine") -> tuple[float, float]:
    """(gpus_per_trial, cpus_per_trial) with the defaults filled in; an error when no node can run a trial.

    A trial that asks for more than the largest node has would stay PENDING forever, so that is refused here.
    """
    largest = largest or total
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    g = settings.gpus_per_trial if settings.gpus_per_trial is not None else (1.0 if gpus >= 1 else 0.0)
    if g > largest.get("GPU", 0.0):
        have = f"{largest.get('GPU', 0.0):g} GPU(s)" + (" on its largest node" if largest != total else "")
        raise FastlesionError(f"--gpus-per-trial {g:g} but {where} has {have}; "
                              + ("use --gpus-per-trial 0 to run the trials on CPUs" if gpus == 0 else
                                 "ask for fewer GPUs per trial"))
    if settings.cpus_per_trial is not None:
        c = float(settings.cpus_per_trial)
    elif g > 0:
        c = float(max(1, int(cpus // max(1, int(gpus // g)))))
    else:
        c = 1.0
    if c > largest.get("CPU", 0.0):
        have = f"{largest.get('CPU', 0.0):g} CPU(s)" + (" on its largest node" if largest != total else "")
        raise FastlesionError(f"--cpus-per-trial {c:g} but {where} has {have}; ask for fewer CPUs per trial")
    return g, c


def concurrency(total: dict[str, float], gpus_per_trial: float, cpus_per_trial: float) -> int:
    """How many trials the resources let run at once."""
    n = int(total.get("CPU", 0) // cpus_per_trial)
    if gpus_per_trial > 0:
        n = min(n, int(total.get("GPU", 0) // gpus_per_trial + 1e-9))
    return max(n, 0)


def init_ray(address: str | None) -> tuple[Any, bool]:
    """Connect to ``address`` (``auto``, ``ray://host:10001``) or start a local Ray sized to this machine.

    Returns ``(ray, started)``: ``started`` when this call started Ray (the caller shuts it down).
    """
    ray, _ = import_ray()
    if ray.is_initialized():
        return ray, False
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            res = local_resources()
            ray.init(num_cpus=int(res["CPU"]), num_gpus=int(res["GPU"]), include_dashboard=False,
                     logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastlesionError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {first}") from e
    return ray, True


@contextmanager
def ray_session(settings: TuneSettings, address: str | None) -> Iterator[tuple[dict[str, float], float, float]]:
    """Ray for one search, and what each trial gets on it: yields ``(total resources, gpus, cpus per trial)``.

    The resources are checked against the cluster Ray reports (a remote one may differ from this machine). Ray is
    shut down on the way out only when this started it: a cluster, or a Ray the caller started, stays up.
    """
    ray, started = init_ray(address)
    try:
        total, largest = cluster_resources(ray)
        g, c = resolve_resources(settings, total, largest,
                                 where=f"the Ray cluster at {address}" if address else "the local Ray")
        yield total, g, c
    finally:
        if started:
            ray.shutdown()
