"""Training engine on CPU: learning, run folder, DDP (gloo), resume after a kill, compile, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.train import METRIC_COLUMNS, train
from fastlesion.errors import FastlesionError

RUN_FILES = ("config.yaml", "metrics.csv", "best.pt", "last.pt", "predictions_val.csv", "summary.json",
             "plots/curves.png", "plots/roc.png", "plots/confusion.png")


def tiny_cfg(root: Path, out: Path, **over):
    base = {"data.dataset": "isic2020", "data.root": str(root), "data.image_size": 32, "model.name": "lenet",
            "loader.backend": "torch", "loader.workers": 0, "loader.batch_size": 16, "train.epochs": 2,
            "optim.lr": 3e-3, "optim.warmup_epochs": 0.0, "run.out": str(out), "run.quiet": True,
            "data.folds_file": str(out.parent / f"{out.name}-folds.csv")}
    base.update(over)
    return load_config(None, base)


@pytest.fixture(scope="session")
def learn_set(tmp_path_factory) -> Path:
    """400 ISIC-like images, 25 % malignant: enough signal for a LeNet to beat chance in a few epochs."""
    from fastlesion.data.synthetic import generate

    return generate("isic2020", tmp_path_factory.mktemp("learn"), n=400, seed=7, size=96, positive_rate=0.25,
                    workers=2)


def test_small_model_learns(learn_set, tmp_path):
    # Measured (2-core CPU, torch 2.14): this run reaches val AUC 0.732 with train.seed 42 (the default used here),
    # and 0.867 / 0.746 / 0.829 with seeds 1 / 2 / 3; with the plain loss instead of weighted_ce the AUCs were
    # 0.64-0.70, too close to a threshold. 0.65 sits below every measured run yet far above chance (0.5), so a
    # failure means the pipeline stopped learning, not noise.
    cfg = tiny_cfg(learn_set, tmp_path / "run", **{"train.epochs": 8, "data.image_size": 64, "optim.lr": 2e-3,
                                                   "loader.batch_size": 32, "train.patience": 0,
                                                   "optim.loss": "weighted_ce"})
    summary = train(cfg)
    for f in RUN_FILES:
        assert (tmp_path / "run" / f).is_file(), f
    assert summary["val_auc"] > 0.65, summary
    assert summary["epochs_run"] == 8 and summary["model"] == "lenet" and summary["params"] > 0
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(m.columns) == METRIC_COLUMNS and len(m) == 8
    best = ckpt.load(tmp_path / "run" / "best.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in best["model"])
    assert summary["best_epoch"] == int(m.loc[m["val_auc"].idxmax(), "epoch"])


def test_ddp_two_workers_gloo(tiny_isic, tmp_path):
    cfg = tiny_cfg(tiny_isic, tmp_path / "ddp", **{"train.ddp": 2})
    summary = train(cfg)
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    for f in RUN_FILES:  # the same files as a single-process run, plots included
        assert (tmp_path / "ddp" / f).is_file(), f
    preds = pd.read_csv(tmp_path / "ddp" / "predictions_val.csv")
    assert preds["path"].is_unique and len(preds) == summary["n_val"]  # whole val set, gathered, once each


def test_resume_after_kill(tiny_isic, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fastlesion.cli", "train", "--data", str(tiny_isic), "--dataset", "isic2020",
            "--model", "lenet", "--epochs", "4", "--out", str(out), "--quiet", "--backend", "torch",
            "--workers", "0", "--image-size", "32", "--batch-size", "8",
            "--data.folds_file", str(tmp_path / "folds.csv"), "--train.patience", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ckpt.load(out / "last.pt")["epoch"]
    assert 1 <= done < 4, "the run should have been killed mid-training"
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    m = pd.read_csv(out / "metrics.csv")
    assert m["epoch"].tolist() == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 4


def test_compiled_matches_eager_and_checkpoint_loads_eager(tiny_isic, tmp_path):
    from fastlesion.models import create_model

    torch.manual_seed(0)
    eager = create_model("lenet", num_classes=2)
    compiled = torch.compile(eager)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loss_e = torch.nn.functional.cross_entropy(eager(x), y)
    loss_c = torch.nn.functional.cross_entropy(compiled(x), y)
    assert torch.allclose(loss_e, loss_c, rtol=1e-4, atol=1e-5)

    cfg = tiny_cfg(tiny_isic, tmp_path / "compiled", **{"train.compile": "on", "train.epochs": 1})
    train(cfg)
    state = ckpt.load(tmp_path / "compiled" / "best.pt")
    assert not any("_orig_mod" in k for k in state["model"])
    fresh = create_model("lenet", num_classes=2)
    fresh.load_state_dict(state["model"])  # strict: a compiled run's checkpoint fits an eager model


def test_eval_and_predict_cli(tiny_isic, tmp_path, capsys):
    train(tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1}))
    assert main(["eval", str(tmp_path / "r" / "best.pt"), "--tta"]) == 0
    assert "auc" in capsys.readouterr().out
    assert (tmp_path / "r" / "eval_val" / "metrics.json").is_file()
    sub = tmp_path / "submission.csv"
    assert main(["predict", str(tmp_path / "r" / "best.pt"), "--data", str(tiny_isic), "--out", str(sub)]) == 0
    df = pd.read_csv(sub)
    test = pd.read_csv(tiny_isic / "test.csv")
    assert list(df.columns) == ["image_name", "target"] and sorted(df["image_name"]) == sorted(test["image_name"])
    assert df["target"].between(0, 1).all()


def test_compare_runs_cli(tiny_isic, tmp_path, capsys):
    for name in ("a", "b"):
        train(tiny_cfg(tiny_isic, tmp_path / name, **{"train.epochs": 1}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    for f in ("comparison.csv", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / f).is_file()


def test_folds_all(tiny_isic, tmp_path):
    from fastlesion.engine.folds import train_folds

    res = train_folds(tiny_cfg(tiny_isic, tmp_path / "cv", **{"train.epochs": 1, "data.num_folds": 3}))
    assert len(res["fold_val_auc"]) == 3 and math.isfinite(res["oof_auc"])
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert oof["path"].is_unique and len(oof) == 80  # every image predicted once, by the fold that did not see it


# --------------------------------------------------------------------------------------------------- bad input
def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_unknown_model_suggests(tiny_isic, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_isic), "--model", "resnt18", "--out", str(tmp_path / "x")]) == 2
    assert "resnet18" in _err(capsys)


def test_refuses_other_run_folder(tiny_isic, tmp_path, capsys):
    train(tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1}))
    cfg = tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1})
    with pytest.raises(FastlesionError, match="already holds a run"):
        train(cfg)
    train(tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1, "run.overwrite": True}))


def test_checkpoint_class_mismatch(tiny_isic, tiny_ham, tmp_path, capsys):
    train(tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1}))
    assert main(["eval", str(tmp_path / "r" / "best.pt"), "--data", str(tiny_ham), "--dataset", "ham10000",
                 "--data.folds_file", str(tmp_path / "hamfolds.csv")]) == 2
    assert "classes" in _err(capsys)


def test_nan_loss_stops_and_keeps_last_good(tiny_isic, tmp_path, monkeypatch):
    import fastlesion.engine.train as train_mod

    class NanAfter(torch.nn.Module):
        """Cross-entropy that turns NaN on its 8th call: epoch 2, step 4 (4 steps per epoch)."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, logits, y):
            self.calls += 1
            loss = torch.nn.functional.cross_entropy(logits, y)
            return loss * float("nan") if self.calls >= 8 else loss

    monkeypatch.setattr(train_mod, "create_loss", lambda *a, **k: NanAfter())
    cfg = tiny_cfg(tiny_isic, tmp_path / "nan", **{"train.epochs": 3, "train.patience": 0,
                                                   "loader.batch_size": 8, "train.steps_per_epoch": 4})
    with pytest.raises(FastlesionError, match=r"loss is nan at epoch 2 step 4"):
        train(cfg)
    state = ckpt.load(tmp_path / "nan" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ddp_more_than_gpus(monkeypatch):
    from fastlesion import dist

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FastlesionError, match="--ddp 4 asks for 4 GPUs but 1 .*use --ddp 1 "):
        dist.check_world(4, "cuda")


