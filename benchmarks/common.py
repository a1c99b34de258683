"""Shared pieces of the benchmarks: models and runtimes built as training builds them, timing, samplers, rows.

Nothing here re-implements training: the step is :func:`fastlesion.engine.loop.train_step`, the optimizer comes from
:func:`fastlesion.engine.optim.create_optimizer`, the runtime is a :class:`fastlesion.engine.runtime.Runtime` (its
``set_backends`` holds the cudnn/TF32 switches) and the model is wrapped by training's own
:func:`fastlesion.engine.runtime.wrap_model` (``create_model -> to(device) -> channels_last -> torch.compile``), so a
benchmark measures exactly what training runs. User errors fail as the CLI's do (:func:`run_main`).

A segmentation model (``unet_resnet34``, ...: :func:`fastlesion.models.model_task`) is benchmarked as
``fastlesion train --task segmentation`` trains it: one mask-logit channel, the Dice + BCE loss of the training code
(``optim.loss=dice_bce``), and batches of images with float masks ``N x 1 x S x S``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastlesion.config import LoaderConfig, OptimConfig
from fastlesion.engine.optim import create_optimizer
from fastlesion.engine.runtime import Runtime, wrap_model
from fastlesion.errors import FastlesionError

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Mode name of the precision -> autocast dtype (None = plain fp32)."""

REQUIRED_KEYS = ("model", "mode", "batch_size", "images_per_s", "device_name")
"""Keys every result row carries (issue #6); the comparison relies on them."""

SEG_LOSS = "dice_bce"
"""The training loss a segmentation model is benchmarked with (``optim.loss``; the segmentation default)."""
SEG_SIZE_MULTIPLE = 32
"""A segmentation model's input side must be a multiple of this (its encoder's output stride)."""


# ------------------------------------------------------------------------------------------------------ errors
class BenchmarkError(FastlesionError, SystemExit):
    """A user error of a benchmark (a bad flag value, missing data or result files): one line naming the culprit.

    A :class:`FastlesionError`, so a script's ``main`` (:func:`run_main`) prints it as one ``error:`` line and exits
    with status 2, as the ``fastlesion`` CLI does; also a ``SystemExit``, so a script body called directly
    (``run(argv)`` from a test or another script) stops with it as it always did.
    """

    def __init__(self, message: str) -> None:
        SystemExit.__init__(self, message)  # sets ``code`` too: uncaught, it still exits non-zero with the message


def run_main(body: Callable[[], int | list[dict[str, Any]]]) -> int:
    """A benchmark script's ``main``: ``body`` through the CLI's error path (:func:`fastlesion.cli.run_command`).

    A user error prints one ``error:`` line and returns 2, Ctrl-C returns 130. A body returning rows ends as
    :func:`exit_status` says (0 when a case was measured, else 1); one returning an int returns it.
    """
    from fastlesion.cli import run_command

    def call() -> int:
        result = body()
        return result if isinstance(result, int) else exit_status(result)

    return run_command(call)


