"""FLOPs of the model registry (fastlesion.models.count_flops / describe_models) and `fastlesion models` flags."""

from __future__ import annotations

import torch
from torch import nn

from fastlesion import models as M
from fastlesion.cli import main


def test_count_flops_linear_and_conv() -> None:
    # a 3x8x8 input, conv 3->4 k3 pad1: 8*8 outputs * 4 channels * 27 multiply-adds * 2
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 2, bias=False))
    assert M.count_flops(conv, image_size=8) == 2 * (8 * 8 * 4 * 27) + 2 * 256 * 2
    assert conv.training  # mode restored


def test_meta_and_cpu_counts_agree() -> None:
    cpu = M.count_flops(M.create_model("lenet", num_classes=2), image_size=32)
    with torch.device("meta"):
        meta = M.count_flops(M.create_model("lenet", num_classes=2), image_size=32)
    assert cpu == meta > 0


def test_describe_models_has_flops_scaling_with_size() -> None:
    small = {r["name"]: r for r in M.describe_models(["resnet18", "lenet"], image_size=64)}
    big = {r["name"]: r for r in M.describe_models(["resnet18"], image_size=224)}
    assert 3.4e9 < big["resnet18"]["flops"] < 3.8e9  # ResNet-18: 1.8 GMACs at 224
    assert small["resnet18"]["flops"] < big["resnet18"]["flops"] and small["lenet"]["flops"] > 0
    assert M.describe_models(["resnet18"], image_size=None)[0]["flops"] is None


def test_describe_models_filter() -> None:
    rows = M.describe_models(name_filter="RESNET1", image_size=32)
    assert {r["name"] for r in rows} == {"resnet18", "resnet101", "tv_resnet18", "unet_resnet18"}


def test_vit_at_another_size_has_no_flops() -> None:
    assert M.describe_models(["vit_small_patch16_224"], image_size=64)[0]["flops"] is None


def test_cli_models_flops_column(capsys) -> None:
    assert main(["models", "--filter", "resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "64x64" in out and "tv_resnet18" in out and "lenet" not in out
