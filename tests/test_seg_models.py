"""Segmentation models (segmentation-models-pytorch over timm encoders): shapes, channels_last, the task of a name,
body/head split for fine-tuning, dropout, pretrained encoder weights from a locally filled Hugging Face cache (nothing
is downloaded) and from a weights file, and the ``fastlesion models`` listing."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from helpers import HF_HUB_ID, fill_hf_cache
from torch import nn

from fastlesion import models as M
from fastlesion.engine.optim import param_groups
from fastlesion.models import ModelError

TINY = "unet_mobilenetv3_small_050"
SEG_NAMES = M.list_models(task="segmentation")


def _tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return M.create_model(TINY, num_classes=1, **kw)


@pytest.fixture
def test_resnet_unet(monkeypatch) -> str:
    """A registered U-Net over timm's ``test_resnet`` encoder (tiny; it has a Hugging Face pretrained tag)."""
    monkeypatch.setattr(M, "_REGISTRY", dict(M._REGISTRY))
    builder = partial(M._build_smp, "unet", "test_resnet", decoder_channels=(16, 16, 8, 8, 8))
    M.register_model("unet_test_resnet", builder, "unet", "test", task="segmentation")
    return "unet_test_resnet"


# ---------------------------------------------------------------------------------------------------- registry
def test_the_promised_models_are_registered_as_segmentation() -> None:
    for name in ("unet_resnet18", "unet_resnet34", "unet_efficientnet_b0", "unet_mobilenetv3_large_100",
                 "fpn_resnet34", "deeplabv3plus_resnet34", TINY):
        assert name in SEG_NAMES and M.model_task(name) == "segmentation"
    assert M.model_task("resnet18") == "classification" and M.model_task("lenet") == "classification"
    assert M.model_task("test_resnet") == "classification"  # any timm name outside the registry is a classifier
    assert set(SEG_NAMES).isdisjoint(M.list_models(task="classification"))
    assert sorted(SEG_NAMES + M.list_models(task="classification")) == M.list_models()
    with pytest.raises(ModelError, match="unknown model 'unet_resnet35'; did you mean unet_resnet34"):
        M.model_task("unet_resnet35")


def test_register_refuses_an_unknown_task(monkeypatch) -> None:
    monkeypatch.setattr(M, "_REGISTRY", dict(M._REGISTRY))
    with pytest.raises(ModelError, match="task must be one of"):
        M.register_model("x_seg", lambda **kw: nn.Identity(), task="detection")


@pytest.mark.parametrize("name", SEG_NAMES)
def test_every_segmentation_model_maps_images_to_mask_logits(name) -> None:
    model = M.create_model(name, num_classes=1).eval()
    assert model.fastlesion_name == name and M.is_segmentation_model(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_more_classes_and_input_channels() -> None:
    model = M.create_model(TINY, num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)


def test_channels_last_forward_and_backward_match_contiguous() -> None:
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    model_cl.train()
    model_cl(x.contiguous(memory_format=torch.channels_last)).mean().backward()
    assert all(p.grad is not None for p in model_cl.encoder.parameters())


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_split_head_body_is_the_encoder_head_the_rest() -> None:
    model = _tiny()
    body, head = M.split_head(model)
    assert {id(p) for p in body} == {id(p) for p in model.encoder.parameters()}
    expected_head = [*model.decoder.parameters(), *model.segmentation_head.parameters()]
    assert {id(p) for p in head} == {id(p) for p in expected_head}
    assert len(body) + len(head) == len(list(model.parameters()))
    groups = param_groups(model, 1e-4, True, backbone_lr_mult=0.1)  # optim.backbone_lr_mult / freeze_epochs
    assert [g["lr_mult"] for g in groups] == [0.1, 0.1, 1.0, 1.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_drop_rate_is_channel_dropout_before_the_head_without_new_keys() -> None:
    plain, dropped = _tiny(), _tiny(drop_rate=0.3)
    assert list(plain.state_dict()) == list(dropped.state_dict())
    conv = dropped.segmentation_head[0]
    assert isinstance(conv.drop, nn.Dropout2d) and conv.drop.p == 0.3
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))  # inactive in eval mode
    fpn = M.create_model("fpn_resnet34", num_classes=1, drop_rate=0.25)
    assert fpn.decoder.dropout.p == 0.25  # FPN: its own decoder dropout, which sits before the head


def test_drop_path_rate_reaches_the_encoder() -> None:
    model = M.create_model("unet_resnet18", num_classes=1, drop_path_rate=0.1)
    assert any(type(m).__name__ == "DropPath" for m in model.encoder.modules())