# ------------------------------------------------------------------------------------------------------ modes
def mode_name(compile: bool, amp: str, channels_last: bool) -> str:
    """``eager-fp32-nchw``, ``compile-bf16-cl``, ...: the one spelling of a speed setting in rows and tables."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown precision {amp!r}; choose one of {tuple(AMP_DTYPES)}")
    return f"{'compile' if compile else 'eager'}-{amp}-{'cl' if channels_last else 'nchw'}"


def parse_mode(name: str) -> tuple[bool, str, bool]:
    """Inverse of :func:`mode_name`: ``(compile, amp, channels_last)``; raises ValueError naming the bad part."""
    parts = name.strip().split("-")
    if len(parts) != 3 or parts[0] not in ("eager", "compile") or parts[1] not in AMP_DTYPES \
            or parts[2] not in ("nchw", "cl"):
        raise ValueError(f"mode {name!r} is not <eager|compile>-<fp32|bf16|fp16>-<nchw|cl> (e.g. compile-bf16-cl)")
    return parts[0] == "compile", parts[1], parts[2] == "cl"


def all_modes(amps: Iterable[str] = ("fp32", "bf16", "fp16")) -> list[str]:
    """The matrix eager/compile x ``amps`` x nchw/cl, eager first."""
    return [mode_name(c, a, cl) for c in (False, True) for a in amps for cl in (False, True)]


def split_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def int_list(text: str, flag: str = "") -> list[int]:
    """``"64,128"`` -> ``[64, 128]``; anything but positive whole numbers is a :class:`BenchmarkError`."""
    try:
        values = [int(t) for t in split_list(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise BenchmarkError(f"{flag or 'list'}: expected comma-separated whole numbers >= 1, got {text!r}")
    return values


# ------------------------------------------------------------------------------------------------------ device
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the current CUDA device when there is one, else CPU; ``cuda`` without CUDA is an error."""
    if name not in ("auto", "cuda", "cpu"):
        raise BenchmarkError(f"--device must be auto, cuda or cpu, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda but no CUDA device is available (use --device auto or cpu)")
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_runtime(device: torch.device, compile: bool, amp: str, channels_last: bool,
                 compile_mode: str | None = None) -> Runtime:
    """The training :class:`Runtime` of one speed mode; its ``set_backends`` runs in :func:`build_training`."""
    return Runtime(device=device, amp_dtype=AMP_DTYPES[amp], compile=compile, compile_mode=compile_mode,
                   channels_last=channels_last)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so wall-clock time covers the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    """Forget compiled graphs between cases (keeps dynamo's recompile limit and memory out of the next case)."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - best effort
        pass


def disable_compile_caches() -> None:
    """Turn off inductor's on-disk caches, so ``compile_seconds`` is a cold compilation (a warm cache hides most)."""
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True


def model_task(name: str) -> str:
    """``classification`` or ``segmentation``: the task of model ``name`` (:func:`fastlesion.models.model_task`);
    a name the registry does not know counts as classification here, so that building it fails in its own row."""
    from fastlesion.errors import FastlesionError
    from fastlesion.models import model_task as registry_task

    try:
        return registry_task(name)
    except FastlesionError:
        return "classification"


def check_seg_sizes(models: Iterable[str], image_sizes: Iterable[int], flag: str = "--image-sizes") -> None:
    """A segmentation model among ``models`` with a size that is not a multiple of 32: one :class:`BenchmarkError`."""
    seg = [m for m in models if model_task(m) == "segmentation"]
    bad = [s for s in image_sizes if s % SEG_SIZE_MULTIPLE]
    if seg and bad:
        raise BenchmarkError(f"{flag} {','.join(map(str, bad))}: the segmentation model {seg[0]} needs input sizes "
                             f"that are multiples of {SEG_SIZE_MULTIPLE}")


@dataclass
class TrainSetup:
    """A model, optimizer, loss and scaler prepared exactly as training prepares them."""

    raw: nn.Module
    model: nn.Module  # compiled view of ``raw`` when rt.compile
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler
    rt: Runtime
    params: int
    task: str = "classification"


def build_training(name: str, num_classes: int, rt: Runtime, lr: float = 0.01, seed: int = 0,
                   task: str | None = None) -> TrainSetup:
    """Model + SGD (momentum 0.9) + loss + GradScaler, the model wrapped by training's :func:`wrap_model`.

    ``create_model -> wrap_model(raw, rt)`` (backend switches, ``to(device) -> channels_last -> torch.compile``);
    the optimizer comes from the training code (``optim.name=sgd``), and so do the model's outputs and the loss of
    ``task`` (default: the model's, :func:`model_task`): classification ``num_classes`` logits and cross-entropy,
    segmentation one mask-logit channel and :data:`SEG_LOSS` (Dice + BCE).
    """
    from fastlesion.engine.losses import create_loss
    from fastlesion.engine.tasks import get_task
    from fastlesion.models import count_params, create_model

    task = task or model_task(name)
    torch.manual_seed(seed)
    wrapped = wrap_model(create_model(name, num_classes=get_task(task).outputs(num_classes)), rt)
    raw = wrapped.raw.train()
    optimizer = create_optimizer(raw, OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=False,
                                                  weight_decay=0.0))
    if task == "segmentation":
        loss_fn = create_loss(OptimConfig(loss=SEG_LOSS), np.zeros(0, dtype=np.int64), 1)
    else:
        loss_fn = nn.CrossEntropyLoss()
    return TrainSetup(raw=raw, model=wrapped.model, optimizer=optimizer, loss_fn=loss_fn.to(rt.device),
                      scaler=rt.grad_scaler(), rt=rt, params=count_params(raw), task=task)


