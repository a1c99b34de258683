"""Speed switches resolved against the hardware: device, AMP dtype, GradScaler, compile, channels_last.

No-op switches instead of branches (nanoGPT): ``autocast`` returns ``nullcontext()`` when AMP is off and the
GradScaler is built with ``enabled=use_scaler`` (only fp16 needs it). Wrapper order, written down once:
``create_model -> .to(device) -> channels_last -> torch.compile -> DDP``; checkpoints hold the raw module.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fastlesion.config import TrainConfig
from fastlesion.errors import FastlesionError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    compile_mode: str | None
    channels_last: bool

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

    def describe(self) -> str:
        return (f"device={self.device} amp={self.amp_name} compile={'on' if self.compile else 'off'}"
                f" channels_last={'on' if self.channels_last else 'off'}")


def resolve_runtime(cfg: TrainConfig, local_rank: int = 0) -> Runtime:
    """Turn ``auto`` settings into concrete ones: every speed feature on with CUDA, plain fp32 eager on CPU."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise FastlesionError("train.device=cuda but no CUDA device is available (set train.device=auto or cpu)")
    use_cuda = cuda and cfg.device != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if cfg.amp == "auto":
        amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_cuda else None
    else:
        amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    on = {"auto": use_cuda, "on": True, "off": False}
    if use_cuda and cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, amp_dtype=amp, compile=on[cfg.compile], compile_mode=cfg.compile_mode,
                   channels_last=on[cfg.channels_last])
