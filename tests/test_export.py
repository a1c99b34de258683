"""``fastlesion export``: ONNX and TorchScript round trips, metadata, the check against PyTorch and its failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_tiny

from fastlesion.cli import main
from fastlesion.engine import checkpoint as ckpt
from fastlesion.errors import FastlesionError
from fastlesion.export import export_checkpoint, read_metadata, sidecar_path

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def _train(root: Path, out: Path) -> Path:
    """A 1-epoch LeNet at 32 px (as in test_inference); returns its best.pt."""
    return train_tiny(root, out)


def swap_model(src: Path, dest: Path, name: str, **config: object) -> Path:
    """A copy of checkpoint ``src`` holding a freshly built ``name`` (random weights, nothing downloaded) and
    ``config`` changes (``{"data.root": ...}``)."""
    from fastlesion.models import create_model

    state = ckpt.load(src)
    torch.manual_seed(0)
    state["model"] = create_model(name, num_classes=len(state["classes"])).state_dict()
    state["model_name"] = name
    for key, value in config.items():
        section, field = key.split(".")
        state["config"][section][field] = value
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return dest


@pytest.fixture(scope="module")
def lenet_ckpt(tiny_isic, tmp_path_factory) -> Path:
    return _train(tiny_isic, tmp_path_factory.mktemp("export") / "lenet")


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def _check_meta(meta: dict, fmt: str) -> None:
    assert meta["classes"] == ["benign", "malignant"] and meta["model_name"] == "lenet" and meta["format"] == fmt
    assert meta["image_size"] == 32 and meta["eval_resize"] == 37 and meta["eval_crop"] == 0.875
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["input_layout"] == "NCHW" and meta["input_range"] == [0.0, 1.0] and meta["normalized_in_model"]
    assert meta["output_names"] == ["logits", "probs"]


def _sidecar(path: Path) -> dict:
    side = json.loads(sidecar_path(path).read_text())
    assert side["check"]["atol"] == 1e-4 and side["check"]["passed"] is True
    assert 0 <= side["check"]["max_abs_diff_probs"] <= 1e-4
    return side


def test_export_onnx_round_trip(lenet_ckpt, tmp_path, capsys):
    out = tmp_path / "m" / "model.onnx"
    assert main(["export", str(lenet_ckpt), "--format", "onnx", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "onnxruntime" in stdout and "8 validation images (fold 0 of isic2020)" in stdout and "ok" in stdout
    assert out.is_file() and (tmp_path / "m" / "model.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.onnx"]  # no temp files left
    meta = read_metadata(out)
    _check_meta(meta, "onnx")
    side = _sidecar(out)
    _check_meta(side, "onnx")
    assert side["opset"] >= 17 and "validation images" in side["check"]["inputs"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == ["benign", "malignant"] and props["model_name"] == "lenet"
    assert sess.get_inputs()[0].name == "input" and sess.get_inputs()[0].shape[1:] == [3, 32, 32]
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # the batch axis is dynamic
    for n in (1, 3):
        probs = sess.run(["probs"], {"input": np.random.rand(n, 3, 32, 32).astype(np.float32)})[0]
        assert probs.shape == (n, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_round_trip(lenet_ckpt, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(lenet_ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "torch.jit.load" in stdout and "validation images" in stdout
    _check_meta(read_metadata(out), "torchscript")
    _check_meta(_sidecar(out), "torchscript")
    extra = {"fastlesion.json": ""}
    model = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["fastlesion.json"])["classes"] == ["benign", "malignant"]
    with torch.no_grad():
        logits, probs = model(torch.rand(5, 3, 32, 32))
    assert logits.shape == probs.shape == (5, 2) and torch.allclose(probs.sum(1), torch.ones(5))


def test_export_default_out_next_to_checkpoint(lenet_ckpt, tmp_path):
    src = tmp_path / "run" / "best.pt"
    src.parent.mkdir()
    src.write_bytes(lenet_ckpt.read_bytes())
    r = export_checkpoint(src, "torchscript", n_check=2)
    assert r.path == tmp_path / "run" / "best.torchscript.pt"
    assert r.sidecar == tmp_path / "run" / "best.torchscript.json"
    assert r.n_inputs == 2 and r.max_abs_diff <= 1e-4


def test_export_check_failure_is_one_error_line(lenet_ckpt, tmp_path, capsys, monkeypatch):
    import fastlesion.export as ex

    real = ex.run_onnx
    monkeypatch.setattr(ex, "run_onnx", lambda path, x: np.clip(real(path, x) + 0.3, 0, 1))
    out = tmp_path / "model.onnx"
    assert main(["export", str(lenet_ckpt), "--out", str(out)]) == 2
    err = _err(capsys)
    assert str(out) in err and "differs from PyTorch" in err and "bound 0.0001" in err
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["check"]["passed"] is False and side["check"]["max_abs_diff_probs"] > 0.1


def test_export_random_inputs_when_dataset_unreadable(lenet_ckpt, tmp_path, capsys):
    moved = swap_model(lenet_ckpt, tmp_path / "moved.pt", "lenet", **{"data.root": str(tmp_path / "gone")})
    out = tmp_path / "model.pt"
    assert main(["export", str(moved), "--format", "torchscript", "--out", str(out), "--n", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "3 random inputs (dataset not readable:" in stdout and "gone" in stdout
    assert "random inputs" in json.loads((tmp_path / "model.json").read_text())["check"]["inputs"]


def test_export_timm_resnet18_onnx(lenet_ckpt, tmp_path):
    ck = swap_model(lenet_ckpt, tmp_path / "r18.pt", "resnet18", **{"model.name": "resnet18"})
    r = export_checkpoint(ck, "onnx", out=tmp_path / "r18.onnx", n_check=2)
    assert r.max_abs_diff <= 1e-4 and r.metadata["model_name"] == "resnet18" and r.extra_files == []


def test_export_missing_onnx_packages_is_one_error_line(lenet_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", str(lenet_ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = _err(capsys)
    assert "onnxscript, onnxruntime" in err and "pip install onnx onnxscript onnxruntime" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_bad_arguments(lenet_ckpt, tmp_path, capsys):
    with pytest.raises(FastlesionError, match="--format"):
        export_checkpoint(lenet_ckpt, "tflite")
    assert main(["export", str(lenet_ckpt), "--atol", "0", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--atol" in _err(capsys)
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "torchscript"]) == 2
    assert "checkpoint not found" in _err(capsys)