# ---------------------------------------------------------------------------------------------------- weights




def _encoder_matches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    keys = [k for k in state if not k.startswith("fc.")]
    assert keys and all(torch.equal(own["encoder.model." + k], state[k]) for k in keys)
    return keys


def test_pretrained_encoder_from_the_hf_cache(offline_hub, test_resnet_unet) -> None:
    state = fill_hf_cache(offline_hub)
    torch.manual_seed(0)
    model = M.create_model(test_resnet_unet, num_classes=1, pretrained=True)
    _encoder_matches(model, state)
    torch.manual_seed(0)
    scratch = M.create_model(test_resnet_unet, num_classes=1)
    assert not torch.equal(scratch.state_dict()["encoder.model.conv1.0.weight"], state["conv1.0.weight"])


def test_pretrained_encoder_offline_without_cache_is_one_line(offline_hub, test_resnet_unet) -> None:
    with pytest.raises(ModelError) as e:
        M.create_model(test_resnet_unet, num_classes=1, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("segmentation model unet over encoder test_resnet: cannot load")
    assert f"hf download {HF_HUB_ID} model.safetensors" in msg and "--pretrained FILE" in msg


def test_pretrained_path_takes_the_encoders_classifier_weights(tmp_path, test_resnet_unet, caplog) -> None:
    import timm

    torch.manual_seed(5)
    classifier = timm.create_model("test_resnet", num_classes=2)  # e.g. a fastlesion classification run
    state = classifier.state_dict()
    path = tmp_path / "best.pt"
    torch.save({"model": state, "epoch": 3}, path)
    torch.manual_seed(0)
    fresh = M.create_model(test_resnet_unet, num_classes=1)
    with caplog.at_level(logging.INFO, logger="fastlesion.models"):
        torch.manual_seed(0)
        model = M.create_model(test_resnet_unet, num_classes=1, pretrained_path=str(path))
    _encoder_matches(model, state)
    own, ref = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in own if not k.startswith("encoder."))  # decoder untouched
    assert "classifier parts left out: fc.weight, fc.bias); the decoder keeps its random init" in caplog.text

    info = M.load_pretrained(M.create_model(test_resnet_unet, num_classes=1), str(path))
    assert info["skipped"] and all(k.startswith("fc.") for k in info["skipped"]) and info["unexpected"] == []

    other = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(ModelError, match="does not fit unet_test_resnet"):
        M.create_model(test_resnet_unet, num_classes=1, pretrained_path=str(other))

    partial_file = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial_file)
    with pytest.raises(ModelError, match=r"encoder's tensors are not in the file .*pretrained_strict false"):
        M.create_model(test_resnet_unet, num_classes=1, pretrained_path=str(partial_file))
    M.create_model(test_resnet_unet, num_classes=1, pretrained_path=str(partial_file), pretrained_strict=False)


def test_pretrained_path_takes_a_segmentation_checkpoint(tmp_path, test_resnet_unet) -> None:
    torch.manual_seed(1)
    trained = M.create_model(test_resnet_unet, num_classes=1)
    compiled_like = {"_orig_mod." + k: v for k, v in trained.state_dict().items()}
    path = tmp_path / "seg.pt"
    torch.save({"model": compiled_like}, path)
    model = M.create_model(test_resnet_unet, num_classes=1, pretrained_path=str(path))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())

    two = tmp_path / "two.pt"  # another number of mask channels: the segmentation head is skipped
    torch.save(M.create_model(test_resnet_unet, num_classes=2).state_dict(), two)
    info = M.load_pretrained(M.create_model(test_resnet_unet, num_classes=1), str(two))
    assert sorted(info["skipped"]) == ["segmentation_head.0.bias", "segmentation_head.0.weight"]


# ---------------------------------------------------------------------------------------------------- listing
def test_describe_models_lists_segmentation_models_with_params_and_flops() -> None:
    rows = M.describe_models([TINY, "resnet18"], image_size=64)
    seg, cls = rows
    assert seg["task"] == "segmentation" and seg["family"] == "unet" and cls["task"] == "classification"
    model = M.create_model(TINY, num_classes=1)
    assert seg["params"] == M.count_params(model)  # counted with the one-channel mask head
    assert seg["flops"] == M.count_flops(model, 64) > 0  # the meta-device count equals the real one
    assert [r["name"] for r in M.describe_models(image_size=None, name_filter="unet_mobilenetv3")] == [
        "unet_mobilenetv3_large_100", TINY]
