"""``fastlesion prune``: make a trained model smaller and faster, and measure what it cost.

Two methods:

* ``structured`` (default): whole channels are removed with `torch-pruning <https://github.com/VainF/Torch-Pruning>`_
  (``MetaPruner`` + ``MagnitudeImportance``, L2 norm of each channel group; the classifier head is kept whole), so
  the network really has fewer parameters and FLOPs and runs faster. Optional dependency:
  ``pip install torch-pruning`` (the ``prune`` extra).
* ``unstructured``: global L1 magnitude pruning of every convolution and linear weight but the head
  (``torch.nn.utils.prune.global_unstructured``), made permanent with ``prune.remove``. The tensors keep their
  shape (zeros inside), so size and dense CPU latency do not change; ``sparsity`` in the summary shows the zeros.

The pruned checkpoint ``OUT/best.pt`` is a normal fastlesion checkpoint (model name, classes, config, weights) and
loads with ``torch.load(weights_only=True)``. A structurally pruned network no longer matches
``create_model(name)``, so the checkpoint also keeps ``pruned_structure``: the plain attributes (channel counts,
``num_features``, ``groups``...) of every module that pruning changed. :func:`apply_structure` rebuilds the network
from ``create_model(name)``, those attributes and the tensor shapes of the weights; no pickled module is involved.
:func:`fastlesion.engine.inference.load_checkpoint_model` does so, so ``fastlesion eval`` / ``predict`` / ``export``
take the pruned checkpoint like any other; :func:`prune_run` checks right after saving that the rebuilt model gives
the pruned model's outputs.

``OUT/summary.json`` holds params, FLOPs, weight-file size and CPU latency (batch 1, fp32 eager, median) before
and after, and the validation AUC of the checkpoint's fold before and after (through ``eval_checkpoint``: the same
evaluation as ``fastlesion eval``; its files go to ``OUT/eval_before`` and ``OUT/eval_after``). ``finetune_epochs``
then trains the pruned model on its training fold with the engine's own ``train_epoch`` / ``evaluate`` (constant lr,
``finetune_lr`` or a tenth of the run's ``optim.lr``), keeps the epoch with the best validation AUC and reports
``val_auc_after_finetune`` (unstructured masks stay in place while fine-tuning, so pruned weights stay zero).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlesion.errors import FastlesionError

log = logging.getLogger(__name__)

METHODS = ("structured", "unstructured")
INSTALL = "pip install torch-pruning (or pip install 'fastlesion[prune]')"
STRUCTURE_KEY = "pruned_structure"

_PLAIN = (bool, int, float, str, type(None))


def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v)


# ------------------------------------------------------------------------------------------ structure save / load


def _fresh(name: str, num_classes: int) -> nn.Module:
    from fastlesion.models import create_model

    try:
        with torch.device("meta"):
            return create_model(name, num_classes=num_classes)
    except Exception:  # noqa: BLE001 - some initialisers refuse meta tensors
        return create_model(name, num_classes=num_classes)


def structure_of(model: nn.Module, name: str, num_classes: int) -> dict[str, dict[str, Any]]:
    """The plain attributes (ints, floats, tuples ...) of ``model``'s modules that differ from a fresh
    ``create_model(name)``: what :func:`apply_structure` needs besides the weights' shapes. Refuses a pruned model
    whose module tree differs (pruning removed or added a module), which could not be rebuilt."""
    fresh = dict(_fresh(name, num_classes).named_modules())
    changed: dict[str, dict[str, Any]] = {}
    for mname, module in model.named_modules():
        ref = fresh.get(mname)
        if ref is None or type(ref) is not type(module):
            raise FastlesionError(f"pruned {name}: module {mname!r} is not in {name} as built by create_model; the "
                                  "pruned model cannot be saved as a rebuildable checkpoint")
        attrs = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and k != "training" and _plain(v) and getattr(ref, k, object()) != v}
        if attrs:
            changed[mname] = attrs
    return changed


def apply_checkpoint_structure(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Give a fresh ``create_model`` network the channel counts ``checkpoint`` recorded (``pruned_structure``), so
    that its ``"model"`` weights fit; a no-op for a checkpoint of an unpruned model."""
    if checkpoint.get(STRUCTURE_KEY):
        apply_structure(model, checkpoint[STRUCTURE_KEY], checkpoint["model"])


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]], weights: dict[str, torch.Tensor]) -> None:
    """Reshape a fresh ``create_model`` network in place into the pruned one: set the stored module attributes and
    give every parameter / buffer the shape it has in ``weights`` (contents follow with ``load_state_dict``).
    ``model.fastlesion_pruned_structure`` keeps ``structure``, for whatever saves the model again."""
    model.fastlesion_pruned_structure = structure
    modules = dict(model.named_modules())
    for mname, attrs in structure.items():
        if mname not in modules:
            raise FastlesionError(f"pruned checkpoint: module {mname!r} is not in {type(model).__name__}")
        for k, v in attrs.items():
            setattr(modules[mname], k, v)
    for key, t in weights.items():
        mname, _, leaf = key.rpartition(".")
        module = modules.get(mname)
        if module is None:
            continue  # load_state_dict names it
        if leaf in module._parameters and module._parameters[leaf] is not None:
            old = module._parameters[leaf]
            if old.shape != t.shape:
                module._parameters[leaf] = nn.Parameter(torch.empty(t.shape, dtype=old.dtype, device=old.device),
                                                        requires_grad=old.requires_grad)
        elif leaf in module._buffers and module._buffers[leaf] is not None:
            old = module._buffers[leaf]
            if old.shape != t.shape:
                module._buffers[leaf] = torch.empty(t.shape, dtype=old.dtype, device=old.device)


