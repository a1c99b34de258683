"""Tests of the model registry (fastlesion.models): building, errors and loading local weights files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from fastlesion import models as M
from fastlesion.errors import FastlesionError
from fastlesion.models import ModelError


@pytest.fixture(scope="module")
def r18_imagenet_sd() -> dict[str, torch.Tensor]:
    """A resnet18 state_dict with a 1000-class head, as an ImageNet weights file would hold."""
    torch.manual_seed(0)
    return M.create_model("resnet18", num_classes=1000).state_dict()


def _fresh_r18(num_classes: int = 2) -> nn.Module:
    torch.manual_seed(1)
    return M.create_model("resnet18", num_classes=num_classes)


def _assert_backbone_loaded(model: nn.Module, sd: dict[str, torch.Tensor], info: dict) -> None:
    own = model.state_dict()
    for key, value in sd.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    assert sorted(info["skipped"]) == ["fc.bias", "fc.weight"]
    assert not any(k.startswith("fc.") for k in info["loaded"])
    assert len(info["loaded"]) == len(own) - 2
    assert own["fc.weight"].shape == (2, 512)


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_contents_lazy_and_in_timm() -> None:
    names = M.list_models()
    assert names == sorted(names)
    expected = {"lenet", "resnet18", "resnet50", "efficientnet_b0", "efficientnet_b7", "densenet121", "tv_resnet18"}
    assert expected <= set(names)
    known = set(timm.list_models())
    for name in names:
        if name != "lenet" and not name.startswith("tv_") and M.model_task(name) == "classification":
            assert name in known, name


def test_register_refuses_duplicates_and_bad_builders() -> None:
    with pytest.raises(ModelError, match="'resnet18' is already registered"):
        M.register_model("resnet18", lambda **kw: nn.Linear(1, 1))
    with pytest.raises(ModelError, match="callable"):
        M.register_model("not_a_builder_xyz", "nope")  # type: ignore[arg-type]
    assert issubclass(ModelError, FastlesionError)


def test_register_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_REGISTRY", dict(M._REGISTRY))
    M.register_model("tiny_test", lambda num_classes, **kw: nn.Linear(4, num_classes), "test", "a linear layer")
    assert "tiny_test" in M.list_models()
    assert M.create_model("tiny_test", num_classes=3).out_features == 3


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnt18'; did you mean resnet18") as e:
        M.create_model("resnt18", num_classes=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 0}, "num_classes"), ({"num_classes": 2, "drop_rate": 1.5}, "drop_rate")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        M.create_model("lenet", **kwargs)


# -------------------------------------------------------------------------------------------------------- builds


@pytest.mark.parametrize("size", [32, 224, 8])
def test_lenet_any_input_size(size: int) -> None:
    model = M.create_model("lenet", num_classes=3).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_lenet_dropout_and_channels() -> None:
    model = M.create_model("lenet", num_classes=2, in_chans=1, drop_rate=0.5)
    assert model.drop.p == 0.5
    assert model(torch.randn(4, 1, 40, 40)).shape == (4, 2)
    assert M.count_params(M.create_model("lenet", num_classes=2)) == 61326


@pytest.mark.parametrize("name", ["resnet18", "tv_resnet18", "tv_mobilenet_v2"])
def test_timm_and_torchvision_build_and_forward(name: str) -> None:
    model = M.create_model(name, num_classes=7).eval()
    assert model.fastlesion_name == name
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_drop_rate_reaches_the_model() -> None:
    timm_model = M.create_model("resnet18", num_classes=2, drop_rate=0.3, drop_path_rate=0.1)
    assert timm_model.drop_rate == 0.3
    tv_mobile = M.create_model("tv_mobilenet_v2", num_classes=2, drop_rate=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in tv_mobile.modules())
    tv_resnet = M.create_model("tv_resnet18", num_classes=2, drop_rate=0.4)
    assert tv_resnet.fc.drop.p == 0.4
    assert {"fc.weight", "fc.bias"} <= set(tv_resnet.state_dict())  # keys unchanged: torchvision weights still load
    tv_resnet.train()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(tv_resnet(x), tv_resnet(x))  # dropout active in train mode


def test_any_timm_name_and_drop_path_fallback(caplog: pytest.LogCaptureFixture) -> None:
    assert "resnet10t" not in M.list_models()
    assert M.create_model("resnet10t", num_classes=2).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    with caplog.at_level(logging.WARNING, logger="fastlesion.models"):
        M.create_model("lenet", num_classes=2, drop_path_rate=0.1)
    assert "drop_path_rate" in caplog.text


def test_tv_refuses_other_channel_counts() -> None:
    with pytest.raises(ModelError, match="tv_resnet18 takes 3 input channels"):
        M.create_model("tv_resnet18", num_classes=2, in_chans=1)


# ----------------------------------------------------------------------------------------------- pretrained files


def test_pretrained_round_trip_skips_head(
    tmp_path: Path, r18_imagenet_sd: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r18_in1k.pth"
    torch.save(r18_imagenet_sd, path)
    model = _fresh_r18()
    with caplog.at_level(logging.WARNING, logger="fastlesion.models"):
        info = M.load_pretrained(model, str(path))
    _assert_backbone_loaded(model, r18_imagenet_sd, info)
    assert "classifier head" in caplog.text and "fc.weight" in caplog.text
    assert info["missing"] == [] and info["unexpected"] == []

    model2 = M.create_model("resnet18", num_classes=2, pretrained_path=str(path))
    assert torch.equal(model2.state_dict()["conv1.weight"], r18_imagenet_sd["conv1.weight"])

    with pytest.raises(ModelError, match=r"fc\.(weight|bias) has shape \[1000.*strict_head"):
        M.load_pretrained(_fresh_r18(), str(path), strict_head=True)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "epoch": 3, "best_auc": 0.9},
        lambda sd: {"state_dict": sd, "arch": "resnet18"},
    ],
    ids=["ddp", "compile", "ddp+compile", "fastlesion-ckpt", "state_dict-key"],
)
def test_pretrained_wrapped_files(tmp_path: Path, r18_imagenet_sd: dict[str, torch.Tensor], wrap) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(r18_imagenet_sd), path)
    model = _fresh_r18()
    _assert_backbone_loaded(model, r18_imagenet_sd, M.load_pretrained(model, str(path)))


def test_pretrained_safetensors(tmp_path: Path, r18_imagenet_sd: dict[str, torch.Tensor]) -> None:
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    st.save_file({k: v.contiguous() for k, v in r18_imagenet_sd.items()}, str(path))
    model = _fresh_r18()
    _assert_backbone_loaded(model, r18_imagenet_sd, M.load_pretrained(model, str(path)))


def test_backbone_mismatch_names_key(tmp_path: Path, r18_imagenet_sd: dict[str, torch.Tensor]) -> None:
    sd = dict(r18_imagenet_sd)
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "tampered.pth"
    torch.save(sd, path)
    msg = (
        r"weights file .*tampered\.pth does not fit resnet18: layer1\.0\.conv1\.weight has shape "
        r"\[64, 64, 1, 1\] in the file, \[64, 64, 3, 3\] in the model"
    )
    with pytest.raises(ModelError, match=msg):
        M.load_pretrained(_fresh_r18(), str(path))


def test_resnet34_into_resnet50_names_key(tmp_path: Path) -> None:
    path = tmp_path / "r34.pth"
    with torch.device("meta"):  # only shapes matter to build the file's key list; save real zeros of those shapes
        shapes = {k: v.shape for k, v in M.create_model("resnet34", num_classes=1000).state_dict().items()}
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, path)
    with pytest.raises(ModelError, match=r"does not fit resnet50: layer1\.0\.conv1\.weight has shape \[64, 64, 3, 3\]"):
        M.create_model("resnet50", num_classes=2, pretrained_path=str(path))


def test_other_architecture_refused(tmp_path: Path) -> None:
    path = tmp_path / "lenet.pth"
    torch.save(M.create_model("lenet", num_classes=2).state_dict(), path)
    with pytest.raises(ModelError, match=r"does not fit resnet18: only 0 of the model's \d+ keys"):
        M.load_pretrained(_fresh_r18(), str(path))
    partial = {k: v for i, (k, v) in enumerate(_fresh_r18().state_dict().items()) if i % 3 == 0}
    torch.save(partial, path)
    with pytest.raises(ModelError, match="another architecture"):
        M.load_pretrained(_fresh_r18(), str(path))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"weights file .*nope\.pth not found"):
        M.create_model("lenet", num_classes=2, pretrained_path=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="garbage.pth cannot be loaded"):
        M.load_pretrained(M.create_model("lenet", num_classes=2), str(garbage))
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(ModelError, match="holds no tensors"):
        M.load_pretrained(M.create_model("lenet", num_classes=2), str(empty))


def test_lenet_head_skip(tmp_path: Path) -> None:
    path = tmp_path / "lenet10.pth"
    src = M.create_model("lenet", num_classes=10)
    torch.save({"model": src.state_dict()}, path)
    info = M.load_pretrained(M.create_model("lenet", num_classes=2), str(path))
    assert sorted(info["skipped"]) == ["fc3.bias", "fc3.weight"]


# ------------------------------------------------------------------------------------------------------ listings


def test_count_params_trainable_only() -> None:
    model = M.create_model("lenet", num_classes=2)
    total = M.count_params(model)
    for p in model.features.parameters():
        p.requires_grad_(False)
    assert M.count_params(model) == total - sum(p.numel() for p in model.features.parameters())


def test_describe_models_matches_count_params() -> None:
    rows = M.describe_models(["lenet", "resnet18"], num_classes=2)
    assert [r["name"] for r in rows] == ["lenet", "resnet18"]
    assert set(rows[0]) == {"name", "family", "task", "params", "flops", "note"}
    assert rows[0]["params"] == M.count_params(M.create_model("lenet", num_classes=2))
    assert rows[1]["params"] == M.count_params(M.create_model("resnet18", num_classes=2))
    assert rows[1]["family"] == "resnet"
    with pytest.raises(ModelError, match="unknown model"):
        M.describe_models(["nonexistent_net_q"])