def loader_config(backend: str, batch_size: int, workers: int, seed: int = 0, fast_idct: bool = True) -> LoaderConfig:
    """The training :class:`LoaderConfig` of a benchmark backend (``torch``, ``dali-cpu`` or ``dali-gpu``), for
    :func:`fastlesion.data.loader.build_loader`; ``fast_idct`` is DALI's training decode (the torch loader ignores
    it)."""
    if backend == "torch":
        return LoaderConfig(backend="torch", batch_size=batch_size, workers=workers, seed=seed, fast_idct=fast_idct)
    return LoaderConfig(backend="dali", device=backend.split("-", 1)[1], batch_size=batch_size, workers=workers,
                        seed=seed, fast_idct=fast_idct)


def synthetic_masks(batch_size: int, image_size: int, g: torch.Generator) -> torch.Tensor:
    """Float masks ``N x 1 x S x S`` in {0, 1}: one ellipse per image (centre, radii and angle drawn from ``g``),
    lesion-like blobs covering about 5-40 % of the image."""
    n, s = batch_size, image_size
    centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)  # in [0.3, 0.7] of the side
    radii = 0.12 + 0.23 * torch.rand(n, 2, generator=g)
    angle = torch.pi * torch.rand(n, generator=g)
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx[None] - centre[:, 0, None, None], yy[None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = (dx * cos + dy * sin) / radii[:, 0, None, None], (-dx * sin + dy * cos) / radii[:, 1, None, None]
    return (u * u + v * v <= 1.0).float()[:, None]


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, device: torch.device,
                    channels_last: bool, seed: int = 0,
                    task: str = "classification") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, normalised-looking input batch on the device, as the loader yields it: float NCHW images, and int64
    labels (classification) or contiguous float masks ``N x 1 x S x S`` in {0, 1} (segmentation)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    if task == "segmentation":
        y = synthetic_masks(batch_size, image_size, g)
    else:
        y = torch.randint(0, num_classes, (batch_size,), generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device).contiguous(memory_format=fmt), y.to(device)


# ------------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Seconds of the first step (lazy init, cudnn autotune, compilation) and per-step seconds of each repeat."""

    first_step_s: float
    repeat_step_s: list[float] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        """Median over repeats of the mean step time inside a repeat."""
        return statistics.median(self.repeat_step_s)

    @property
    def compile_s(self) -> float:
        """First step minus a steady step: the one-off cost (the compilation time for compiled models)."""
        return max(self.first_step_s - self.step_s, 0.0)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int = 3, steps: int = 10,
               repeats: int = 3) -> Timing:
    """Time ``step``: the first call alone, ``warmup - 1`` more untimed calls, then ``repeats`` blocks of ``steps``.

    The device is synchronised before and after each timed block (never inside it, so CPU launch and GPU work
    overlap as they do in training); the reported step time is the median over the blocks.
    """
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    timing = Timing(first_step_s=time.perf_counter() - t0)
    for _ in range(max(warmup - 1, 0)):
        step()
    sync(device)
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        for _ in range(max(steps, 1)):
            step()
        sync(device)
        timing.repeat_step_s.append((time.perf_counter() - t0) / max(steps, 1))
    return timing


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak
    resident set size (``getrusage`` maxrss), which never goes down during a run, so it is an upper bound."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux
    return mb, "process_maxrss"


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the device or of the host (CPU allocations raise RuntimeError/MemoryError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first meaningful line`` of an exception, for the ``error`` column."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else repr(exc)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------ CPU use
def _clk_tck() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def _system_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields)
    return total - idle, total


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


