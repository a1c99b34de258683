"""``fastlesion explain``: class-activation PNGs and index for files, folders and the hardest validation images;
the target-layer finder; a missing grad-cam."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import train_tiny
from torch import nn

from fastlesion.cli import main
from fastlesion.engine import checkpoint as ckpt
from fastlesion.errors import FastlesionError
from fastlesion.explain import explain, find_target_layer
from fastlesion.models import create_model

pytest.importorskip("pytorch_grad_cam")


def _train(root: Path, out: Path) -> Path:
    """A 1-epoch LeNet at 32 px (as in test_inference); returns its best.pt."""
    return train_tiny(root, out)


@pytest.fixture(scope="module")
def lenet_ckpt(tiny_isic, tmp_path_factory) -> Path:
    return _train(tiny_isic, tmp_path_factory.mktemp("explain") / "lenet")


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


INDEX_COLUMNS = ["image", "label", "pred", "prob_benign", "prob_malignant", "explained", "png"]


def test_explain_files_and_folder(lenet_ckpt, tiny_isic, tmp_path, capsys):
    test_images = sorted((tiny_isic / "test").glob("*.jpg"))
    one = tiny_isic / "train" / sorted(pd.read_csv(tiny_isic / "train.csv")["image_name"])[0]
    out = tmp_path / "cams"
    args = ["explain", str(lenet_ckpt), f"{one}.jpg", str(tiny_isic / "test"), "--out", str(out)]
    assert main(args) == 0
    assert "layer features.3" in capsys.readouterr().out  # LeNet: its last convolution
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert list(index.columns) == INDEX_COLUMNS and len(index) == 1 + len(test_images)
    assert (index["label"] == "").all() and set(index["pred"]) <= {"benign", "malignant"}
    assert index["explained"].equals(index["pred"])
    assert (index[["prob_benign", "prob_malignant"]].sum(axis=1) - 1).abs().max() < 1e-5
    assert [Path(p).name for p in index["png"]] == [p.name for p in _pngs(out)]
    for p in index["png"]:
        assert Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" and Path(p).stat().st_size < 150_000


def test_explain_split_val_hardest_first(lenet_ckpt, tmp_path, capsys):
    out = tmp_path / "val"
    args = ["explain", str(lenet_ckpt), "--split", "val", "--n", "3", "--out", str(out), "--class", "malignant"]
    assert main(args) == 0
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == [*INDEX_COLUMNS, "loss"] and len(index) == 3 and len(_pngs(out)) == 3
    assert index["loss"].is_monotonic_decreasing and set(index["label"]) <= {"benign", "malignant"}
    assert (index["explained"] == "malignant").all()
    # the loss is the cross-entropy of the true class
    p_true = [r[f"prob_{r['label']}"] for _, r in index.iterrows()]
    assert index["loss"].tolist() == pytest.approx([-torch.log(torch.tensor(p)).item() for p in p_true], rel=1e-4)
    assert all(Path(png).name.endswith(f"_{Path(img).stem}.png") for img, png in zip(index["image"], index["png"]))


@pytest.mark.parametrize("method", ["gradcam++", "scorecam"])
def test_explain_methods(lenet_ckpt, tiny_isic, tmp_path, method):
    image = sorted((tiny_isic / "test").glob("*.jpg"))[0]
    index = explain(lenet_ckpt, [image], out=tmp_path / method, method=method)
    assert len(index) == 1 and index.attrs["method"] == method and Path(index["png"][0]).is_file()


def test_explain_timm_resnet18_checkpoint(lenet_ckpt, tiny_isic, tmp_path, capsys):
    state = ckpt.load(lenet_ckpt)
    torch.manual_seed(0)
    state["model"] = create_model("resnet18", num_classes=2).state_dict()  # random weights: nothing downloaded
    state["model_name"] = state["config"]["model"]["name"] = "resnet18"
    torch.save(state, tmp_path / "r18.pt")
    image = sorted((tiny_isic / "test").glob("*.jpg"))[0]
    assert main(["explain", str(tmp_path / "r18.pt"), str(image), "--out", str(tmp_path / "r18")]) == 0
    assert "layer layer4" in capsys.readouterr().out and len(_pngs(tmp_path / "r18")) == 1


def test_find_target_layer():
    assert find_target_layer(create_model("lenet", 2), 32)[0] == "features.3"
    assert find_target_layer(create_model("resnet18", 2), 32)[0] == "layer4"  # timm feature_info
    assert find_target_layer(create_model("tv_resnet18", 2), 32)[0] == "layer4"
    assert find_target_layer(create_model("tv_mobilenet_v2", 2), 32)[0] == "features.18"
    with pytest.raises(FastlesionError, match="no convolutional layer"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), 8)


def test_find_target_layer_refuses_a_transformer():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32)
    with pytest.raises(FastlesionError, match=r"blocks\.11 yields \[1, 5, 192\], no \[N, C, h, w\] map"):
        find_target_layer(vit, 32)


def test_explain_user_errors(lenet_ckpt, tiny_isic, tmp_path, capsys):
    assert main(["explain", str(lenet_ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "--split val" in _err(capsys)
    assert main(["explain", str(lenet_ckpt), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg: no such image or folder" in _err(capsys)
    assert main(["explain", str(lenet_ckpt), str(tiny_isic / "test"), "--split", "val"]) == 2
    assert "not both" in _err(capsys)
    assert main(["explain", str(lenet_ckpt), str(tiny_isic / "test"), "--class", "cat"]) == 2
    assert "'cat' is none of the checkpoint's classes" in _err(capsys)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["explain", str(lenet_ckpt), str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "bad.jpg: cannot decode image" in _err(capsys)


def test_explain_without_grad_cam_is_one_error_line(lenet_ckpt, tiny_isic, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import pytorch_grad_cam -> ImportError
    assert main(["explain", str(lenet_ckpt), str(tiny_isic / "test"), "--out", str(tmp_path / "x")]) == 2
    assert "pip install grad-cam" in _err(capsys)
    assert not (tmp_path / "x").exists()
