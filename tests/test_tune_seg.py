"""Ray Tune search on a segmentation base config (issue 13, item 6): the followed metric is val_iou.

Classification keeps its names (val_auc, val_auc_finite, best_val_auc, val_auc.png): a contract for users' scripts.
Most checks run without Ray (a fake experiment analysis); one tiny real search at the end mirrors
tests/test_tune.py::test_asha_search_cpu at minimal size.
"""

from __future__ import annotations

import importlib.util
import io
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from fastlesion import tune as ft
from fastlesion.config import load_config, to_dict
from fastlesion.errors import ConfigError
from fastlesion.tune import results

ROOT = Path(__file__).resolve().parents[1]
ASHA = ROOT / "tune" / "asha.py"
SEG_MODEL = "unet_mobilenetv3_small_050"


def seg_base(**kw):
    return load_config(None, {"train.task": "segmentation", **kw})


def load_asha():
    spec = importlib.util.spec_from_file_location("asha_script", ASHA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def quiet_console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200, highlight=False)


# --------------------------------------------------------------------------------------------------- the metric
def test_tune_metric_follows_the_task():
    cls, seg = load_config(None), seg_base()
    assert ft.tune_metric(cls) == "val_auc" and ft.tune_metric(seg) == "val_iou"
    assert ft.tune_metric(to_dict(seg)) == "val_iou" and ft.tune_metric(to_dict(cls)) == "val_auc"
    assert ft.tune_metric({"train": {"epochs": 3}}) == "val_auc"  # a setup written before train.task existed
    assert ft.tune_metric("segmentation") == "val_iou"
    with pytest.raises(ConfigError, match="detection"):
        ft.tune_metric("detection")
    assert ft.score_key("val_iou") == "val_iou_finite" and ft.TUNE_METRIC == ft.score_key("val_auc")
    assert ft.result_files("val_iou")["plot"] == "val_iou.png" and ft.RESULT_FILES["plot"] == "val_auc.png"
    assert ft.metric_label("val_iou") == "validation IoU"
    assert ft.finite_metric(float("nan")) == 0.0 and ft.finite_metric(0.4) == 0.4 and ft.finite_auc is ft.finite_metric
    # the segmentation metric is one the run writes (and early stops on by default)
    from fastlesion.metrics import SEG_VAL_METRICS

    assert ft.tune_metric(seg) in SEG_VAL_METRICS and seg.train.early_stop_metric == ft.tune_metric(seg)


# --------------------------------------------------------------------------------------------------- the space
def test_default_spaces_are_valid_for_their_task():
    seg, cls = seg_base(), load_config(None)
    ft.check_space(ft.load_space(task="segmentation"), seg)
    ft.check_space(ft.load_space(), cls)
    assert ft.load_space(ROOT / "tune" / "space_seg.yaml") == ft.load_space(task="segmentation")
    assert ft.load_space(ROOT / "tune" / "space.yaml") == ft.load_space(task="classification")
    seg_space = ft.default_space("segmentation")
    assert set(seg_space["optim.loss"]["choice"]) == {"dice_bce", "dice", "bce"}
    assert "optim.label_smoothing" not in seg_space
    from fastlesion.models import model_task

    assert all(model_task(m) == "segmentation" for m in seg_space["model.name"]["choice"])
    assert all(s % 32 == 0 for s in seg_space["data.image_size"]["choice"])


@pytest.mark.parametrize("space, needle", [
    ({"optim.label_smoothing": {"uniform": [0.0, 0.2]}}, "optim.label_smoothing has no effect on a segmentation"),
    ({"optim.focal_gamma": {"uniform": [1.0, 3.0]}}, "optim.focal_gamma"),
    ({"optim.loss": {"choice": ["dice_bce", "ce"]}}, "'ce' does not fit train.task=segmentation"),
    ({"optim.loss": {"choice": ["dice_bce", "focal"]}}, "optim.loss = 'focal'"),
    ({"model.name": {"choice": [SEG_MODEL, "resnet18"]}}, "'resnet18' is a classification model"),
    ({"model.name": {"choice": ["unet_resnet3"]}}, "unet_resnet3"),
    ({"data.image_size": {"choice": [224, 200]}}, "data.image_size = 200"),
    ({"train.early_stop_metric": {"choice": ["val_auc"]}}, "train.early_stop_metric = 'val_auc'"),
    ({"train.early_stop_metric": {"choice": ["val_dice", "val_accuracy"]}}, "'val_accuracy'"),
])
def test_bad_keys_for_a_segmentation_base(space, needle):
    with pytest.raises(ConfigError) as e:
        ft.check_space(ft.parse_space(space), seg_base())
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_keys_for_a_classification_base():
    base = load_config(None, {"model.name": "lenet"})
    for space, needle in [({"optim.dice_weight": {"uniform": [0.2, 0.8]}}, "optim.dice_weight has no effect"),
                          ({"model.name": {"choice": ["lenet", SEG_MODEL]}}, "is a segmentation model"),
                          ({"optim.loss": {"choice": ["ce", "dice"]}}, "optim.loss = 'dice'")]:
        with pytest.raises(ConfigError, match=needle):
            ft.check_space(ft.parse_space(space), base)
    # the base's own model and size are checked too when the space leaves them alone
    with pytest.raises(ConfigError, match="data.image_size"):
        ft.check_space(ft.parse_space({"optim.lr": 0.01}), seg_base(**{"data.image_size": 100}))


