"""Pretrained weights: timm's Hugging Face hub cache and torchvision's weights API, offline, from caches these tests
fill with locally made files (nothing is ever downloaded), and strict loading of a weights file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from helpers import HF_HUB_ID, fill_hf_cache

from fastlesion import models as M
from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.errors import ConfigError
from fastlesion.models import ModelError


def test_timm_pretrained_from_the_hf_cache(offline_hub) -> None:
    state = fill_hf_cache(offline_hub)
    model = M.create_model("test_resnet", num_classes=3, pretrained=True)
    own = model.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(torch.equal(own[k], state[k]) for k in body)
    assert own["fc.weight"].shape[0] == 3  # the 1000-class ImageNet head is left out, the new one random


def test_timm_offline_without_cache_says_how_to_get_the_file(offline_hub) -> None:
    with pytest.raises(ModelError) as e:
        M.create_model("test_resnet", num_classes=2, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"hf download {HF_HUB_ID} model.safetensors" in msg and "huggingface-cli download" in msg
    assert "--pretrained FILE" in msg and str(offline_hub / "hub") in msg


def test_cli_offline_error_is_one_line(offline_hub, tiny_isic, tmp_path, capsys) -> None:
    args = ["train", "--data", str(tiny_isic), "--model", "test_resnet", "--model.pretrained", "true", "--quiet",
            "--out", str(tmp_path / "r"), "--backend", "torch", "--workers", "0", "--image-size", "32",
            "--data.folds_file", str(tmp_path / "folds.csv")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "hf download" in lines[0], lines


def test_cli_trains_from_the_cache_with_env_only(tiny_isic, tmp_path) -> None:
    """A fresh process: HF_HOME and HF_HUB_OFFLINE in the environment are what huggingface_hub honours."""
    home = tmp_path / "hf"
    fill_hf_cache(home)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "fastlesion.cli", "train", "--data", str(tiny_isic), "--model", "test_resnet",
            "--model.pretrained", "true", "--epochs", "1", "--quiet", "--out", str(tmp_path / "r"), "--backend",
            "torch", "--workers", "0", "--image-size", "32", "--batch-size", "16",
            "--data.folds_file", str(tmp_path / "folds.csv")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "best.pt").is_file()


def test_lenet_and_conflicting_settings() -> None:
    with pytest.raises(ModelError, match="lenet has no pretrained weights"):
        M.create_model("lenet", num_classes=2, pretrained=True)
    with pytest.raises(ConfigError, match="model.pretrained and model.pretrained_path"):
        load_config(None, {"model.pretrained": True, "model.pretrained_path": "w.pth"})


# ----------------------------------------------------------------------------------------------------- torchvision
def test_torchvision_pretrained_from_torch_home(tmp_path, monkeypatch) -> None:
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = tvm.MobileNet_V2_Weights.DEFAULT
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    src = tvm.mobilenet_v2(weights=None).state_dict()  # a locally made 1000-class file under the cached name
    torch.save(src, target)
    model = M.create_model("tv_mobilenet_v2", num_classes=2, pretrained=True)
    own = model.state_dict()
    assert torch.equal(own["features.0.0.weight"], src["features.0.0.weight"])
    assert own["classifier.1.weight"].shape == (2, 1280)


def test_torchvision_offline_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match=r"tv_mobilenet_v2: cannot load torchvision's pretrained weights .*"
                                         r"is not cached .*--pretrained FILE"):
        M.create_model("tv_mobilenet_v2", num_classes=2, pretrained=True)


# --------------------------------------------------------------------------------------------------- strict files
def _zeros_of(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.create_model(name, num_classes=1000).state_dict().items()}
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_other_architecture_is_refused_unless_not_strict(tmp_path, caplog) -> None:
    path = tmp_path / "r18.pth"
    torch.save(_zeros_of("resnet18"), path)
    with pytest.raises(ModelError, match=r"does not fit resnet34: \d+ of the model's tensors are not in the file "
                                         r"\(first: layer1\.2\..*pretrained_strict false"):
        M.create_model("resnet34", num_classes=2, pretrained_path=str(path))
    with caplog.at_level(logging.WARNING, logger="fastlesion.models"):
        model = M.create_model("resnet34", num_classes=2, pretrained_path=str(path), pretrained_strict=False)
    assert "keep their random init" in caplog.text
    assert torch.equal(model.state_dict()["conv1.weight"], torch.zeros(64, 3, 7, 7))

    path34 = tmp_path / "r34.pth"
    torch.save(_zeros_of("resnet34"), path34)  # every resnet18 key is in it, with 80 more
    with pytest.raises(ModelError, match=r"tensors of the file are not in the model \(first: layer1\.2\."):
        M.load_pretrained(M.create_model("resnet18", num_classes=2), str(path34))


def test_a_file_without_head_loads_strictly(tmp_path) -> None:
    body = {k: v for k, v in _zeros_of("resnet18").items() if not k.startswith("fc.")}
    path = tmp_path / "backbone.pth"
    torch.save(body, path)
    info = M.load_pretrained(M.create_model("resnet18", num_classes=2), str(path))
    assert sorted(info["missing"]) == ["fc.bias", "fc.weight"] and info["unexpected"] == []