# ------------------------------------------------------------------------------------------------------ pruning


def _head_modules(model: nn.Module) -> list[nn.Module]:
    from fastlesion.models import _head_prefixes

    modules = dict(model.named_modules())
    return [modules[n] for n in _head_prefixes(model) if n in modules]


def _structured(model: nn.Module, amount: float, image_size: int) -> None:
    try:
        import torch_pruning as tp
    except ImportError:
        raise FastlesionError(f"--method structured needs torch-pruning: {INSTALL}; or use --method unstructured "
                              "(no extra package)") from None
    example = torch.randn(1, 3, image_size, image_size)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=amount, ignored_layers=_head_modules(model))
    with torch.no_grad():
        pruner.step()


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    heads = {id(m) for m in _head_modules(model)}
    return [(m, "weight") for m in model.modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and id(m) not in heads
            and isinstance(getattr(m, "weight", None), nn.Parameter)]


def _unstructured(model: nn.Module, amount: float) -> None:
    """Global L1 magnitude masks (``weight_orig * weight_mask``): kept while fine-tuning, removed by
    :func:`_permanent`."""
    from torch.nn.utils import prune

    params = _prunable(model)
    if not params:
        raise FastlesionError("--method unstructured: the model has no convolution or linear weights besides the head")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)


def _permanent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with any pruning masks folded into the weights (``prune.remove``)."""
    from torch.nn.utils import prune

    for m in model.modules():  # the masked weight is recomputed before every forward; a detached one can be copied
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                setattr(m, hook._tensor_name, getattr(m, hook._tensor_name).detach())
    model = copy.deepcopy(model)
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    return model


# ------------------------------------------------------------------------------------------------ measurements


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict as ``torch.save`` writes it (the weights part of a checkpoint)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.tell()


def cpu_latency_ms(model: nn.Module, image_size: int, runs: int = 15, warmup: int = 3) -> float:
    """Median milliseconds of one forward pass of one image on the CPU, fp32 eager, after ``warmup`` passes."""
    m = copy.deepcopy(model).cpu().float().eval()
    x = torch.randn(1, 3, image_size, image_size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            m(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros in the convolution and linear weights (the head included)."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws) / total) if total else 0.0


def _facts(model: nn.Module, image_size: int) -> dict[str, Any]:
    from fastlesion.models import count_flops, count_params

    cpu = copy.deepcopy(model).cpu().float().eval()
    return {"params": count_params(cpu), "flops": count_flops(cpu, image_size), "file_size": weights_bytes(cpu),
            "cpu_latency_ms": cpu_latency_ms(cpu, image_size), "sparsity": sparsity(cpu)}


# ---------------------------------------------------------------------------------------------------- the command


def _checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    path = run / "best.pt" if run.is_dir() else run
    if not path.is_file():
        raise FastlesionError(f"{run}: no checkpoint (expected a run folder with best.pt, or a .pt file)")
    return path


def _save(model: nn.Module, state: dict[str, Any], path: Path, info: dict[str, Any], structured: bool) -> None:
    from fastlesion.engine import checkpoint as ckpt

    raw = _permanent(ckpt.unwrap(model)).cpu().float()
    weights = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    out = {"model": weights, "classes": list(state["classes"]), "model_name": state["model_name"],
           "config": state["config"], "epoch": state.get("epoch"), "metrics": {}, "prune": info}
    if structured:
        out[STRUCTURE_KEY] = structure_of(raw, state["model_name"], len(state["classes"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_atomic(out, path)


def _check_reload(model: nn.Module, path: Path, image_size: int) -> None:
    """The saved checkpoint, rebuilt as ``fastlesion eval`` rebuilds it, must give the pruned model's outputs."""
    from fastlesion.export import cpu_model

    rebuilt, _, _ = cpu_model(path)
    live = _permanent(model).cpu().float().eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        diff = float((rebuilt(x) - live(x)).abs().max())
    if not diff <= 1e-4:
        raise FastlesionError(f"{path}: the pruned model rebuilt from the checkpoint differs from the pruned model "
                              f"(max |diff| of the logits {diff:.3g}); please report it")