# --------------------------------------------------------------------------------------------------- tune/asha.py
def test_asha_task_segmentation_picks_the_seg_space(monkeypatch):
    asha = load_asha()
    seen = {}

    def fake_run_search(cfg, space, settings, experiment_dir=None, address=None, console=None):
        seen.update(cfg=cfg, space=space, settings=settings)
        return SimpleNamespace(interrupted=False)

    monkeypatch.setattr(ft, "run_search", fake_run_search)
    assert asha.main(["--task", "segmentation", "--epochs", "3", "--num-samples", "2"]) == 0
    cfg = seen["cfg"]
    assert cfg.train.task == "segmentation" and cfg.model.name == "unet_resnet34" and cfg.optim.loss == "dice_bce"
    assert seen["space"] == ft.load_space(task="segmentation") and seen["settings"].max_t == 3
    ft.check_space(seen["space"], cfg)
    seen.clear()
    assert asha.main(["--model", "lenet"]) == 0  # classification: tune/space.yaml, as before
    assert seen["space"] == ft.load_space() and seen["cfg"].train.task == "classification"


def test_asha_classification_space_on_a_seg_base_is_one_error_line(tmp_path, capsys):
    asha = load_asha()
    out = tmp_path / "x"
    assert asha.main(["--task", "segmentation", "--space", str(ROOT / "tune" / "space.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search space: model.name") and "classification model" in err
    assert err.count("\n") == 1 and not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optim.label_smoothing": {"uniform": [0.0, 0.1]}}))
    assert asha.main(["--task", "segmentation", "--space", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.label_smoothing" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------- results
def _fake_experiment(monkeypatch, exp: Path, metric: str, base: dict) -> dict:
    """Two finished trials and one ASHA stopped after a NaN epoch, as Ray's ExperimentAnalysis would give them."""
    finite = ft.score_key(metric)

    def hist(values):
        return pd.DataFrame({"epoch": list(range(1, len(values) + 1)), metric: values,
                             finite: [ft.finite_metric(v) for v in values], "val_loss": [0.5] * len(values)})

    trials = [SimpleNamespace(trial_id="t_00000", status="TERMINATED", config={"optim.lr": 1e-3}, path=str(exp)),
              SimpleNamespace(trial_id="t_00001", status="TERMINATED", config={"optim.lr": 3e-3}, path=str(exp)),
              SimpleNamespace(trial_id="t_00002", status="TERMINATED", config={"optim.lr": 1e-2}, path=str(exp))]
    frames = {"t_00000": hist([0.30, 0.55, 0.50]), "t_00001": hist([0.40, 0.61, 0.62]),
              "t_00002": hist([np.nan])}
    monkeypatch.setattr(results, "_analysis", lambda _: SimpleNamespace(trials=trials, trial_dataframes=frames))
    exp.mkdir(parents=True, exist_ok=True)
    return {"experiment_dir": str(exp), "base": base, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}},
            "settings": asdict(ft.TuneSettings(num_samples=3, max_t=3)), "max_t": 3}


def test_results_of_a_seg_search_name_val_iou(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    setup = _fake_experiment(monkeypatch, exp, "val_iou", to_dict(seg_base(**{"model.name": SEG_MODEL})))
    console = quiet_console()
    res = ft.write_results(setup, console=console)
    assert res.metric == "val_iou" and res.best["trial_id"] == "t_00001"
    df = pd.read_csv(exp / "trials.csv")
    assert {"best_val_iou", "val_iou_finite", "best_epoch", "epochs", "stopped_early"} <= set(df.columns)
    assert not any("auc" in c for c in df.columns)
    assert list(df["trial_id"]) == ["t_00001", "t_00000", "t_00002"]  # ranked on val_iou_finite
    assert df.loc[0, "best_val_iou"] == pytest.approx(0.62) and df.loc[0, "best_epoch"] == 3
    assert math.isnan(df.loc[2, "best_val_iou"]) and df.loc[2, "val_iou_finite"] == 0.0
    assert bool(df.loc[2, "stopped_early"])
    assert (exp / "val_iou.png").stat().st_size > 5000 and not (exp / "val_auc.png").exists()
    text = (exp / "best.yaml").read_text()
    assert text.startswith("# best trial t_00001") and "val_iou 0.6200 at epoch 3" in text
    best = load_config(exp / "best.yaml")
    assert best.train.task == "segmentation" and best.model.name == SEG_MODEL and best.optim.lr == 3e-3
    log = console.file.getvalue()
    assert "best val_iou" in log and "ASHA on validation IoU" in log and "val_auc" not in log


def test_results_of_a_classification_search_keep_their_names(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    setup = _fake_experiment(monkeypatch, exp, "val_auc", to_dict(load_config(None, {"model.name": "lenet"})))
    res = ft.write_results(setup, console=quiet_console())
    df = pd.read_csv(exp / "trials.csv")
    assert {"best_val_auc", "val_auc_finite"} <= set(df.columns) and not any("iou" in c for c in df.columns)
    assert (exp / "val_auc.png").is_file() and res.metric == "val_auc"
    assert "val_auc 0.6200" in (exp / "best.yaml").read_text()


def test_trial_lines_and_report_use_the_metric(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    from fastlesion.tune.console import TrialLines
    from fastlesion.tune.trial import _report_epoch

    lines = TrialLines(4, ["optim.lr"], "val_iou")
    trial = SimpleNamespace(trial_id="t_1", config={"optim.lr": 0.001})
    lines.on_trial_result(0, [], trial, {"epoch": 1, "val_iou": 0.25, "val_auc": 0.99})
    lines.on_trial_result(0, [], trial, {"epoch": 2, "val_iou": 0.4})
    lines.on_trial_complete(0, [], trial)
    out = capsys.readouterr().out
    assert "epoch 1/4  val_iou 0.2500  best 0.2500" in out
    assert "stopped by ASHA after epoch 2 (best val_iou 0.4000)" in out
    assert TrialLines.metric == "val_auc"  # what a callback pickled by an older search falls back to

    import ray.tune

    sent = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, checkpoint=None: sent.append(metrics))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch\n1\n")
    _report_epoch({"epoch": 1, "val_iou": float("nan"), "val_dice": 0.1, "note": "x"}, run, "val_iou")
    _report_epoch({"epoch": 2, "val_iou": 0.3}, run, "val_iou")
    assert sent[0]["val_iou_finite"] == 0.0 and sent[1]["val_iou_finite"] == 0.3 and "val_auc_finite" not in sent[0]
    assert "note" not in sent[0]


# --------------------------------------------------------------------------------------------------- a real search
@pytest.mark.slow
def test_asha_search_seg_cpu(tmp_path, capsys):
    """Two trials of a tiny U-Net, 2 epochs each, one at a time: trials.csv, val_iou.png and best.yaml."""
    ray = pytest.importorskip("ray")
    from fastlesion.data.synthetic import generate

    root = generate("isic2018-seg", tmp_path / "seg", n=24, seed=0, size=64)
    cfg = load_config(None, {"train.task": "segmentation", "data.dataset": "isic2018-seg", "data.root": str(root),
                             "model.name": SEG_MODEL, "data.image_size": 32, "loader.backend": "torch",
                             "loader.workers": 0, "loader.batch_size": 8, "train.epochs": 2,
                             "optim.warmup_epochs": 0.0, "data.folds_file": str(tmp_path / "folds.csv")})
    space = ft.parse_space({"optim.lr": {"loguniform": [1e-3, 1e-2]}, "optim.loss": {"choice": ["dice_bce", "dice"]}})
    settings = ft.TuneSettings(num_samples=2, max_t=2, grace_period=1, reduction_factor=2, gpus_per_trial=0,
                               cpus_per_trial=2, seed=0, max_failures=0)
    exp = tmp_path / "exp" / "asha"
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    try:
        res = ft.run_search(cfg, space, settings, experiment_dir=exp)
    finally:
        ray.shutdown()
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 2 and set(df["status"]) == {"TERMINATED"}, df
    assert {"best_val_iou", "val_iou_finite", "optim.loss"} <= set(df.columns)
    assert df["best_val_iou"].between(0, 1).all() and df["optim.loss"].isin(["dice_bce", "dice"]).all()
    assert (exp / "val_iou.png").stat().st_size > 5000
    log = capsys.readouterr().out
    assert "ASHA on val_iou" in log and "/2  val_iou " in log
    assert res.metric == "val_iou" and not res.interrupted
    best = load_config(exp / "best.yaml")
    assert best.train.task == "segmentation" and best.model.name == SEG_MODEL and best.train.epochs == 2
    run = Path(df.iloc[0]["run_dir"])
    metrics = pd.read_csv(run / "metrics.csv")
    assert "val_iou" in metrics.columns and len(metrics) == df.iloc[0]["epochs"]


def test_a_trial_checkpoint_carries_its_tensorboard_folder(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray.tune

    from fastlesion.tune.trial import _report_epoch, _restore

    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"epoch 1")
    (run / "metrics_per_class.csv").write_text("epoch\n1\n")
    kept = []

    def report(metrics, checkpoint=None):
        with checkpoint.as_directory() as d:  # Ray copies it before report returns: so do we
            kept.append(ray.tune.Checkpoint.from_directory(str(shutil.copytree(d, tmp_path / "ckpt"))))

    monkeypatch.setattr(ray.tune, "report", report)
    _report_epoch({"epoch": 1, "val_auc": 0.6}, run)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"epoch 1 and more")  # appended after the checkpoint
    retried = tmp_path / "elsewhere"
    assert _restore(kept[0], retried) == retried
    assert (retried / "tb" / "events.out.tfevents.1").read_bytes() == b"epoch 1"
    assert (retried / "metrics_per_class.csv").is_file()
