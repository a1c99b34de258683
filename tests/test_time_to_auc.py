"""benchmarks/time_to_auc.py: a run stops at the epoch that reaches the target AUC, one that never does says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import read_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks/ package lives at the repo root

from benchmarks import time_to_auc  # noqa: E402

TINY = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--set", "optim.warmup_epochs=0"]
ROW_KEYS = {"config", "loader", "model", "amp", "compile", "channels_last", "seed", "target_auc", "reached",
            "seconds_to_target", "epochs_to_target", "train_seconds_to_target", "best_auc", "epochs_run",
            "images_per_s", "val_auc_per_epoch", "speedup_vs_baseline", "status", "fingerprint", "settings"}






def test_low_target_stops_at_the_epoch_that_reaches_it(tiny_isic, tmp_path, capsys, one_thread):
    out = tmp_path / "tta.jsonl"
    argv = ["--data", str(tiny_isic), "--dataset", "isic2020", *TINY, "--target-auc", "0.55", "--max-epochs", "4",
            "--configs", "torch:lenet:off:off:off,torch:lenet:bf16:off:on", "--out", str(out)]
    assert time_to_auc.main(argv) == 0
    rows = read_rows(out)
    assert [r["config"] for r in rows] == ["torch:lenet:off:off:off", "torch:lenet:bf16:off:on"]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["status"] == "ok" and r["loader"] == "torch" and r["reached"]
        # stopped at the first epoch at or above the target: no epoch after it, none before it reached it
        assert r["epochs_run"] == r["epochs_to_target"] == len(r["val_auc_per_epoch"])
        assert r["val_auc_per_epoch"][-1] >= 0.55 and all(a < 0.55 for a in r["val_auc_per_epoch"][:-1])
        assert 0 < r["train_seconds_to_target"] <= r["seconds_to_target"] and r["images_per_s"] > 0
    assert (rows[0]["amp"], rows[0]["channels_last"], rows[1]["amp"], rows[1]["channels_last"]) == \
        ("off", False, "bf16", True)
    assert rows[0]["speedup_vs_baseline"] == 1.0
    assert rows[1]["speedup_vs_baseline"] == pytest.approx(rows[0]["seconds_to_target"]
                                                           / rows[1]["seconds_to_target"], rel=0.01)
    summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("time to AUC 0.55")]
    assert len(summary) == 2 and summary[0].endswith("baseline") and "x baseline" in summary[1]


def test_impossible_target_is_not_reached(tiny_isic, tmp_path, capsys, one_thread):
    out = tmp_path / "tta.jsonl"
    # a learning rate of 1e-9 leaves the random initial weights: AUC 1.0 on the validation fold is out of reach
    argv = ["--data", str(tiny_isic), *TINY, "--set", "optim.lr=1e-9", "--target-auc", "1.0", "--max-epochs", "2",
            "--configs", "torch:lenet:off:off", "--no-warmup", "--out", str(out)]
    assert time_to_auc.main(argv) == 0
    (r,) = read_rows(out)
    assert r["status"] == "ok" and not r["reached"] and r["epochs_run"] == 2 and r["best_auc"] < 1.0
    assert r["seconds_to_target"] is None and r["epochs_to_target"] is None and r["speedup_vs_baseline"] is None
    assert len(r["elapsed_s_per_epoch"]) == 2 and 0 < r["elapsed_s_per_epoch"][0] < r["elapsed_s_per_epoch"][1]
    assert "not reached in 1 run(s)" in capsys.readouterr().out


@pytest.mark.parametrize("spec, msg", [("torch:lenet:off", "is not LOADER:MODEL"),
                                       ("jax:lenet:off:off", "loader 'jax'"),
                                       ("torch:lenet:fp8:off", "AMP 'fp8'"),
                                       ("torch:no_such_net:off:off", "no_such_net"),
                                       ("torch:unet_resnet34:off:off", "segmentation model")])
def test_bad_configuration_is_one_error_line(spec, msg, tmp_path, capsys):
    assert time_to_auc.main(["--target-auc", "0.8", "--configs", spec, "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --configs") and msg in err[0]
    assert not (tmp_path / "x.jsonl").exists()
