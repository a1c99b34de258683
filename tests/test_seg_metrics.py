"""Segmentation losses, metrics, overlay plots, flip TTA and mask writing: checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastlesion.config import OptimConfig
from fastlesion.engine.runtime import Runtime
from fastlesion.errors import ConfigError
from fastlesion.metrics import SEG_METRIC_KEYS
from fastlesion.segment.losses import DiceBCELoss, create_seg_loss, per_image_seg_loss, soft_dice_loss
from fastlesion.segment.metrics import concat_stats, mask_stats, per_image_metrics, segmentation_metrics
from fastlesion.segment.plots import outline, overlay, plot_overlays
from fastlesion.segment.predict import mask_filename, predict_mask_logits, tta_logits, write_mask

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, compile_mode=None, channels_last=False)


def _logits(pred: np.ndarray) -> torch.Tensor:
    """Confident logits (+-6) of a 0/1 prediction ``N x H x W``, as ``N x 1 x H x W``."""
    return torch.as_tensor(np.asarray(pred, np.float32) * 12 - 6)[:, None]


def _masks(true: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(true, np.float32))[:, None]


# ---------------------------------------------------------------------------------------------------- metrics
def test_counts_and_metrics_match_hand_values() -> None:
    true = np.zeros((2, 4, 5), np.float32)
    pred = np.zeros((2, 4, 5), np.float32)
    true[0, :2, :] = 1  # image 0: 10 lesion pixels, 6 of them found and 2 false alarms
    pred[0, :1, :] = 1
    pred[0, 1, :1] = 1
    pred[0, 3, 3:] = 1
    true[1, 1:3, 1:4] = 1  # image 1: 6 lesion pixels, 5 found, 1 false alarm
    pred[1, 1:3, 1:4] = 1
    pred[1, 2, 3] = 0
    pred[1, 0, 0] = 1
    stats = mask_stats(_logits(pred), _masks(true))
    assert set(stats) == {"tp", "fp", "fn", "tn"} and all(v.dtype == np.float64 for v in stats.values())
    np.testing.assert_array_equal(stats["tp"], [6, 5])
    np.testing.assert_array_equal(stats["fp"], [2, 1])
    np.testing.assert_array_equal(stats["fn"], [4, 1])
    np.testing.assert_array_equal(stats["tn"], [8, 13])

    m = segmentation_metrics(stats)
    assert set(m) == {*SEG_METRIC_KEYS, "n"} and m["n"] == 2
    dice = [12 / 18, 10 / 12]
    iou = [6 / 12, 5 / 7]
    assert m["dice"] == pytest.approx(np.mean(dice))
    assert m["iou"] == pytest.approx(np.mean(iou))
    assert m["jaccard65"] == pytest.approx((0 + 5 / 7) / 2)  # 0.5 < 0.65 counts 0; 0.714 counts
    assert m["pixel_accuracy"] == pytest.approx((14 / 20 + 18 / 20) / 2)
    assert m["sensitivity"] == pytest.approx((6 / 10 + 5 / 6) / 2)
    assert m["specificity"] == pytest.approx((8 / 10 + 13 / 14) / 2)


def test_counts_agree_with_segmentation_models_pytorch() -> None:
    import segmentation_models_pytorch as smp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 16, 16, generator=g)
    masks = (torch.rand(5, 1, 16, 16, generator=g) > 0.6).float()
    ours = mask_stats(logits, masks)  # smp thresholds what it is given: probabilities
    theirs = smp.metrics.get_stats(torch.sigmoid(logits), masks.long(), mode="binary", threshold=0.5)
    for k, t in zip(("tp", "fp", "fn", "tn"), theirs, strict=True):
        np.testing.assert_array_equal(ours[k], t[:, 0].numpy())
    iou = smp.metrics.iou_score(*theirs, reduction="micro-imagewise")
    assert segmentation_metrics(ours)["iou"] == pytest.approx(float(iou))


def test_jaccard65_threshold_is_inclusive_at_065() -> None:
    # IoU exactly 0.65 (13 of 20), just below (0.6) and above (0.7)
    stats = {"tp": np.array([13.0, 12, 14]), "fp": np.array([7.0, 8, 6]), "fn": np.zeros(3), "tn": np.full(3, 80.0)}
    per = per_image_metrics(stats)
    np.testing.assert_allclose(per["iou"], [0.65, 0.6, 0.7])
    np.testing.assert_allclose(per["jaccard65"], [0.65, 0.0, 0.7])


def test_empty_masks() -> None:
    true = np.zeros((3, 4, 4))
    pred = np.zeros((3, 4, 4))
    pred[1, 0, 0] = 1  # image 1: nothing to find, one false alarm
    true[2] = 1  # image 2: all lesion, all found
    pred[2] = 1
    per = per_image_metrics(mask_stats(_logits(pred), _masks(true)))
    np.testing.assert_array_equal(per["dice"], [1, 0, 1])  # both empty: a perfect score
    np.testing.assert_array_equal(per["iou"], [1, 0, 1])
    np.testing.assert_array_equal(per["jaccard65"], [1, 0, 1])
    np.testing.assert_array_equal(per["pixel_accuracy"], [1, 15 / 16, 1])
    assert np.isnan(per["sensitivity"][:2]).all() and per["sensitivity"][2] == 1  # no lesion: undefined
    np.testing.assert_array_equal(per["specificity"][:2], [1, 15 / 16])
    assert np.isnan(per["specificity"][2])  # no background: undefined
    m = segmentation_metrics(mask_stats(_logits(pred), _masks(true)))
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx((1 + 15 / 16) / 2)  # over defined images
    assert m["dice"] == pytest.approx(2 / 3)

    none = segmentation_metrics(concat_stats([]))
    assert none["n"] == 0 and all(math.isnan(none[k]) for k in SEG_METRIC_KEYS)
    only_empty = segmentation_metrics(mask_stats(_logits(np.zeros((1, 2, 2))), _masks(np.zeros((1, 2, 2)))))
    assert math.isnan(only_empty["sensitivity"]) and only_empty["dice"] == 1.0


def test_threshold_and_shapes() -> None:
    logits = torch.tensor([[[[0.0, 0.5], [-0.5, 3.0]]]])  # probabilities 0.5, 0.62, 0.38, 0.95
    masks = torch.ones_like(logits)
    assert mask_stats(logits, masks)["tp"][0] == 2  # sigmoid(0) = 0.5 is not above 0.5
    assert mask_stats(logits, masks, threshold=0.3)["tp"][0] == 4
    assert mask_stats(logits[:, 0], masks[:, 0])["tp"][0] == 2  # N x H x W works too
    with pytest.raises(ValueError, match="differ in shape"):
        mask_stats(logits, masks[:, :, :1])
    with pytest.raises(ValueError, match="threshold"):
        mask_stats(logits, masks, threshold=1.0)
    a = mask_stats(logits, masks)
    both = concat_stats([a, a])
    assert both["tp"].tolist() == [2, 2] and segmentation_metrics(both)["n"] == 2


# ------------------------------------------------------------------------------------------------------ losses
def test_loss_values_by_hand() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 1.0]]]])
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * masks).sum() + 1) / (p.sum() + masks.sum() + 1)
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    torch.testing.assert_close(soft_dice_loss(logits, masks), dice.reshape(1))
    for kind, w, want in (("dice_bce", 0.3, 0.3 * dice + 0.7 * bce), ("dice", 0.3, dice), ("bce", 0.3, bce)):
        loss = create_seg_loss(OptimConfig(loss=kind, dice_weight=w))
        torch.testing.assert_close(loss(logits, masks), want)
    with pytest.raises(ConfigError, match="not a segmentation loss"):
        create_seg_loss(OptimConfig(loss="ce"))


def test_dice_is_the_mean_of_per_image_dice_equal_to_smp_on_lesion_images() -> None:
    import segmentation_models_pytorch as smp

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    masks = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    ours = DiceBCELoss(dice_weight=1.0)(logits, masks)
    # smp 0.6 scores (I + s) / (I + (fp + fn) / 2 + s): its smooth 0.5 is our 1 in 2 I / (sum p + sum m)
    smp_dice = smp.losses.DiceLoss(mode="binary", from_logits=True, smooth=0.5)
    theirs = torch.stack([smp_dice(logits[i:i + 1], masks[i:i + 1]) for i in range(3)]).mean()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(per_image_seg_loss(logits, masks, 0.5).mean(), DiceBCELoss(0.5)(logits, masks))


def test_an_empty_mask_still_penalises_false_positives() -> None:
    masks = torch.zeros(1, 1, 4, 4)
    dice = DiceBCELoss(dice_weight=1.0)
    worse, better = dice(torch.full_like(masks, 2.0), masks), dice(torch.full_like(masks, -4.0), masks)
    assert 0 < better < worse < 1
    p = torch.sigmoid(torch.tensor(2.0)) * 16
    torch.testing.assert_close(worse, p / (p + 1))


def test_loss_is_float32_under_bf16_autocast() -> None:
    logits = torch.randn(2, 1, 8, 8).bfloat16().requires_grad_()
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceBCELoss(0.5)(logits, masks)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_loss_decreases_on_a_toy_problem() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    masks = (x[:, :1] > 0.5).float()  # lesion where the red channel is bright
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))
    loss_fn = create_seg_loss(OptimConfig(loss="dice_bce"))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        loss = loss_fn(net(x), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert segmentation_metrics(mask_stats(net(x), masks))["dice"] > 0.8


# --------------------------------------------------------------------------------------------------------- TTA
class _Ramp(nn.Module):
    """Not flip-invariant: the red channel plus a ramp along the width and another along the height."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ramp = torch.linspace(-2, 2, w).view(1, 1, 1, w) + torch.linspace(0, 1, h).view(1, 1, h, 1)
        return x[:, :1] * 3 + ramp


