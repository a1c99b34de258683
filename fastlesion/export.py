"""``fastlesion export``: a checkpoint as an ONNX or TorchScript model that carries its own preprocessing, checked
against PyTorch before it is handed over.

The exported graph is the checkpoint's model behind a thin wrapper (:class:`Deployable`):

* input ``input``: float32 ``[N, 3, S, S]``, NCHW, RGB scaled to ``[0, 1]`` (``ToTensor``'s output), *not*
  normalised: the graph subtracts the ImageNet mean and divides by the std itself, so a consumer only resizes,
  crops and divides by 255. ``N`` is dynamic; ``S`` is the checkpoint's ``data.image_size``.
* outputs ``logits`` and ``probs`` (softmax), both ``[N, num_classes]``.

What a consumer needs to prepare an image (the eval transform of :mod:`fastlesion.data.transforms`: resize the
shorter side to ``eval_resize``, center-crop ``image_size``) travels with the model: in the ONNX ``metadata_props``
(one key each, non-strings JSON-encoded), in TorchScript's extra file ``fastlesion.json``, and in a JSON sidecar
next to the model (``model.onnx`` -> ``model.json``) that also records the check.

The check runs the exported file (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) and the PyTorch model on
a few validation images of the checkpoint's fold (random inputs when the dataset cannot be read) at two batch sizes
(proving the batch axis is dynamic) and fails when the probabilities differ by more than ``atol``.

ONNX goes through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``): the
older TorchScript-based exporter cannot export LeNet's ``AdaptiveAvgPool2d(5)`` on an input whose feature map is not
a multiple of 5 (32 px), and it is deprecated.

Segmentation (later): a model whose output is ``[N, 1, H, W]`` mask logits exports the same way; only
:class:`Deployable`'s head (``torch.sigmoid`` instead of the softmax over dim 1), the output names and the
``task`` / ``outputs`` metadata change, and the check compares the sigmoid maps the same way.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastlesion.config import Config
from fastlesion.errors import FastlesionError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INSTALL = {"onnx": "pip install onnx onnxscript onnxruntime   (or: pip install 'fastlesion[export]')"}
EXTRA_FILE = "fastlesion.json"  # the TorchScript extra file holding the metadata
DEFAULT_ATOL = 1e-4
_ONNX_INLINE_LIMIT = 1536 * 2**20  # weights above this go to an external ``.onnx.data`` file (protobuf's 2 GB limit)


class ExportCheckError(FastlesionError):
    """The exported model does not reproduce the PyTorch model within the bound."""


class Deployable(nn.Module):
    """``x in [0, 1] -> (x - mean) / std -> model -> (logits, softmax(logits))``: what is exported.

    A segmentation model (``[N, 1, H, W]`` logits) would return ``torch.sigmoid(logits)`` here instead of the
    softmax; nothing else in the export path depends on the output's shape.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((x - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=1)


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    metadata: dict[str, Any]
    max_abs_diff: float
    atol: float
    n_inputs: int
    inputs: str  # where the check images came from, in words
    backend: str  # what ran the exported model
    extra_files: list[Path]  # e.g. the ONNX external-data file of a model too large to hold inline


# ----------------------------------------------------------------------------------------------------- helpers
def require_onnx() -> None:
    """Import the ONNX stack or raise one line saying what to install."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise FastlesionError(f"ONNX export needs {', '.join(missing)}: {INSTALL['onnx']}")


def cpu_model(path: str | Path) -> tuple[nn.Module, dict[str, Any], Config]:
    """The checkpoint's eager model on the CPU in fp32 (what is exported and what the check compares against)."""
    from fastlesion.engine.inference import load_checkpoint_model
    from fastlesion.engine.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, compile_mode=None, channels_last=False,
                 cudnn_benchmark=False)
    return load_checkpoint_model(path, rt)


def pixel_transform(cfg: Config):
    """The eval transform without its ``Normalize``: a PIL image -> float ``[3, S, S]`` RGB in ``[0, 1]``."""
    from fastlesion.data.transforms import eval_transform

    return eval_transform(cfg.loader, cfg.data.image_size, normalize=False)


