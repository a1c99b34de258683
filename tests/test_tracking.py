"""TensorBoard event files (on by default) and MLflow (``run.mlflow_uri``): what a run logs, read back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_engine import tiny_cfg

from fastlesion.cli import main
from fastlesion.config import ConfigError, load_config
from fastlesion.engine.train import train
from fastlesion.errors import FastlesionError
from fastlesion.metrics import VAL_METRICS

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed (pip install -e '.[mlflow]')")


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _mlflow(uri: str):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fastlesion")
    return client, client.search_runs([exp.experiment_id])


def test_tensorboard_scalars_images_text_and_hparams(tiny_isic, tmp_path):
    from tensorboard.plugins.hparams import api_pb2, metadata

    run = tmp_path / "r"
    summary = train(tiny_cfg(tiny_isic, run, **{"loader.batch_size": 8, "train.steps_per_epoch": 5}))
    ea = _events(run)
    tags = ea.Tags()
    rows = pd.read_csv(run / "metrics.csv")
    expected = {"train/loss", "train/lr", "val/loss", "speed/images_per_s", "time/epoch_seconds", "step/train_loss",
                "step/lr", "summary/val_auc", "summary/best_epoch", *(f"val/{m[4:]}" for m in VAL_METRICS)}
    assert expected <= set(tags["scalars"]), sorted(expected - set(tags["scalars"]))
    # per epoch at step = epoch, the values of metrics.csv
    auc = ea.Scalars("val/auc")
    assert [e.step for e in auc] == [1, 2]
    assert [e.value for e in auc] == pytest.approx(rows["val_auc"].tolist())
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx(rows["train_loss"].tolist(), rel=1e-6)
    # per loss read (every 10 steps and at an epoch's end) at the optimizer step: 5 steps per epoch -> 5, 10
    assert [e.step for e in ea.Scalars("step/train_loss")] == [5, 10]
    assert ea.Scalars("summary/val_auc")[-1].value == pytest.approx(summary["val_auc"])
    assert {"plots/curves", "plots/roc", "plots/confusion"} <= set(tags["images"])  # every PNG of plots/
    assert "config/text_summary" in tags["tensors"]
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lenet" in text and "batch_size: 8" in text
    # HParams: a session (start + end) with the flattened config, no per-run experiment summary
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(content) == {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    hp = start.session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(3e-3) and hp["model.name"].string_value == "lenet"
    assert hp["train.steps_per_epoch"].number_value == 5 and hp["train.compile_mode"].string_value == "None"
    assert not any(k.startswith("run.") for k in hp)
    end = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG])
    assert end.session_end_info.status == api_pb2.STATUS_SUCCESS


def test_tensorboard_off_and_overwrite(tiny_isic, tmp_path):
    off = tmp_path / "off"
    train(tiny_cfg(tiny_isic, off, **{"train.epochs": 1, "run.tensorboard": False}))
    assert (off / "summary.json").is_file() and not (off / "tb").exists()
    assert main(["config", "--run.tensorboard", "false"]) == 0
    # --overwrite replaces the event files of the run it replaces, and leaves the user's own files
    on = tmp_path / "on"
    train(tiny_cfg(tiny_isic, on, **{"train.epochs": 1}))
    (on / "tb" / "notes.txt").write_text("mine")
    train(tiny_cfg(tiny_isic, on, **{"train.epochs": 1, "run.overwrite": True, "train.steps_per_epoch": 2}))
    assert len(list((on / "tb").glob("events.out.tfevents.*"))) == 1 and (on / "tb" / "notes.txt").is_file()
    assert [e.step for e in _events(on).Scalars("val/auc")] == [1]


def test_resume_drops_what_a_killed_process_logged(tiny_isic, tmp_path):
    import time

    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "r"
    train(tiny_cfg(tiny_isic, run, **{"train.epochs": 1, "train.steps_per_epoch": 3}))
    with SummaryWriter(str(run / "tb")) as w:  # what a process killed in epoch 2 (after step 5) had logged
        w.add_scalar("step/train_loss", 99.0, 5)
    time.sleep(1.1)  # event files are read in name (time) order: the resumed run's comes after
    train(load_config(run / "config.yaml", {"train.epochs": 2}), resume=run)
    ea = _events(run)
    assert [e.step for e in ea.Scalars("val/auc")] == [1, 2]
    assert [e.step for e in ea.Scalars("step/train_loss")] == [3, 6] and 99.0 not in \
           [e.value for e in ea.Scalars("step/train_loss")]


def test_inactive_rank_has_no_step_hook(tmp_path):
    from fastlesion.engine.rundir import RunDir

    assert RunDir(tmp_path / "r", active=False).step_hook(None) is None
    assert not (tmp_path / "r").exists()


def test_mlflow_uri_checked_and_bare_folder_is_a_file_uri(tmp_path):
    from fastlesion.engine.tracking import mlflow_uri

    with pytest.raises(ConfigError, match="run.mlflow_uri"):
        load_config(None, {"run.mlflow_uri": " "})
    assert load_config(None, {"run.mlflow_uri": "null"}).run.mlflow_uri is None
    assert mlflow_uri(str(tmp_path / "ml")) == (tmp_path / "ml").resolve().as_uri()
    for uri in ("file:./mlruns", "sqlite:///mlflow.db", "http://host:5000"):
        assert mlflow_uri(uri) == uri


@needs_mlflow
def test_mlflow_file_store_params_metrics_artifacts_and_resume(tiny_isic, tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "r"
    cfg = tiny_cfg(tiny_isic, run, **{"train.epochs": 1, "run.mlflow_uri": uri, "train.steps_per_epoch": 3})
    train(cfg)
    client, runs = _mlflow(uri)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["fastlesion.run_dir"] == str(run.resolve())
    assert r.data.params["optim.lr"] == "0.003" and r.data.params["model.name"] == "lenet"
    assert r.data.params["run.mlflow_uri"] == uri
    assert {"train_loss", "val_loss", "lr", "images_per_s", *VAL_METRICS, "summary/val_auc"} <= set(r.data.metrics)
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"best.pt", "config.yaml", "metrics.csv", "summary.json", "plots"} <= arts
    assert {"plots/curves.png", "plots/roc.png", "plots/confusion.png"} <= \
           {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    # a resumed run continues its MLflow run
    train(load_config(run / "config.yaml", {"train.epochs": 2}), resume=run)
    client, runs = _mlflow(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_auc")] == [1, 2]


@needs_mlflow
def test_failed_run_ends_its_trackers_failed(tiny_isic, tmp_path, monkeypatch):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    import fastlesion.engine.train as train_mod

    class NanLoss(torch.nn.Module):
        def forward(self, logits, y):
            return torch.nn.functional.cross_entropy(logits, y) * float("nan")

    monkeypatch.setattr(train_mod, "create_loss", lambda *a, **k: NanLoss())
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(FastlesionError, match="loss is nan"):
        train(tiny_cfg(tiny_isic, tmp_path / "r", **{"run.mlflow_uri": uri, "train.steps_per_epoch": 2}))
    assert _mlflow(uri)[1][0].info.status == "FAILED"
    content = _events(tmp_path / "r").PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_END_INFO_TAG]
    assert plugin_data_pb2.HParamsPluginData.FromString(content).session_end_info.status == api_pb2.STATUS_FAILURE


@pytest.mark.parametrize("package, flag", [("mlflow", ["--run.mlflow_uri", "file:./mlruns"]),
                                           ("tensorboard", [])])
def test_missing_package_is_one_error_line_up_front(tiny_isic, tmp_path, capsys, monkeypatch, package, flag):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` fails, find_spec finds nothing
    out = tmp_path / "r"
    assert main(["train", "--data", str(tiny_isic), "--dataset", "isic2020", "--model", "lenet", "--out", str(out),
                 "--quiet", *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install" in err[0] and package in err[0], err
    assert not out.exists()  # refused before the run folder was made


def test_step_losses_need_no_extra_sync(tiny_isic):
    """on_loss gets the window mean the loop already read (the sum it adds to the epoch's loss)."""
    from fastlesion.engine.loop import train_epoch
    from fastlesion.engine.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, compile_mode=None, channels_last=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), None) for _ in range(5)]
    seen: list[float] = []
    res = train_epoch(model, batches, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                      torch.amp.GradScaler(enabled=False), rt, 1, check_every=2, on_loss=seen.append)
    assert len(seen) == 3  # steps 2, 4 and the last one
    assert (seen[0] * 2 + seen[1] * 2 + seen[2]) / 5 == pytest.approx(res.loss)


