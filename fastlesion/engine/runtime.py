"""Speed switches resolved against the hardware (device, AMP dtype, GradScaler, compile, channels_last, cudnn/TF32)
and the one function that wraps a model with them: :func:`wrap_model`.

No-op switches instead of branches (nanoGPT): ``autocast`` returns ``nullcontext()`` when AMP is off and the
GradScaler is built with ``enabled=use_scaler`` (only fp16 needs it). The wrapper order is written once, in
:func:`wrap_model`, and training, inference and the benchmarks all call it:
``create_model -> .to(device) -> channels_last -> torch.compile -> DDP``; checkpoints hold the raw module.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fastlesion.config import TrainConfig
from fastlesion.errors import FastlesionError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    compile_mode: str | None
    channels_last: bool
    cudnn_benchmark: bool = True  # with CUDA: cudnn autotuner and TF32 matmuls/convolutions

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def use_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def amp_name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)

    def set_backends(self) -> None:
        """Process-wide CUDA switches: the cudnn autotuner (input shapes are fixed per run) and TF32 math."""
        if self.device.type == "cuda" and self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def describe(self) -> str:
        return (f"device={self.device} amp={self.amp_name} compile={'on' if self.compile else 'off'}"
                f" channels_last={'on' if self.channels_last else 'off'}")


def cpu_fast_bf16() -> bool:
    """``auto`` turns bf16 autocast and channels_last on for a CPU run when this is True: the CPU has bf16
    instructions (:func:`fastlesion.hardware.cpu_has_native_bf16`), where both were measured faster with the same
    validation metrics (README, Speed switches). Elsewhere a CPU run stays fp32, NCHW."""
    from fastlesion.hardware import cpu_has_native_bf16

    return cpu_has_native_bf16()


def resolve_runtime(cfg: TrainConfig, local_rank: int = 0) -> Runtime:
    """Turn ``auto`` settings into concrete ones: every speed feature on with CUDA; on a CPU bf16 autocast and
    channels_last where it has bf16 instructions (:func:`cpu_fast_bf16`), else plain fp32; compile only with CUDA."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise FastlesionError("train.device=cuda but no CUDA device is available (set train.device=auto or cpu)")
    use_cuda = cuda and cfg.device != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    fast_cpu = not use_cuda and cpu_fast_bf16()
    if cfg.amp == "auto":
        if use_cuda:
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            amp = torch.bfloat16 if fast_cpu else None
    else:
        amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    on = {"auto": use_cuda, "on": True, "off": False}
    channels_last = (use_cuda or fast_cpu) if cfg.channels_last == "auto" else on[cfg.channels_last]
    return Runtime(device=device, amp_dtype=amp, compile=on[cfg.compile], compile_mode=cfg.compile_mode,
                   channels_last=channels_last, cudnn_benchmark=cfg.cudnn_benchmark)


@dataclass
class WrappedModel:
    """The views of one model that a run needs; they share their parameters."""

    raw: nn.Module  # the plain module: checkpoints, the EMA, the optimizer and parameter counts use it
    model: nn.Module  # what the training step calls: compiled and/or DDP-wrapped
    eval_model: nn.Module  # compiled but never DDP-wrapped: evaluation needs no gradient all-reduce


def wrap_model(raw: nn.Module, rt: Runtime, ddp: bool = False) -> WrappedModel:
    """``raw -> .to(device) -> channels_last -> torch.compile -> DDP``, with the backend switches set first.

    Compile before DDP so DDP stays out of the compiled graph (its bucketed all-reduce runs between graph pieces).
    Under DDP the device is ``rt.device`` (``cuda:<local_rank>``), the only one the process drives.
    """
    rt.set_backends()
    raw = raw.to(rt.device, memory_format=rt.memory_format)
    compiled = torch.compile(raw, mode=rt.compile_mode) if rt.compile else raw
    model = compiled
    if ddp:
        model = nn.parallel.DistributedDataParallel(compiled, device_ids=[rt.device.index]
                                                    if rt.device.type == "cuda" else None)
    return WrappedModel(raw=raw, model=model, eval_model=compiled)
