"""A hardware and software fingerprint recorded next to every benchmark number.

:func:`fingerprint` never raises: whatever cannot be found is ``None`` (with a ``note`` saying why for the GPU).

Example:
    >>> fp = fingerprint()
    >>> sorted(fp)[:3]
    ['cpu_cores_logical', 'cpu_cores_physical', 'cpu_model']
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return None


def _cpu() -> dict[str, Any]:
    """CPU model and physical core count from /proc/cpuinfo (Linux), else platform's best guess."""
    model, cores, simd = None, set(), None
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model is None:
                    model = value
                elif key == "flags" and simd is None:  # what libjpeg-turbo's SIMD paths can use
                    simd = [f for f in ("sse4_2", "avx2", "avx512f", "asimd") if f in value.split()]
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and phys is not None and core is not None:
                    cores.add((phys, core))
                    phys = core = None
            if phys is not None and core is not None:
                cores.add((phys, core))
    except Exception:  # noqa: BLE001 - not Linux, or unreadable
        pass
    if not model:
        model = platform.processor() or platform.machine() or None
    try:
        usable = len(os.sched_getaffinity(0))
    except Exception:  # noqa: BLE001 - not available on this platform
        usable = None
    return {"cpu_model": model, "cpu_cores_logical": os.cpu_count(), "cpu_cores_physical": len(cores) or None,
            "cpu_cores_usable": usable, "cpu_simd": simd}


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with bf16 instructions (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4
and later); without them bf16 matrix products run on fp32 instructions with conversions around them."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has a bf16 instruction (:data:`BF16_CPU_FLAGS` in /proc/cpuinfo); False elsewhere, also
    where there is no /proc/cpuinfo (macOS, Windows) and on ARM, where bf16 autocast has not been measured."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return any(flag in value.split() for flag in BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except Exception:  # noqa: BLE001
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except Exception:  # noqa: BLE001
        return None


def _gpu() -> dict[str, Any]:
    """GPU facts from NVML (pynvml, lazily imported); CUDA runtime facts from torch."""
    info: dict[str, Any] = {"gpu_name": None, "gpu_count": 0, "gpu_memory_gb": None, "gpu_driver": None,
                            "cuda_version": None, "gpu_compute_capability": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            info["gpu_count"] = count
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["gpu_driver"] = driver.decode() if isinstance(driver, bytes) else driver
            try:
                v = pynvml.nvmlSystemGetCudaDriverVersion()
                info["cuda_version"] = f"{v // 1000}.{v % 1000 // 10}"
            except Exception:  # noqa: BLE001 - old drivers
                pass
            if count:
                h = pynvml.nvmlDeviceGetHandleByIndex(0)
                name = pynvml.nvmlDeviceGetName(h)
                info["gpu_name"] = name.decode() if isinstance(name, bytes) else name
                info["gpu_memory_gb"] = round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 1024**3, 1)
                try:
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                    info["gpu_compute_capability"] = f"{major}.{minor}"
                except Exception:  # noqa: BLE001
                    pass
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        info["note"] = "pynvml (nvidia-ml-py) is not installed: no GPU details"
    except Exception as e:  # noqa: BLE001 - no driver, no GPU, NVML library missing
        info["note"] = f"NVML unavailable ({type(e).__name__}: {str(e).strip()[:120]}): no GPU found"
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu_count"] = info["gpu_count"] or torch.cuda.device_count()
            if info["gpu_name"] is None:
                p = torch.cuda.get_device_properties(0)
                info["gpu_name"] = p.name
                info["gpu_memory_gb"] = round(p.total_memory / 1024**3, 1)
                info["gpu_compute_capability"] = f"{p.major}.{p.minor}"
    except Exception:  # noqa: BLE001
        info.setdefault("torch_cuda", None)
    return info


def fingerprint() -> dict[str, Any]:
    """Host, CPU, RAM, GPU (via NVML), Python and library versions, platform. Never raises."""
    fp: dict[str, Any] = {}
    for name, fn in (("host", lambda: {"hostname": socket.gethostname()}), ("cpu", _cpu),
                     ("ram", lambda: {"ram_gb": _ram_gb()}), ("gpu", _gpu)):
        try:
            fp.update(fn())
        except Exception as e:  # noqa: BLE001 - a fingerprint must never stop a benchmark
            fp[f"{name}_error"] = f"{type(e).__name__}: {e}"
    fp.update({
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia-dali-cuda120") or _version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda110"),
        "timm": _version("timm"),
        "pillow": _version("pillow"),
        "simplejpeg": _version("simplejpeg"),
        "numpy": _version("numpy"),
    })
    return fp