def _tree_cpu_seconds() -> float:
    """CPU seconds used by this process and all its live descendants (DataLoader workers, DALI threads)."""
    tck, total, todo, seen = _clk_tck(), 0.0, [os.getpid()], set()
    if not os.path.isdir("/proc/self"):
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (float(fields[11]) + float(fields[12])) / tck  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
        todo += _children(pid)
    return total


class CpuMeter:
    """CPU utilisation over an interval: whole machine (``/proc/stat``) and this process tree, in % of all cores.

    After :meth:`stop`, ``cpu_seconds`` holds the CPU time the process tree used (DataLoader worker processes and
    DALI threads included) and ``wall_seconds`` the interval.
    """

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self._sys0: tuple[float, float] | None = None
        self._tree0 = 0.0
        self._t0 = 0.0
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self.result: dict[str, Any] = {}

    def start(self) -> CpuMeter:
        self._sys0, self._tree0, self._t0 = _system_cpu(), _tree_cpu_seconds(), time.perf_counter()
        return self

    def stop(self) -> dict[str, Any]:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        sys1, tree1 = _system_cpu(), _tree_cpu_seconds()
        system = None
        if self._sys0 is not None and sys1 is not None and sys1[1] > self._sys0[1]:
            system = 100.0 * (sys1[0] - self._sys0[0]) / (sys1[1] - self._sys0[1])
        self.cpu_seconds, self.wall_seconds = tree1 - self._tree0, wall
        proc = 100.0 * self.cpu_seconds / wall / self.cores
        self.result = {"cpu_util_percent": _round(system, 1), "proc_cpu_percent": _round(proc, 1),
                       "cpu_cores": self.cores}
        return self.result

    def __enter__(self) -> CpuMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------ GPU use
