"""``fastlesion prune``: structured (torch-pruning) and unstructured pruning, the pruned checkpoint loaded by
eval / predict, and the summary's before / after facts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import train_tiny

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.train import train
from fastlesion.errors import FastlesionError
from fastlesion.prune import prune_run

KEYS = ("params", "flops", "file_size", "cpu_latency_ms")


def _train(root: Path, out: Path, model: str) -> Path:
    """One short epoch (2 steps) of ``model`` at 32 px on the tiny ISIC set; returns the run folder."""
    return train_tiny(root, out, model=model, **{"train.steps_per_epoch": 2}).parent


@pytest.fixture(scope="module")
def runs(tiny_isic, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("prune_runs")
    return {m: _train(tiny_isic, base / m, m) for m in ("resnet18", "lenet")}


def test_structured_resnet18_really_shrinks_and_loads(runs, tiny_isic, tmp_path, capsys):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "pruned"
    assert main(["prune", str(runs["resnet18"]), "--amount", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "params" in printed and "val AUC" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "structured" and s["amount"] == 0.5
    for k in KEYS:
        assert s[f"{k}_before"] > 0 and s[f"{k}_after"] > 0, k
    assert s["params_after"] < 0.5 * s["params_before"]  # channels halved: about a quarter of the weights left
    assert s["flops_after"] < 0.5 * s["flops_before"]
    assert s["file_size_after"] < 0.5 * s["file_size_before"]
    assert 0.0 <= s["val_auc_before"] <= 1.0 and 0.0 <= s["val_auc_after"] <= 1.0
    state = ckpt.load(out / "best.pt")  # weights_only=True
    assert state["pruned_structure"] and state["model_name"] == "resnet18"
    # eval and predict take the pruned checkpoint like any other
    assert main(["eval", str(out / "best.pt"), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["auc"] == pytest.approx(s["val_auc_after"])
    sub = tmp_path / "sub.csv"
    assert main(["predict", str(out / "best.pt"), "--data", str(tiny_isic), "--out", str(sub)]) == 0
    assert len(pd.read_csv(sub)) > 0


def test_unstructured_lenet_with_finetune(runs, tmp_path):
    out = tmp_path / "unstructured"
    s = prune_run(runs["lenet"], out, amount=0.6, method="unstructured", finetune_epochs=1)
    assert s["params_after"] == s["params_before"] and s["flops_after"] == s["flops_before"]
    assert s["sparsity_before"] < 0.05 and s["sparsity_after"] > 0.5  # masks kept while fine-tuning
    assert 0.0 <= s["val_auc_after_finetune"] <= 1.0 and len(s["finetune_rows"]) == 1
    state = ckpt.load(out / "best.pt")
    assert "pruned_structure" not in state  # same shapes: a plain checkpoint
    assert not any(k.endswith(("_orig", "_mask")) for k in state["model"])
    body = [v for k, v in state["model"].items() if k.endswith(".weight") and not k.startswith("fc3")]
    assert sum(int((w == 0).sum()) for w in body) / sum(w.numel() for w in body) == pytest.approx(0.6, abs=0.02)


def test_structured_finetune_reuses_engine(runs, tmp_path):
    pytest.importorskip("torch_pruning")
    s = prune_run(runs["resnet18"], tmp_path / "ft", amount=0.3, finetune_epochs=1, finetune_lr=1e-3)
    assert s["finetune_lr"] == 1e-3 and "val_auc_after_finetune" in s
    from fastlesion.export import cpu_model

    model, _, _ = cpu_model(tmp_path / "ft" / "best.pt")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_structured_without_torch_pruning_is_one_error_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    assert main(["prune", str(runs["lenet"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install torch-pruning" in err[0]


def test_bad_arguments(runs, tmp_path):
    with pytest.raises(FastlesionError, match="amount"):
        prune_run(runs["lenet"], tmp_path / "a", amount=1.5, method="unstructured")
    with pytest.raises(FastlesionError, match="run folder itself"):
        prune_run(runs["lenet"], runs["lenet"], amount=0.5, method="unstructured")
    with pytest.raises(FastlesionError, match="no checkpoint"):
        prune_run(tmp_path / "nothing", tmp_path / "b", method="unstructured")


def test_structured_checkpoint_starts_a_new_run(runs, tiny_isic, tmp_path):
    """``train --pretrained DIR/best.pt`` keeps the pruned (smaller) network, and its own checkpoints rebuild it."""
    pytest.importorskip("torch_pruning")
    from fastlesion.models import count_params

    pruned = tmp_path / "pruned"
    prune_run(runs["resnet18"], amount=0.5, method="structured", out=pruned)
    summary = json.loads((pruned / "summary.json").read_text())
    out = tmp_path / "again"
    cfg = load_config(None, {
        "data.dataset": "isic2020", "data.root": str(tiny_isic), "data.image_size": 32, "model.name": "resnet18",
        "model.pretrained_path": str(pruned / "best.pt"), "loader.backend": "torch", "loader.workers": 0,
        "loader.batch_size": 16, "train.epochs": 1, "train.steps_per_epoch": 2, "run.out": str(out),
        "run.quiet": True, "data.folds_file": str(tmp_path / "folds.csv")})
    assert train(cfg)["params"] == summary["params_after"]
    state = ckpt.load(out / "best.pt")
    assert state["pruned_structure"]
    from fastlesion.engine.inference import inference_runtime, load_checkpoint_model

    model, _, _ = load_checkpoint_model(out / "best.pt", inference_runtime(cfg))
    assert count_params(model) == summary["params_after"]
    # and such a run resumes: last.pt's weights go into the pruned network, not into create_model's
    resumed = train(load_config(out / "config.yaml", {"train.epochs": 2}), resume=out)
    assert resumed["epochs_run"] == 2 and resumed["params"] == summary["params_after"]