def _finetune(model: nn.Module, cfg, epochs: int, lr: float) -> tuple[nn.Module, list[dict[str, Any]]]:
    """``epochs`` epochs of the engine's ``train_epoch`` on the training fold at a constant ``lr``, each followed by
    ``evaluate`` on the validation fold; returns the model of the best validation AUC and one row per epoch."""
    from fastlesion.config import replace
    from fastlesion.data.catalog import load_dataset
    from fastlesion.data.loader import build_loader
    from fastlesion.data.splits import split_dataset
    from fastlesion.engine.inference import inference_runtime
    from fastlesion.engine.loop import evaluate, train_epoch
    from fastlesion.engine.losses import create_loss
    from fastlesion.engine.optim import create_optimizer
    from fastlesion.engine.runtime import wrap_model
    from fastlesion.engine.train import seed_everything
    from fastlesion.metrics import classification_metrics

    seed_everything(cfg.train.seed)
    rt = inference_runtime(cfg)
    ds = load_dataset(cfg.data, progress=False)
    parts = split_dataset(ds, cfg.data)
    shard = {"device": rt.device, "channels_last": rt.channels_last}
    train_loader = build_loader(parts.train, cfg.loader, cfg.data.image_size, train=True, **shard)
    val_loader = build_loader(parts.val, cfg.loader, cfg.data.image_size, train=False, **shard)
    net = wrap_model(model, rt)
    ocfg = replace(cfg, **{"optim.lr": lr}).optim
    optimizer = create_optimizer(net.raw, ocfg)
    loss_fn = create_loss(ocfg, train_loader.labels, ds.num_classes).to(rt.device)
    scaler = rt.grad_scaler()
    best, best_auc, rows = None, -1.0, []
    for epoch in range(1, epochs + 1):
        train_loader.set_epoch(epoch)
        tr = train_epoch(net.model, train_loader, loss_fn, optimizer, scaler, rt, epoch, clip_grad=ocfg.clip_grad)
        res = evaluate(net.eval_model, val_loader, rt)
        auc = float(classification_metrics(res.labels, res.probs, ds.classes)["auc"])
        rows.append({"epoch": epoch, "train_loss": tr.loss, "val_loss": res.loss, "val_auc": auc})
        log.info("fine-tune epoch %d/%d: train_loss %.4f val_auc %.4f", epoch, epochs, tr.loss, auc)
        if best is None or auc > best_auc:
            best, best_auc = _permanent(net.raw).cpu(), auc
    return best, rows