def metadata(state: dict[str, Any], cfg: Config, path: str | Path, fmt: str) -> dict[str, Any]:
    """What a consumer of the exported model needs: classes, input geometry, normalisation, outputs."""
    from fastlesion import __version__
    from fastlesion.data.transforms import MEAN, STD, eval_resize_size

    size = cfg.data.image_size
    return {
        "producer": f"fastlesion {__version__}",
        "format": fmt,
        "task": "classification",
        "model_name": state["model_name"],
        "classes": list(state["classes"]),
        "image_size": size,
        "eval_resize": eval_resize_size(size, cfg.loader.eval_crop),
        "eval_crop": cfg.loader.eval_crop,
        "mean": list(MEAN),
        "std": list(STD),
        "input_name": "input",
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_color": "RGB",
        "input_range": [0.0, 1.0],
        "normalized_in_model": True,
        "preprocess": (f"resize the shorter side to eval_resize ({eval_resize_size(size, cfg.loader.eval_crop)} px, "
                       f"bilinear), center-crop {size}x{size}, RGB float32 in [0, 1] (pixel / 255), NCHW; "
                       "the model subtracts mean and divides by std itself"),
        "output_names": ["logits", "probs"],
        "outputs": {"logits": "[N, num_classes] raw scores", "probs": "[N, num_classes] softmax of logits"},
        "dynamic_axes": {"input": [0], "logits": [0], "probs": [0]},
        "checkpoint": str(path),
        "epoch": state.get("epoch"),
        "torch_version": torch.__version__,
    }


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_images(cfg: Config, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` images ``[n, 3, S, S]`` in ``[0, 1]`` from the checkpoint's validation fold, else random inputs; and
    where they came from, in words. A synthetic set that is not in the cache is not generated for this."""
    from fastlesion.data.torch_loader import open_rgb

    size = cfg.data.image_size
    try:
        from fastlesion.data.catalog import load_dataset, synthetic_root
        from fastlesion.data.splits import split_dataset

        if cfg.data.dataset == "synthetic":
            root = Path(cfg.data.root) if cfg.data.root else synthetic_root(cfg.data)
            if not root.is_dir():
                raise FastlesionError(f"the synthetic set {root} is not generated")
        ds = load_dataset(cfg.data, progress=False)
        val = split_dataset(ds, cfg.data).val
        tf = pixel_transform(cfg)
        xs = []
        for p in val["path"].tolist()[:n]:
            xs.append(tf(open_rgb(p)))  # upright by its EXIF orientation, as the loaders see it
        return torch.stack(xs), f"{len(xs)} validation images (fold {cfg.data.fold} of {cfg.data.dataset})"
    except (FastlesionError, OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, size, size, generator=g), f"{n} random inputs (dataset not readable: {reason})"


def _replace_files(tmpdir: Path, dest_dir: Path, names: list[str]) -> None:
    """Move ``names`` from ``tmpdir`` into ``dest_dir`` with ``os.replace``; the main file (the first) last."""
    for name in names[1:] + names[:1]:
        os.replace(tmpdir / name, dest_dir / name)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ writers
def write_onnx(wrapper: Deployable, example: torch.Tensor, out: Path, meta: dict[str, Any],
               opset: int | None = None) -> list[Path]:
    """Export ``wrapper`` with a dynamic batch axis and ``meta`` in ``metadata_props``; returns the files written
    (the model, plus ``<name>.data`` for weights above 1.5 GiB)."""
    require_onnx()
    weight_bytes = sum(t.numel() * t.element_size() for t in wrapper.state_dict().values())
    external = weight_bytes > _ONNX_INLINE_LIMIT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch.export / onnxscript)
        try:
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["input"],
                                        output_names=["logits", "probs"], opset_version=opset,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types; one line names the model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FastlesionError(f"{meta['model_name']}: ONNX export failed ({type(e).__name__}: {first}); "
                                  "try --format torchscript") from None
    meta = {**meta, "opset": int(program.model.opset_imports.get("", 0))}
    for key, value in meta.items():
        program.model.metadata_props[key] = _as_text(value)
    program.model.doc_string = f"fastlesion {meta['model_name']}: {meta['preprocess']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        program.save(str(Path(tmp) / out.name), external_data=external)
        names = [out.name] + sorted(p.name for p in Path(tmp).iterdir() if p.name != out.name)
        _replace_files(Path(tmp), out.parent, names)
    return [out.parent / n for n in names]


def write_torchscript(wrapper: Deployable, example: torch.Tensor, out: Path, meta: dict[str, Any]) -> list[Path]:
    """``torch.jit.trace`` of ``wrapper`` (its batch axis stays free: the check runs two batch sizes), ``meta`` in the
    extra file ``fastlesion.json``. TorchScript is deprecated upstream (torch.jit warns): prefer ONNX."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated"
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        except Exception as e:  # noqa: BLE001 - tracer failures come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FastlesionError(f"{meta['model_name']}: TorchScript trace failed ({type(e).__name__}: {first}); "
                                  "try --format onnx") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.save is deprecated"
            torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(meta)})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return [out]


# ------------------------------------------------------------------------------------------------------ readers
def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    """Probabilities of the exported ONNX model (onnxruntime, CPU) for ``x``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probs"], {"input": x.numpy()})[0]


def run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    """Probabilities of the exported TorchScript model (``torch.jit.load``, CPU) for ``x``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return model(x)[1].numpy()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported model: ONNX ``metadata_props`` (JSON values decoded) or TorchScript's
    ``fastlesion.json`` extra file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        out: dict[str, Any] = {}
        for p in model.metadata_props:
            try:
                out[p.key] = json.loads(p.value)
            except ValueError:
                out[p.key] = p.value
        return out
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])


def max_prob_diff(fmt: str, path: Path, wrapper: Deployable, x: torch.Tensor) -> float:
    """Max abs difference of the probabilities of the exported file and of ``wrapper`` on ``x`` as one batch and
    on its first image alone (a batch size the export never saw)."""
    run = run_onnx if fmt == "onnx" else run_torchscript
    worst = 0.0
    for batch in (x, x[:1]):
        with torch.no_grad():
            ref = wrapper(batch)[1].numpy()
        got = run(path, batch)
        if got.shape != ref.shape:
            raise ExportCheckError(f"{path}: the exported model returns shape {list(got.shape)} for a batch of "
                                   f"{len(batch)}, PyTorch {list(ref.shape)}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))))
    return worst


# ---------------------------------------------------------------------------------------------------- the story
def default_out(checkpoint: str | Path, fmt: str) -> Path:
    """``runs/x/best.pt`` -> ``runs/x/best.onnx`` / ``runs/x/best.torchscript.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.stem + SUFFIX[fmt])


def sidecar_path(out: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``; ``best.torchscript.pt`` -> ``best.torchscript.json``."""
    out = Path(out)
    return out.with_suffix(".json") if out.suffix != ".json" else out.with_name(out.name + ".meta.json")


def export_checkpoint(checkpoint: str | Path, fmt: str = "onnx", out: str | Path | None = None,
                      atol: float = DEFAULT_ATOL, n_check: int = 8, opset: int | None = None) -> ExportResult:
    """Export ``checkpoint`` as ``fmt`` (``onnx`` | ``torchscript``) to ``out`` (default next to it), write the JSON
    sidecar, and check the file against PyTorch; :class:`ExportCheckError` when the probabilities differ by more
    than ``atol`` (the files stay written, and the sidecar records the failed check)."""
    if fmt not in FORMATS:
        raise FastlesionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not atol > 0:
        raise FastlesionError(f"--atol must be > 0, got {atol}")
    if n_check < 1:
        raise FastlesionError(f"--n must be >= 1, got {n_check}")
    if fmt == "onnx":
        require_onnx()  # before the (slow) model load
    out = Path(out) if out else default_out(checkpoint, fmt)
    if out.is_dir():
        raise FastlesionError(f"{out}: is a directory; --out names the model file")
    model, state, cfg = cpu_model(checkpoint)
    from fastlesion.data.transforms import MEAN, STD

    wrapper = Deployable(model, MEAN, STD).eval()
    meta = metadata(state, cfg, checkpoint, fmt)
    size = cfg.data.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    files = (write_onnx(wrapper, example, out, meta, opset) if fmt == "onnx"
             else write_torchscript(wrapper, example, out, meta))
    if fmt == "onnx":
        meta = read_metadata(out)
    log.info("exported %s in %.1fs", out, time.perf_counter() - t0)
    x, source = check_images(cfg, n_check)
    if fmt == "onnx":
        import onnxruntime

        backend = f"onnxruntime {onnxruntime.__version__}"
    else:
        backend = f"torch.jit.load (torch {torch.__version__})"
    diff = max_prob_diff(fmt, out, wrapper, x)
    side = sidecar_path(out)
    passed = diff <= atol
    _write_json(side, {**meta, "files": [f.name for f in files], "check": {
        "backend": backend, "inputs": source, "max_abs_diff_probs": diff, "atol": atol, "passed": passed}})
    if not passed:
        raise ExportCheckError(f"{out}: {backend} differs from PyTorch by {diff:.3g} in the probabilities on {source} "
                               f"(bound {atol:g}); the file is written but does not reproduce the model")
    return ExportResult(path=out, sidecar=side, format=fmt, metadata=meta, max_abs_diff=diff, atol=atol,
                        n_inputs=len(x), inputs=source, backend=backend, extra_files=files[1:])
