"""The benchmarks with a segmentation model (issue 13, item 6): train_throughput and end_to_end on CPU, tiny."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import read_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks/ package lives at the repo root

from benchmarks import common, end_to_end, train_throughput  # noqa: E402

SEG_MODEL = "unet_mobilenetv3_small_050"  # the registry's tiny U-Net (0.55M parameters)






def test_model_task_and_synthetic_seg_batch():
    assert common.model_task(SEG_MODEL) == "segmentation" and common.model_task("lenet") == "classification"
    assert common.model_task("no_such_model") == "classification"  # left to fail in its own row
    x, m = common.synthetic_batch(3, 64, 2, torch.device("cpu"), channels_last=True, task="segmentation")
    assert x.shape == (3, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    assert m.shape == (3, 1, 64, 64) and m.dtype == torch.float32 and m.is_contiguous()
    assert set(m.unique().tolist()) == {0.0, 1.0}
    cover = m.mean(dim=(1, 2, 3))
    assert ((cover > 0.02) & (cover < 0.6)).all(), cover  # a lesion-sized blob in every image
    x2, m2 = common.synthetic_batch(3, 64, 2, torch.device("cpu"), channels_last=True, task="segmentation")
    assert torch.equal(m, m2) and torch.equal(x, x2)  # fixed (seeded)
    _, y = common.synthetic_batch(3, 64, 2, torch.device("cpu"), channels_last=False)
    assert y.dtype == torch.int64 and y.shape == (3,)  # classification unchanged


def test_build_training_of_a_seg_model_uses_the_training_loss():
    from fastlesion.config import OptimConfig
    from fastlesion.segment.losses import create_seg_loss

    rt = common.make_runtime(torch.device("cpu"), False, "fp32", False)
    s = common.build_training(SEG_MODEL, 2, rt)
    assert s.task == "segmentation"
    assert type(s.loss_fn) is type(create_seg_loss(OptimConfig(loss=common.SEG_LOSS)))
    x, m = common.synthetic_batch(2, 64, 2, rt.device, False, task="segmentation")
    out = s.model(x)
    assert out.shape == (2, 1, 64, 64)  # one mask-logit channel whatever num_classes says
    assert torch.isfinite(s.loss_fn(out, m))
    assert common.build_training("lenet", 2, rt).task == "classification"


def test_train_throughput_seg_model_rows(tmp_path, one_thread):
    out = tmp_path / "train.jsonl"
    rows = train_throughput.run(["--quick", "--models", f"{SEG_MODEL},lenet", "--image-sizes", "64", "--modes",
                                 "eager-fp32-nchw,eager-fp32-cl", "--steps", "2", "--repeats", "1", "--out", str(out)])
    written = read_rows(out)
    assert len(rows) == len(written) == 4
    by = {(r["model"], r["mode"]): r for r in written}
    for mode in ("eager-fp32-nchw", "eager-fp32-cl"):
        seg, cls = by[(SEG_MODEL, mode)], by[("lenet", mode)]
        assert seg["status"] == "ok", seg["error"]
        assert seg["task"] == "segmentation" and cls["task"] == "classification"
        assert seg["images_per_s"] > 0 and seg["image_size"] == 64 and seg["batch_size"] == 4
        assert seg["loss_finite"] is True
        assert set(common.REQUIRED_KEYS) <= set(seg)
    assert by[(SEG_MODEL, "eager-fp32-nchw")]["params"] < 1_000_000


def test_train_throughput_seg_size_not_a_multiple_of_32_is_one_error(capsys):
    assert train_throughput.main(["--quick", "--models", f"lenet,{SEG_MODEL}", "--image-sizes", "64,48"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image-sizes 48") and SEG_MODEL in err and err.count("\n") == 1


def test_end_to_end_seg_quick_rows_feed_masks(tmp_path, one_thread, monkeypatch):
    """The default model of --task segmentation on a generated isic2018-seg set; the loader feeds float masks."""
    from fastlesion.data.loader import dali_available

    seen: list[tuple] = []
    real_step = end_to_end.train_step

    def spy(model, batch, *args, **kwargs):
        seen.append((tuple(batch[1].shape), batch[1].dtype))
        return real_step(model, batch, *args, **kwargs)

    monkeypatch.setattr(end_to_end, "train_step", spy)
    out = tmp_path / "e2e.jsonl"
    backends = ["torch"] + (["dali-cpu"] if dali_available() else [])
    rows = end_to_end.run(["--quick", "--task", "segmentation", "--backends", ",".join(backends), "--out", str(out)])
    written = read_rows(out)
    assert len(rows) == len(written) == len(backends)
    for r, backend in zip(written, backends):
        assert r["status"] == "ok", r["error"]
        assert r["model"] == SEG_MODEL and r["task"] == "segmentation" and r["backend"] == backend
        assert r["images_per_s"] > 0 and r["synthetic_images_per_s"] > 0 and r["num_images"] == 32
        assert "isic2018-seg" in r["dataset_root"]
    assert seen and all(shape == (8, 1, 64, 64) and dtype == torch.float32 for shape, dtype in seen), seen[:3]


def test_end_to_end_task_follows_the_model_and_mismatches_fail(capsys):
    args = end_to_end.parse_args(["--model", SEG_MODEL])
    assert args.task == "segmentation"
    args = end_to_end.parse_args(["--task", "segmentation"])
    assert args.model == "unet_resnet34"  # the segmentation default
    assert end_to_end.parse_args([]).task == "classification"

    assert end_to_end.main(["--quick", "--task", "segmentation", "--model", "lenet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task segmentation") and "lenet" in err and err.count("\n") == 1
    assert end_to_end.main(["--quick", "--model", SEG_MODEL, "--image-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 48" in err and "multiples of 32" in err and err.count("\n") == 1


def test_end_to_end_data_of_the_other_task_is_one_error(tmp_path, tiny_isic, capsys):
    from fastlesion.data.synthetic import generate

    seg_root = generate("isic2018-seg", tmp_path / "seg", n=8, seed=0, size=64)
    assert end_to_end.main(["--quick", "--model", "lenet", "--data", str(seg_root), "--backends", "torch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "masks" in err and err.count("\n") == 1
    assert end_to_end.main(["--quick", "--task", "segmentation", "--data", str(tiny_isic), "--backends",
                            "torch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mask" in err and err.count("\n") == 1