def test_tta_flips_each_prediction_back() -> None:
    model = _Ramp()
    x = torch.randn(2, 3, 6, 8)
    probs = [torch.sigmoid(model(x)), torch.sigmoid(model(x.flip(3))).flip(3), torch.sigmoid(model(x.flip(2))).flip(2)]
    want = torch.logit(sum(probs) / 3)
    got = tta_logits(model, x, CPU)
    assert got.dtype == torch.float32 and got.shape == (2, 1, 6, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unflipped = torch.logit((torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(3)))
                             + torch.sigmoid(model(x.flip(2)))) / 3)
    assert (got - unflipped).abs().max() > 0.1  # the test would notice outputs left flipped
    torch.testing.assert_close(predict_mask_logits(model, x, CPU, tta=True), got)
    torch.testing.assert_close(predict_mask_logits(model, x, CPU), model(x))


def test_tta_of_a_pointwise_model_is_the_plain_prediction() -> None:
    conv = nn.Conv2d(3, 1, 1)  # flip-equivariant: every view, flipped back, is the same
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tta_logits(conv, x, CPU), conv(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- mask writing
def test_write_mask_at_the_original_size(tmp_path) -> None:
    assert mask_filename("data/ISIC_0000001.jpg") == "ISIC_0000001_segmentation.png"
    logits = torch.full((1, 8, 8), -8.0)
    logits[:, :, :4] = 8.0  # the left half is lesion
    out = write_mask(logits, (16, 4), tmp_path / "masks" / mask_filename("ISIC_0000001.jpg"))
    assert out == tmp_path / "masks" / "ISIC_0000001_segmentation.png"
    img = Image.open(out)
    assert img.mode == "L" and img.size == (16, 4)
    arr = np.asarray(img)
    assert set(np.unique(arr)) == {0, 255}
    assert (arr[:, :8] == 255).all() and (arr[:, 8:] == 0).all()  # bilinear on probabilities, then 0.5

    probs = torch.zeros(8, 8)
    probs[2:6, 2:6] = 1.0
    arr = np.asarray(Image.open(write_mask(probs, (8, 8), tmp_path / "p.png", from_logits=False)))
    assert (arr == probs.numpy() * 255).all()  # same size: no resampling
    arr = np.asarray(Image.open(write_mask(probs[None], (5, 3), tmp_path / "q.png", from_logits=False)))
    assert arr.shape == (3, 5)
    with pytest.raises(ValueError, match="1 x H x W or H x W"):
        write_mask(torch.zeros(2, 4, 4), (4, 4), tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------------- plots
def test_outline_of_a_square_is_its_border() -> None:
    m = np.zeros((6, 6), bool)
    m[1:5, 1:5] = True
    ring = m.copy()
    ring[2:4, 2:4] = False
    np.testing.assert_array_equal(outline(m), ring)
    assert not outline(np.zeros((3, 3), bool)).any()


def test_overlay_colors_truth_green_and_prediction_magenta() -> None:
    img = np.full((8, 8, 3), 100, np.uint8)
    true = np.zeros((8, 8), bool)
    true[0:4, 0:4] = True
    pred = np.zeros((1, 8, 8), np.float32)
    pred[0, 5:8, 5:8] = 0.9  # probabilities work as predictions
    out = overlay(img, true, pred)
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[3, 3]) == (0, 255, 0)
    assert tuple(out[7, 7]) == (255, 0, 255) and tuple(out[2, 6]) == (100, 100, 100)
    assert tuple(img[0, 0]) == (100, 100, 100)  # the input is not drawn on


def test_plot_overlays_writes_a_png(tmp_path) -> None:
    g = np.random.default_rng(0)
    images = g.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    preds = np.roll(masks, 3, axis=2).astype(np.float32)
    out = plot_overlays(images, masks, preds, tmp_path / "plots" / "overlays.png", titles=["a", "b", "c"])
    assert out.is_file() and Image.open(out).format == "PNG"
    assert plot_overlays(images, masks, preds, tmp_path / "two.png", max_images=2).is_file()
    with pytest.raises(ValueError, match="as many masks"):
        plot_overlays(images, masks[:1], preds, tmp_path / "bad.png")