def test_config_yaml_written_and_resolved(tiny_isic, tmp_path):
    train(tiny_cfg(tiny_isic, tmp_path / "r", **{"train.epochs": 1}))
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["run"]["out"] == str(tmp_path / "r") and saved["model"]["name"] == "lenet"
    assert os.path.isfile(saved["data"]["folds_file"])


def test_ddp_more_than_cpu_cores_and_negative_are_clear_errors(tiny_isic, tmp_path, capsys):
    from fastlesion import dist

    cores = len(os.sched_getaffinity(0))
    with pytest.raises(FastlesionError, match=f"--ddp {cores + 1} asks for {cores + 1} CPU workers"):
        dist.check_world(cores + 1, "cpu")
    args = ["train", "--data", str(tiny_isic), "--model", "lenet", "--out", str(tmp_path / "x")]
    if not torch.cuda.is_available():  # through the CLI: one line, exit 2, no folder made
        assert main([*args, "--ddp", str(cores + 1)]) == 2
        assert "CPU workers" in _err(capsys) and not (tmp_path / "x").exists()
    assert main([*args, "--ddp", "-1"]) == 2
    assert "train.ddp must be >= 0" in _err(capsys)


def test_failed_resume_leaves_the_run_intact(tiny_isic, tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny_cfg(tiny_isic, out, **{"train.epochs": 1}))
    saved = (out / "config.yaml").read_text()
    for flag, value in (("--model", "resnet18"), ("--optim.name", "sgd")):
        assert main(["train", "--resume", str(out), flag, value]) == 2
        err = _err(capsys)
        assert "a resumed run keeps its settings" in err and flag.lstrip("-").replace("model", "model.name") in err
        assert (out / "config.yaml").read_text() == saved  # unchanged: a plain --resume still works
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert len(pd.read_csv(out / "metrics.csv")) == 2