def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device, matched by UUID (CUDA_VISIBLE_DEVICES renumbers), else by index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid).lower().removeprefix("gpu-")
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            u = pynvml.nvmlDeviceGetUUID(h)
            u = (u.decode() if isinstance(u, bytes) else str(u)).lower().removeprefix("gpu-")
            if u == uuid:
                return h
    except Exception:  # noqa: BLE001 - fall back to the index
        pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class GpuSampler:
    """Background thread sampling GPU utilisation (%) and memory used (MiB) with NVML every ``interval`` seconds.

    Without a CUDA device or without NVML (library missing, no permission) nothing is sampled: the summary holds
    None values and a note, and nothing raises.
    """

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.device, self.interval = device, interval
        self.util: list[float] = []
        self.mem_mb: list[float] = []
        self.note: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        if self.device.type != "cuda":
            self.note = "no GPU: GPU utilisation and memory not sampled"
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, _nvml_handle(pynvml, self.device)
            self._sample()
        except Exception as e:  # noqa: BLE001 - NVML missing or refusing: empty columns, not a crash
            self.note = f"NVML unavailable ({one_line(e, 120)}): GPU utilisation not sampled"
            self._shutdown()
            return self
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        self.util.append(float(rates.gpu))
        self.mem_mb.append(mem.used / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception as e:  # noqa: BLE001
                self.note = f"NVML sampling stopped ({one_line(e, 120)})"
                return

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._nvml is not None:
                try:
                    self._sample()
                except Exception:  # noqa: BLE001
                    pass
        self._shutdown()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        have = bool(self.util)
        return {
            "gpu_util_mean": _round(statistics.fmean(self.util), 1) if have else None,
            "gpu_util_max": _round(max(self.util), 1) if have else None,
            "gpu_mem_mb": _round(max(self.mem_mb), 1) if have else None,
            "gpu_samples": len(self.util),
            "gpu_note": self.note,
        }

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------ rows
_FINGERPRINT: dict[str, Any] | None = None


def fingerprint() -> dict[str, Any]:
    """The machine's fingerprint from :func:`fastlesion.hardware.fingerprint` (computed once per process)."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        try:
            from fastlesion.hardware import fingerprint as _fp

            _FINGERPRINT = dict(_fp())
        except Exception as e:  # noqa: BLE001 - a benchmark row without a fingerprint beats no row
            _FINGERPRINT = {"error": one_line(e), "hostname": platform.node(), "cpu_count": os.cpu_count()}
    return _FINGERPRINT


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = d.get(k)
        if v not in (None, "", [], {}):
            return v
    return None


def gpu_names(fp: dict[str, Any]) -> list[str]:
    """GPU names listed in a fingerprint (any of the usual shapes), empty without GPU."""
    gpus = _first(fp, "gpus", "gpu")
    if isinstance(gpus, dict):
        gpus = [gpus]
    names = []
    if isinstance(gpus, list):
        for g in gpus:
            name = g.get("name") if isinstance(g, dict) else g
            if name:
                names.append(str(name))
    single = _first(fp, "gpu_name")
    if not names and single:
        count = _first(fp, "gpu_count") or 1
        names = [str(single)] * int(count)
    return names


def _cpuinfo_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model(fp: dict[str, Any], local: bool = True) -> str:
    """CPU model named in a fingerprint; with ``local`` missing values are read from this machine."""
    cpu = fp.get("cpu")
    value = _first(cpu, "model", "name", "brand") if isinstance(cpu, dict) else cpu
    value = value or _first(fp, "cpu_model", "cpu_name")
    if not value and local:
        value = _cpuinfo_model() or platform.processor() or platform.machine()
    return str(value or "unknown CPU")


def cpu_cores(fp: dict[str, Any]) -> Any:
    cpu = fp.get("cpu")
    value = _first(cpu, "cores", "logical_cores", "count") if isinstance(cpu, dict) else None
    return value or _first(fp, "cpu_cores_logical", "cpu_cores", "cpu_count", "cpu_cores_physical")


def machine_label(fp: dict[str, Any], local: bool = False) -> str:
    """Short label of a machine for tables: ``2x NVIDIA A100-SXM4-80GB`` or ``CPU-model (N cores) @ host``."""
    names = gpu_names(fp)
    if names:
        head = f"{len(names)}x {names[0]}" if len(names) > 1 else names[0]
        return head
    host = _first(fp, "hostname", "host", "node")
    cores = cpu_cores(fp)
    label = cpu_model(fp, local) + (f" ({cores} cores)" if cores else "")
    return label + (f" @ {host}" if host else "")


def device_name(device: torch.device, fp: dict[str, Any]) -> str:
    """``torch.cuda.get_device_name`` on GPU, ``cpu: <CPU model>`` otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model(fp)}"


def base_row(bench: str, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """Keys common to every row: which benchmark, when, on what (device name, fingerprint) and with which flags."""
    fp = fingerprint()
    return {
        "bench": bench,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device, fp),
        "machine": machine_label(fp, local=True),
        "torch_threads": torch.get_num_threads(),
        "fingerprint": fp,
        "settings": settings,
    }


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def print_notes(run_notes: list[str], rows: list[dict[str, Any]], out: str | Path | None) -> None:
    """The end of a benchmark run: its notes, and where its rows went."""
    for note in run_notes:
        print(f"note: {note}")
    if out:
        print(f"{len(rows)} row(s) appended to {out}")


def exit_status(rows: list[dict[str, Any]]) -> int:
    """0 when at least one case was measured, else 1 (every case failed or was skipped)."""
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


