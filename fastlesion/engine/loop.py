"""One training step, one epoch, and evaluation over all ranks.

The step functions are pure in the sense that matters: they take everything they touch as arguments (model,
batch, loss, optimizer, scaler, runtime) and keep no state of their own, so the benchmarks and tests call the very
same code as ``train(cfg)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastlesion import dist
from fastlesion.engine.runtime import Runtime
from fastlesion.errors import FastlesionError


class NonFiniteLossError(FastlesionError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, rt: Runtime,
                     scaler: torch.amp.GradScaler, accum: int = 1) -> torch.Tensor:
    """Forward under autocast, backward of ``loss / accum`` through the (no-op unless fp16) scaler.

    Returns the detached, unscaled loss; reading it (``.item()``) is a CPU-GPU sync point, so callers batch that.
    """
    with rt.autocast():
        loss = loss_fn(model(x), y)
    scaler.scale(loss / accum).backward()
    return loss.detach()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_grad: float | None = None) -> None:
    """Unscale (for clipping), step through the scaler, zero the gradients."""
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(model: nn.Module, batch: tuple, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, rt: Runtime, clip_grad: float | None = None) -> torch.Tensor:
    """A whole step without accumulation (used by the benchmarks): forward, backward, optimizer step."""
    loss = forward_backward(model, batch[0], batch[1], loss_fn, rt, scaler)
    optimizer_step(model, optimizer, scaler, clip_grad)
    return loss


@dataclass
class EpochResult:
    loss: float
    images: int
    seconds: float
    data_seconds: float
    steps: int


def _check_finite(losses: list[torch.Tensor], first_step: int, epoch: int) -> None:
    """CPU-GPU sync point: one read for a window of steps, agreed over all ranks so that none is left waiting."""
    finite = torch.isfinite(torch.stack(losses).float())
    n_bad = (~finite).sum().float().reshape(1)
    dist.all_reduce_sum(n_bad)
    if float(n_bad) == 0:
        return
    if bool(finite.all()):
        raise NonFiniteLossError(f"loss became NaN/inf on another rank at epoch {epoch} before step "
                                 f"{first_step + len(losses)}; last.pt holds the last good epoch")
    k = int((~finite).nonzero()[0])
    raise NonFiniteLossError(f"loss is {float(losses[k]):.4g} at epoch {epoch} step {first_step + k + 1}; stopped "
                             "(lower optim.lr, set optim.clip_grad, or try train.amp=bf16); "
                             "last.pt holds the last good epoch")


def train_epoch(model: nn.Module, loader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, rt: Runtime, epoch: int, *, accum: int = 1,
                clip_grad: float | None = None, max_steps: int | None = None,
                on_optimizer_step: Callable[[], None] | None = None, progress=None, check_every: int = 10,
                world_size: int = 1, on_loss: Callable[[float], None] | None = None) -> EpochResult:
    """Train for one epoch (or ``max_steps`` batches).

    Args:
        on_optimizer_step: called after every optimizer step (sets the next lr, updates the EMA).
        progress: an object with ``advance(n_images, loss_or_None)`` (the rich bar) or None.
        check_every: steps between loss reads (the only sync points of the loop besides the optimizer's).
        world_size: DDP world size, to report images across all ranks.
        on_loss: called at every loss read with the mean loss since the previous read (TensorBoard's step scalars).
    """
    model.train()
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    losses: list[torch.Tensor] = []
    total, images, data_s, window_start = 0.0, 0, 0.0, 0
    t0 = t_data = time.perf_counter()
    for i, (x, y, _) in enumerate(loader):
        if i >= steps:
            break
        data_s += time.perf_counter() - t_data
        last_micro = (i + 1) % accum == 0 or i + 1 == steps
        # DDP: skip the gradient all-reduce on accumulation micro-steps
        ctx = model.no_sync() if (ddp and not last_micro) else nullcontext()
        with ctx:
            losses.append(forward_backward(model, x, y, loss_fn, rt, scaler, accum))
        if last_micro:
            optimizer_step(model, optimizer, scaler, clip_grad)
            if on_optimizer_step is not None:
                on_optimizer_step()
        images += x.shape[0]
        if (i + 1) % check_every == 0 or i + 1 == steps:
            window = losses[window_start:]
            _check_finite(window, window_start, epoch)
            window_sum = float(torch.stack(window).float().sum())
            total += window_sum
            window_start = len(losses)
            if progress is not None:
                progress.advance(i + 1, images * world_size, total / len(losses))
            if on_loss is not None:
                on_loss(window_sum / len(window))
        t_data = time.perf_counter()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    n = max(len(losses), 1)
    return EpochResult(loss=total / n, images=images * world_size, seconds=time.perf_counter() - t0,
                       data_seconds=data_s, steps=len(losses))


@dataclass
class EvalResult:
    probs: np.ndarray  # [N, C] softmax probabilities, rows ordered by table index
    labels: np.ndarray  # [N]
    idx: np.ndarray  # [N] row indices into the evaluated table
    loss: float
    seconds: float


def predict_logits(model: nn.Module, x: torch.Tensor, rt: Runtime, tta: bool = False) -> torch.Tensor:
    """Logits in float32; with ``tta`` the mean of softmax over identity, horizontal and vertical flips (as log)."""
    with rt.autocast():
        if not tta:
            return model(x).float()
        probs = sum(F.softmax(model(v).float(), dim=1) for v in (x, x.flip(3), x.flip(2))) / 3
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, tta: bool = False) -> EvalResult:
    """Predict every sample of ``loader`` on every rank and gather them (each sample counted exactly once).

    All ranks return the same, complete result.
    """
    model.eval()
    t0 = time.perf_counter()
    logits, labels, idx = [], [], []
    for x, y, i in loader:
        logits.append(predict_logits(model, x, rt, tta).cpu())
        labels.append(y.cpu())
        idx.append(i.cpu() if torch.is_tensor(i) else torch.as_tensor(i))
    local = (torch.cat(logits) if logits else torch.zeros(0, 0), torch.cat(labels) if labels else torch.zeros(0),
             torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long))
    parts = dist.all_gather_objects(local)
    lg = torch.cat([p[0] for p in parts if len(p[0])])
    lb = torch.cat([p[1] for p in parts if len(p[1])]).long()
    ix = torch.cat([p[2] for p in parts if len(p[2])]).long().numpy()
    ix, first = np.unique(ix, return_index=True)  # drop padded duplicates, order rows by table index
    lg, lb = lg[first], lb[first]
    loss = float(F.cross_entropy(lg, lb)) if len(lb) else math.nan
    return EvalResult(probs=F.softmax(lg, dim=1).numpy(), labels=lb.numpy(), idx=ix, loss=loss,
                      seconds=time.perf_counter() - t0)