@needs_mlflow
def test_a_trial_asha_stopped_gets_its_session_and_run_ended(tiny_isic, tmp_path):
    """ASHA stops a trial at an epoch report and Ray ends its process, so train() never closes its trackers: the
    search's results pass ends them (fastlesion.tune.finish), once."""
    import subprocess

    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    from fastlesion.config import save_config, to_dict
    from fastlesion.tune.finish import STOPPED_TAG, close_stopped_trials

    uri, run = (tmp_path / "mlruns").as_uri(), tmp_path / "trial"
    cfg = tiny_cfg(tiny_isic, run, **{"train.epochs": 3, "run.mlflow_uri": uri, "train.steps_per_epoch": 2})
    save_config(cfg, tmp_path / "cfg.yaml")
    # the process ends at the first epoch's report, as a trial's does when ASHA stops it there
    code = ("import os, sys; from fastlesion.config import load_config; from fastlesion.engine.train import train; "
            "train(load_config(sys.argv[1]), report=lambda row, out: os._exit(0))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "cfg.yaml")], check=True, timeout=300)
    assert _mlflow(uri)[1][0].info.status == "RUNNING"
    assert metadata.SESSION_END_INFO_TAG not in _events(run).PluginTagToContent(metadata.PLUGIN_NAME)

    trials = pd.DataFrame({"run_dir": [str(run), str(tmp_path / "done")], "stopped_early": [True, False],
                           "epochs": [1, 3]})
    assert close_stopped_trials(trials, to_dict(cfg)) == 2  # its TensorBoard session and its MLflow run
    r = _mlflow(uri)[1][0]
    assert r.info.status == "FINISHED" and r.data.tags[STOPPED_TAG] == "asha after epoch 1"
    content = _events(run).PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_END_INFO_TAG]
    assert plugin_data_pb2.HParamsPluginData.FromString(content).session_end_info.status == api_pb2.STATUS_SUCCESS
    assert close_stopped_trials(trials, to_dict(cfg)) == 0  # a second results pass (a resumed search): nothing