def append_jsonl(path: str | Path | None, rows: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
    """Append rows as JSON lines (one object a line); ``None`` writes nothing. NaN/inf become null."""
    if path is None:
        return
    rows = [rows] if isinstance(rows, dict) else list(rows)
    path = Path(path)
    if path.parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(_clean(row), default=_json_default) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{n}: not a JSON object ({e.msg})") from None
    return rows


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _round(v: float | None, nd: int = 2) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


# ------------------------------------------------------------------------------------------------------ ratios
def geomean(values: list[float]) -> float:
    vals = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(statistics.fmean(math.log(v) for v in vals)) if vals else math.nan


# (label, index of the part that changes in the mode name, from-value, to-value)
MODE_COMPARISONS = (
    ("compile vs eager", 0, "eager", "compile"),
    ("bf16 AMP vs fp32", 1, "fp32", "bf16"),
    ("fp16 AMP vs fp32", 1, "fp32", "fp16"),
    ("channels_last vs NCHW", 2, "nchw", "cl"),
)


def mode_ratios(rows: list[dict[str, Any]], metric: str = "images_per_s") -> list[dict[str, Any]]:
    """Speed-ups between modes that differ in one switch only, per (model, image size, batch size).

    For each comparison (``MODE_COMPARISONS``) the geometric mean over all matching pairs is reported with its
    range; ``best vs eager-fp32-nchw`` names the fastest mode. Only rows with ``status == "ok"`` count.
    """
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("status", "ok") != "ok" or not r.get(metric):
            continue
        key = (r["model"], r.get("image_size"), r.get("batch_size"))
        groups.setdefault(key, {})[r["mode"]] = float(r[metric])
    out = []
    for (model, size, batch), by_mode in groups.items():
        for label, part, a, b in MODE_COMPARISONS:
            pairs = []
            for mode, value in by_mode.items():
                bits = mode.split("-")
                if bits[part] != b:
                    continue
                base = "-".join(bits[:part] + [a] + bits[part + 1:])
                if base in by_mode:
                    pairs.append((base, mode, value / by_mode[base]))
            if pairs:
                vals = [p[2] for p in pairs]
                out.append({"model": model, "image_size": size, "batch_size": batch, "comparison": label,
                            "ratio": geomean(vals), "min": min(vals), "max": max(vals), "pairs": pairs})
        ref = by_mode.get("eager-fp32-nchw")
        if ref:
            best = max(by_mode, key=by_mode.get)
            out.append({"model": model, "image_size": size, "batch_size": batch,
                        "comparison": "best vs eager-fp32-nchw", "ratio": by_mode[best] / ref,
                        "min": by_mode[best] / ref, "max": by_mode[best] / ref,
                        "pairs": [("eager-fp32-nchw", best, by_mode[best] / ref)]})
    return out


def print_table(title: str, columns: list[str], rows: list[list[Any]], caption: str | None = None) -> None:
    """A rich table on stdout (plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title)
        print("\t".join(columns))
        for r in rows:
            print("\t".join(str(c) for c in r))
        return
    table = Table(title=title, caption=caption)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*["" if c is None else str(c) for c in r])
    Console(width=max(120, min(200, _terminal_width()))).print(table)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def fmt_ratio(r: dict[str, Any]) -> str:
    if not math.isfinite(r["ratio"]):
        return "-"
    text = f"{r['ratio']:.2f}x"
    if len(r["pairs"]) > 1:
        text += f" ({r['min']:.2f}-{r['max']:.2f}, {len(r['pairs'])} pairs)"
    elif r["comparison"].startswith("best"):
        text += f" ({r['pairs'][0][1]})"
    return text


def print_mode_ratios(ratios: list[dict[str, Any]]) -> None:
    """The ratios that matter for a train-step run: one line per (model, size, batch), one column per switch."""
    if not ratios:
        print("ratios: not enough modes measured to compare (need modes that differ in one switch)")
        return
    labels = [c[0] for c in MODE_COMPARISONS] + ["best vs eager-fp32-nchw"]
    present = [lb for lb in labels if any(r["comparison"] == lb for r in ratios)]
    keys = list(dict.fromkeys((r["model"], r["image_size"], r["batch_size"]) for r in ratios))
    table = []
    for key in keys:
        cells = {r["comparison"]: fmt_ratio(r) for r in ratios if (r["model"], r["image_size"], r["batch_size"]) == key}
        table.append([key[0], key[1], key[2]] + [cells.get(lb, "-") for lb in present])
    print_table("Speed-up ratios (images/s, geometric mean over pairs differing in one switch)",
                ["model", "size", "batch"] + present, table)
