"""Ray Tune ASHA search on CPU: a tiny search end to end, interrupt + resume, and bad input (issue #5)."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fastlesion import tune as ft
from fastlesion.config import load_config, to_dict
from fastlesion.errors import ConfigError, FastlesionError

ROOT = Path(__file__).resolve().parents[1]
ASHA = ROOT / "tune" / "asha.py"
TINY_SPACE = {"optim.lr": {"loguniform": [1.0e-4, 3.0e-2]}, "model.name": {"choice": ["lenet"]},
              "loader.batch_size": {"choice": [8, 16]}}


def tiny_overrides(root: Path, tmp: Path) -> dict:
    return {"data.dataset": "isic2020", "data.root": str(root), "data.image_size": 32, "model.name": "lenet",
            "loader.backend": "torch", "loader.workers": 0, "loader.batch_size": 16, "train.epochs": 3,
            "optim.warmup_epochs": 0.0, "data.folds_file": str(tmp / "folds.csv")}


def tiny_args(root: Path, tmp: Path) -> list[str]:
    return ["--data", str(root), "--dataset", "isic2020", "--model", "lenet", "--epochs", "3", "--image-size", "32",
            "--backend", "torch", "--workers", "0", "--data.folds_file", str(tmp / "folds.csv"),
            "--optim.warmup_epochs", "0"]


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def load_asha():
    spec = importlib.util.spec_from_file_location("asha_script", ASHA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------------------------------- the search
def test_asha_search_cpu(tiny_isic, tmp_path, local_ray, capsys):
    cfg = load_config(None, tiny_overrides(tiny_isic, tmp_path))
    # 2 CPUs per trial on the 2-CPU Ray: one trial at a time, so the order in which trials reach ASHA's rungs (and
    # with it which trial is stopped) is the same on every run; 2 trials at once made it depend on timing
    settings = ft.TuneSettings(num_samples=4, max_t=3, grace_period=1, reduction_factor=2, gpus_per_trial=0,
                               cpus_per_trial=2, seed=0, max_failures=0)
    exp = tmp_path / "exp" / "asha"
    res = ft.run_search(cfg, ft.parse_space(TINY_SPACE), settings, experiment_dir=exp)

    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"}, df
    assert {"trial_id", "optim.lr", "model.name", "loader.batch_size", "best_val_auc", "epochs", "stopped_early",
            "run_dir"} <= set(df.columns)
    assert df["epochs"].between(1, 3).all() and (df["epochs"] == 3).any()
    assert df["stopped_early"].any(), "ASHA stopped no trial early"
    log = capsys.readouterr().out  # the compact console log: a line per trial epoch and per trial end
    assert log.count("stopped by ASHA after epoch") == int(df["stopped_early"].sum()), log
    assert log.count(" start  ") == 4 and log.count("/3  val_auc ") == int(df["epochs"].sum()), log
    assert (df.loc[df["stopped_early"], "epochs"] < 3).all()
    assert df["loader.batch_size"].isin([8, 16]).all() and df["optim.lr"].between(1e-4, 3e-2).all()
    assert (exp / "val_auc.png").stat().st_size > 5000
    assert not res.interrupted and res.best is not None

    # every trial trained in its own run folder; a full-length trial finished it (summary.json)
    for r in df.itertuples():
        run = Path(r.run_dir)
        assert (run / "metrics.csv").is_file() and len(pd.read_csv(run / "metrics.csv")) == r.epochs
    full = df[df["epochs"] == 3].iloc[0]
    assert (Path(full["run_dir"]) / "summary.json").is_file()
    # Ray ended the stopped trials' processes mid-train(): the results pass ended their TensorBoard sessions
    from fastlesion.tune.finish import TB_SUFFIX

    for r in df.itertuples():
        assert len(list((Path(r.run_dir) / "tb").glob(f"*{TB_SUFFIX}"))) == int(r.stopped_early), r

    # best.yaml: a valid config of the best trial, runnable by `fastlesion train --config best.yaml`
    best = load_config(exp / "best.yaml")
    top = df.iloc[0]
    assert best.model.name == "lenet" and best.run.out is None and not best.run.quiet
    assert best.train.epochs == 3 and best.loader.batch_size == int(top["loader.batch_size"])
    assert math.isclose(best.optim.lr, float(top["optim.lr"]), rel_tol=1e-9)
    assert Path(best.data.root).is_absolute() and best.data.folds_file == str(tmp_path / "folds.csv")
    assert top["best_val_auc"] == df["best_val_auc"].max()

    from fastlesion.engine.train import train

    summary = train(load_config(exp / "best.yaml", [f"run.out={tmp_path / 'retrain'}", "train.epochs=1",
                                                   "run.quiet=true", "run.plots=false"]))
    assert summary["epochs_run"] == 1


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"asha.py exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.25)


@pytest.mark.slow
def test_interrupt_and_resume(tiny_isic, tmp_path):
    pytest.importorskip("ray")
    space = write_space(tmp_path / "space.yaml", TINY_SPACE)
    out = tmp_path / "exp"
    args = [sys.executable, str(ASHA), *tiny_args(tiny_isic, tmp_path), "--space", str(space), "--num-samples",
            "4", "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--out", str(out), "--name", "asha"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)
    exp = out / "asha"
    try:
        _wait_for(lambda: any(exp.glob("trial_*/checkpoint_*")), 180, proc)  # the first epoch of a trial
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130, proc.stderr.read()[-3000:]
    assert not (exp / "best.yaml").exists()
    before = pd.read_csv(exp / "trials.csv")
    assert (before["status"] != "TERMINATED").any()

    done = subprocess.run([sys.executable, str(ASHA), "--resume", str(out)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"}, df
    assert set(df["trial_id"]) == set(before["trial_id"])  # the same trials, continued
    assert load_config(exp / "best.yaml").model.name == "lenet"
    for r in df.itertuples():  # a resumed run folder holds each epoch once
        assert list(pd.read_csv(Path(r.run_dir) / "metrics.csv")["epoch"]) == list(range(1, r.epochs + 1))


# --------------------------------------------------------------------------------------------------- bad input
def test_space_parsing_and_checks():
    base = load_config(None, {"model.name": "lenet"})
    space = ft.parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "optim.weight_decay": {"uniform": [0, 0.1]},
                            "loader.batch_size": {"quniform": [8, 32, 8]}, "train.seed": {"randint": [0, 5]},
                            "optim.name": {"choice": ["adamw", "sgd"]}, "optim.momentum": 0.8,
                            "loader.scale": [0.5, 1.0]})
    ft.check_space(space, base)
    assert space["optim.momentum"].kind == "constant" and space["loader.scale"].args == ([0.5, 1.0],)
    assert ft.parse_space(ft.space_to_dict(space)) == space
    assert set(ft.param_space(space)) == set(space)
    ft.check_space(ft.load_space(), base)  # the default space is valid, and tune/space.yaml is it
    assert ft.load_space(ROOT / "tune" / "space.yaml") == ft.load_space()

    cases = [({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}, "optim.lrr"),
             ({"optimizer.lr": 0.1}, "optimizer.lr"),
             ({"optim.name": {"choice": []}}, "optim.name: empty choice list"),
             ({"model.name": {"choice": ["lenet", "resnet1888"]}}, "resnet1888"),
             ({"optim.loss": {"choice": ["ce", "weighted"]}}, "optim.loss"),
             ({"optim.lr": {"loguniform": [0, 1e-2]}}, "low > 0"),
             ({"optim.lr": {"uniform": [1e-2, 1e-4]}}, "low < high"),
             ({"loader.batch_size": {"uniform": [8, 64]}}, "loader.batch_size is an integer"),
             ({"optim.lr": {"normal": [0, 1]}}, "optim.lr"),
             ({"train.epochs": {"choice": [3, 5]}}, "train.epochs cannot be searched")]
    for bad, needle in cases:
        with pytest.raises(ConfigError) as e:
            ft.check_space(ft.parse_space(bad), base)
        assert needle in str(e.value), (bad, str(e.value))


def test_rungs_resources_and_trial_config(tmp_path):
    assert ft.TuneSettings(max_t=3, grace_period=1, reduction_factor=2).rungs() == [1, 2]
    assert ft.TuneSettings(max_t=20, grace_period=2, reduction_factor=3).rungs() == [2, 6, 18]
    s = ft.TuneSettings(gpus_per_trial=None, cpus_per_trial=None)
    assert ft.resolve_resources(s, {"CPU": 16.0, "GPU": 4.0}) == (1.0, 4.0)
    assert ft.resolve_resources(s, {"CPU": 2.0, "GPU": 0.0}) == (0.0, 1.0)
    half = ft.TuneSettings(gpus_per_trial=0.5)
    assert ft.resolve_resources(half, {"CPU": 16.0, "GPU": 2.0}) == (0.5, 4.0)
    assert ft.concurrency({"CPU": 16.0, "GPU": 2.0}, 0.5, 4.0) == 4
    with pytest.raises(FastlesionError, match="largest node"):
        ft.resolve_resources(ft.TuneSettings(gpus_per_trial=2), {"CPU": 32, "GPU": 4}, {"CPU": 16, "GPU": 1},
                             where="the Ray cluster at auto")
    with pytest.raises(FastlesionError, match="--cpus-per-trial 8"):
        ft.resolve_resources(ft.TuneSettings(cpus_per_trial=8), {"CPU": 2.0, "GPU": 0.0})
    for bad in (dict(grace_period=5, max_t=3), dict(reduction_factor=1), dict(num_samples=0),
                dict(gpus_per_trial=1.5)):
        with pytest.raises(FastlesionError):
            ft.TuneSettings(**bad).check()

    d = to_dict(load_config(None, {"loader.workers": 8, "train.patience": 3}))
    cfg = ft.trial_config(d, {"optim.lr": 0.01, "model.name": "lenet"}, tmp_path / "r", 0, 2, 4)
    assert (cfg.optim.lr, cfg.model.name, cfg.loader.workers, cfg.train.epochs) == (0.01, "lenet", 2, 4)
    assert cfg.run.quiet and cfg.run.out == str(tmp_path / "r") and cfg.train.ddp == 0 and cfg.train.patience == 0
    assert cfg.train.device == "cpu"
    assert ft.finite_auc(float("nan")) == 0.0 and ft.finite_auc(0.75) == 0.75 and ft.finite_auc(None) == 0.0


def test_cli_errors(tmp_path, capsys):
    asha = load_asha()
    space = write_space(tmp_path / "bad.yaml", {"optim.lrr": {"loguniform": [1e-4, 1e-2]}})
    assert asha.main(["--model", "lenet", "--space", str(space), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.lrr" in err and err.count("\n") == 1

    space = write_space(tmp_path / "empty.yaml", {"optim.name": {"choice": []}})
    assert asha.main(["--model", "lenet", "--space", str(space), "--out", str(tmp_path / "x")]) == 2
    assert "optim.name: empty choice list" in capsys.readouterr().err

    assert asha.main(["--resume", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err

    assert asha.main(["--space", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_more_gpus_than_the_machine_fails_up_front(tmp_path, capsys):
    import torch

    asha = load_asha()
    want = torch.cuda.device_count() + 1
    space = write_space(tmp_path / "s.yaml", TINY_SPACE)
    t0 = time.monotonic()
    assert asha.main(["--model", "lenet", "--space", str(space), "--gpus-per-trial", str(want),
                      "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--gpus-per-trial {want}" in err and f"has {torch.cuda.device_count()} GPU(s)" in err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "x").exists()  # nothing started, nothing pending


def test_ray_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(FastlesionError, match=r"pip install 'ray\[tune\]'"):
        ft.import_ray()
    asha = load_asha()
    assert asha.main(["--model", "lenet", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "error: Ray Tune is not installed: pip install 'ray[tune]'\n"


def test_help():
    r = subprocess.run([sys.executable, str(ASHA), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--space", "--num-samples", "--grace-period", "--reduction-factor", "--gpus-per-trial",
                 "--cpus-per-trial", "--seed", "--out", "--name", "--address", "--resume", "--max-failures",
                 "--epochs", "--config", "--data"):
        assert flag in r.stdout, flag