def test_out_is_a_file(tiny_isic, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--data", str(tiny_isic), "--model", "lenet", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a run folder" in _err(capsys)


def test_early_stop_metric_checked_up_front_and_loss_minimised(tiny_isic, tmp_path):
    from fastlesion.engine.train import early_stop_mode
    from fastlesion.errors import ConfigError

    with pytest.raises(ConfigError, match="train.early_stop_metric: 'val_foo'"):
        tiny_cfg(tiny_isic, tmp_path / "x", **{"train.early_stop_metric": "val_foo"})
    assert not (tmp_path / "x").exists()
    assert early_stop_mode(tiny_cfg(tiny_isic, tmp_path / "y", **{"train.early_stop_metric": "val_loss"})) == "min"
    assert early_stop_mode(tiny_cfg(tiny_isic, tmp_path / "y")) == "max"
    summary = train(tiny_cfg(tiny_isic, tmp_path / "loss", **{"train.epochs": 2, "train.early_stop_metric": "val_loss",
                                                              "train.patience": 0}))
    m = pd.read_csv(tmp_path / "loss" / "metrics.csv")
    assert summary["best_epoch"] == int(m.loc[m["val_loss"].idxmin(), "epoch"])


def test_nan_validation_loss_stops_before_saving(tiny_isic, tmp_path, monkeypatch):
    import fastlesion.engine.tasks as tasks_mod

    real = tasks_mod.evaluate

    def diverged(*a, **k):
        res = real(*a, **k)
        res.loss = float("nan")
        return res

    monkeypatch.setattr(tasks_mod, "evaluate", diverged)
    with pytest.raises(FastlesionError, match="validation loss is nan at epoch 1.*no checkpoint was written"):
        train(tiny_cfg(tiny_isic, tmp_path / "nan", **{"train.epochs": 2}))
    assert not (tmp_path / "nan" / "best.pt").exists() and not (tmp_path / "nan" / "last.pt").exists()


def test_ddp_worker_crash_stops_the_run_without_hang(tiny_isic, tmp_path):
    import shutil

    data = tmp_path / "isic"
    shutil.copytree(tiny_isic, data)
    bad = sorted((data / "train").glob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: whichever rank reads it fails
    args = [sys.executable, "-m", "fastlesion.cli", "train", "--data", str(data), "--dataset", "isic2020",
            "--model", "lenet", "--epochs", "1", "--image-size", "32", "--backend", "torch", "--workers", "0",
            "--batch-size", "8", "--ddp", "2", "--quiet", "--out", str(tmp_path / "run")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and bad.stem in proc.stderr and "Traceback" not in proc.stderr
