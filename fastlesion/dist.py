"""Distributed setup: DistInfo from the torchrun environment, and a local launcher for ``--ddp N``.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) :func:`setup` joins the job; ``fastlesion train --ddp N``
starts N local workers with :func:`launch` (NCCL on GPUs, gloo on CPU). Multi-node is torchrun's job.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastlesion.errors import FastlesionError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from the environment (torchrun's variables); single process otherwise."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def setup(device_type: str) -> DistInfo:
    """Join the process group when WORLD_SIZE > 1 (NCCL for CUDA, gloo for CPU)."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                device_id=torch.device("cuda", info.local_rank) if device_type == "cuda" else None)
    return info


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one element without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and give its result (or its user error) to every rank, so no rank waits forever.

    The others wait in the broadcast meanwhile: what rank 0 writes first (a synthetic set, a folds file, the run
    folder) exists before any other rank could look for it.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except FastlesionError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise FastlesionError(error)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world(n: int, device_type: str) -> None:
    """``--ddp N`` must fit the GPUs present, or on CPU the cores (gloo workers beyond them only slow down)."""
    if n < 1:
        raise FastlesionError(f"--ddp must be >= 1, got {n}")
    if device_type == "cuda":
        have = torch.cuda.device_count()
        if n > have:
            raise FastlesionError(f"--ddp {n} asks for {n} GPUs but {have} are visible "
                                  f"(CUDA_VISIBLE_DEVICES); use --ddp {have} or torchrun for multi-node")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if n > cores:
            raise FastlesionError(f"--ddp {n} asks for {n} CPU workers but this machine has {cores} cores and no "
                                  f"GPU; use --ddp {cores} or fewer (or run on GPUs)")


def _worker(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def launch(fn: Callable[..., Any], args: tuple, world_size: int) -> None:
    """Run ``fn(*args)`` in ``world_size`` local processes (spawned); a crashed worker stops the others.

    ``torch.multiprocessing.start_processes`` terminates the remaining workers when one exits with an error, so a
    crash never leaves the others hanging in a collective; the first error is re-raised here as one line.
    """
    import torch.multiprocessing as mp

    port = free_port()
    try:
        mp.start_processes(_worker, args=(world_size, port, fn, args), nprocs=world_size, join=True,
                           start_method="spawn")
    except mp.ProcessRaisedException as e:
        msg = str(e).strip().splitlines()
        last = msg[-1] if msg else repr(e)
        raise FastlesionError(f"DDP worker failed: {last}") from None
    except mp.ProcessExitedException as e:
        raise FastlesionError(f"DDP worker {e.error_index} exited with code {e.exit_code}; the others were "
                              "stopped") from None