def prune_run(run: str | Path, out: str | Path, amount: float = 0.5, method: str = "structured",
              finetune_epochs: int = 0, finetune_lr: float | None = None) -> dict[str, Any]:
    """Prune the checkpoint of ``run`` (a run folder's best.pt, or a .pt file), write ``out/best.pt`` and
    ``out/summary.json``, and return the summary.

    Raises:
        FastlesionError: a bad amount or method, torch-pruning missing for ``structured``, no checkpoint, or
            ``out`` being the run folder itself.
    """
    from fastlesion.engine.inference import eval_checkpoint
    from fastlesion.export import cpu_model

    if method not in METHODS:
        raise FastlesionError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < amount < 1.0:
        raise FastlesionError(f"--amount must be in (0, 1) (the fraction of channels / weights to remove), got "
                              f"{amount}")
    if finetune_epochs < 0:
        raise FastlesionError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if method == "structured":
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise FastlesionError(f"--method structured needs torch-pruning: {INSTALL}; or use --method "
                                  "unstructured (no extra package)") from None
    src = _checkpoint_path(run)
    out = Path(out)
    if out.resolve() == src.parent.resolve():
        raise FastlesionError(f"--out {out} is the run folder itself; choose another folder for the pruned model")
    model, state, cfg = cpu_model(src)
    size = cfg.data.image_size
    before = _facts(model, size)
    auc_before = eval_checkpoint(src, out=out / "eval_before")["auc"]

    model = model.train()  # pruning libraries trace the forward pass; the mode does not change the weights
    if method == "structured":
        _structured(model, amount, size)
    else:
        _unstructured(model, amount)
    model.eval()
    info = {"method": method, "amount": amount, "source": str(src), "finetune_epochs": finetune_epochs}
    dst = out / "best.pt"
    _save(model, state, dst, info, structured=method == "structured")
    _check_reload(model, dst, size)
    after = _facts(_permanent(model), size)
    auc_after = eval_checkpoint(dst, out=out / "eval_after")["auc"]
    summary: dict[str, Any] = {"checkpoint": str(src), "out": str(dst), "model": state["model_name"],
                               "method": method, "amount": amount, "image_size": size}
    for k in ("params", "flops", "file_size", "cpu_latency_ms", "sparsity"):
        summary[f"{k}_before"], summary[f"{k}_after"] = before[k], after[k]
    summary["val_auc_before"], summary["val_auc_after"] = auc_before, auc_after
    summary["finetune_epochs"] = finetune_epochs
    if finetune_epochs:
        lr = finetune_lr if finetune_lr is not None else cfg.optim.lr * 0.1
        tuned, rows = _finetune(model, cfg, finetune_epochs, lr)
        _save(tuned, state, dst, {**info, "finetune_lr": lr}, structured=method == "structured")
        summary["finetune_lr"], summary["finetune_rows"] = lr, rows
        summary["val_auc_after_finetune"] = eval_checkpoint(dst, out=out / "eval_after")["auc"]
        summary["sparsity_after"] = sparsity(_permanent(tuned))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The lines ``fastlesion prune`` prints."""
    def pct(a: float, b: float) -> str:
        return f"{(b - a) / a * 100:+.1f}%" if a else ""

    lines = [f"{s['model']} {s['method']} pruning, amount {s['amount']:g} ({s['image_size']} px):"]
    for key, label, fmt in (("params", "params", "{:,.0f}"), ("flops", "GFLOPs", "{:.3f}"),
                            ("file_size", "weights MB", "{:.2f}"), ("cpu_latency_ms", "CPU ms/image", "{:.2f}")):
        a, b = s[f"{key}_before"], s[f"{key}_after"]
        scale = 1e9 if key == "flops" else 1e6 if key == "file_size" else 1
        lines.append(f"  {label:<13} {fmt.format(a / scale):>12} -> {fmt.format(b / scale):>12}  {pct(a, b)}")
    lines.append(f"  {'sparsity':<13} {s['sparsity_before']:>12.3f} -> {s['sparsity_after']:>12.3f}")
    auc = f"  {'val AUC':<13} {s['val_auc_before']:>12.4f} -> {s['val_auc_after']:>12.4f}"
    if "val_auc_after_finetune" in s:
        auc += f"  -> {s['val_auc_after_finetune']:.4f} after {s['finetune_epochs']} fine-tune epochs"
    lines.append(auc)
    lines.append(f"wrote {s['out']} and {Path(s['out']).parent / 'summary.json'}")
    return "\n".join(lines)
