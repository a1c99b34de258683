"""Issue 10 (hardening), items 2, 5, 6, 10: one live run per folder, shared files written safely, duplicate and
symlinked images, deleting only what the library wrote, and a resumed run folder like an uninterrupted one."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastlesion.cli import main
from fastlesion.config import load_config
from fastlesion.data.catalog import Dataset, load_dataset
from fastlesion.errors import DatasetError, FastlesionError


def tiny_cfg(root: Path, out: Path, **over):
    base = {"data.dataset": "isic2020", "data.root": str(root), "data.image_size": 32, "model.name": "lenet",
            "loader.backend": "torch", "loader.workers": 0, "loader.batch_size": 16, "train.epochs": 1,
            "optim.lr": 3e-3, "optim.warmup_epochs": 0.0, "run.out": str(out), "run.quiet": True,
            "data.folds_file": str(out.parent / f"{out.name}-folds.csv"), "train.patience": 0}
    base.update(over)
    return load_config(None, base)


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text, lines
    return lines[0]


def _cli_train(data: Path, out: Path, folds: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "fastlesion.cli", "train", "--data", str(data), "--dataset", "isic2020",
            "--model", "lenet", "--epochs", str(epochs), "--image-size", "32", "--batch-size", "8", "--backend",
            "torch", "--workers", "0", "--quiet", "--out", str(out), "--data.folds_file", str(folds),
            "--train.patience", "0"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------------- 2: one live run
def test_second_run_on_a_live_run_folder_fails_naming_the_owner(tiny_isic, tmp_path):
    out, folds = tmp_path / "race", tmp_path / "folds.csv"
    first = subprocess.Popen(_cli_train(tiny_isic, out, folds, 3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:  # until the first run owns the folder
        lock = out / ".lock"
        if lock.is_file() and f'"pid": {first.pid}' in lock.read_text():
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run should still be training"
    second = subprocess.run(_cli_train(tiny_isic, out, folds, 1), capture_output=True, text=True, timeout=180)
    _, first_err = first.communicate(timeout=180)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2
    err = _one_error_line(second.stderr)
    assert str(out) in err and f"pid {first.pid} on {socket.gethostname()}" in err and "in use" in err, err
    assert not (out / ".lock").exists()  # released on exit
    assert len(pd.read_csv(out / "metrics.csv")) == 3  # the first run's files, whole


def test_two_runs_started_together_one_wins(tiny_isic, tmp_path):
    out, folds = tmp_path / "race", tmp_path / "folds.csv"
    procs = [subprocess.Popen(_cli_train(tiny_isic, out, folds, 2), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    err = _one_error_line(loser)
    # together: the folder is in use; the loser came after the winner had finished: it holds a run
    assert str(out) in err and ("in use by another fastlesion run (pid" in err or "already holds a run" in err), err
    assert len(pd.read_csv(out / "metrics.csv")) == 2 and json.loads((out / "summary.json").read_text())
    assert not (out / ".lock").exists()


def test_stale_lock_of_a_dead_run_is_taken_over(tiny_isic, tmp_path, caplog):
    from fastlesion.engine.train import train

    out = tmp_path / "r"
    out.mkdir()
    pid = _dead_pid()
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "yesterday"}))
    with caplog.at_level(logging.WARNING):
        summary = train(tiny_cfg(tiny_isic, out))
    assert summary["epochs_run"] == 1
    warned = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert len(warned) == 1 and f"pid {pid}" in warned[0] and str(out) in warned[0], warned
    assert not (out / ".lock").exists()


def test_a_held_folder_refuses_new_runs_and_resumes(tiny_isic, tmp_path, capsys):
    from fastlesion.engine.rundir import RunDir, lock_run_dir
    from fastlesion.engine.train import train

    out = tmp_path / "r"
    train(tiny_cfg(tiny_isic, out))
    lock_run_dir(out)  # as a live run would (flock: another open file of this very process conflicts too)
    try:
        with pytest.raises(FastlesionError, match=rf"{re.escape(str(out))}: in use by another fastlesion run "
                                                  rf"\(pid {os.getpid()} on "):
            train(tiny_cfg(tiny_isic, out, **{"run.overwrite": True}))
        assert (out / "best.pt").is_file()  # --overwrite deleted nothing of the live run
        assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 2  # --resume takes it too
        assert f"pid {os.getpid()}" in _one_error_line(capsys.readouterr().err)
    finally:
        RunDir.release(out)
    assert not (out / ".lock").exists()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0


def test_folds_all_parent_is_locked_by_the_parent(tiny_isic, tmp_path, monkeypatch):
    import fastlesion.engine.folds as folds_mod

    out = tmp_path / "cv"
    seen = []

    def fold_run(cfg):
        seen.append(json.loads((out / ".lock").read_text())["pid"])
        raise FastlesionError("stop after the first fold")

    monkeypatch.setattr(folds_mod, "train", fold_run)
    with pytest.raises(FastlesionError, match="stop after"):
        folds_mod.train_folds(tiny_cfg(tiny_isic, out, **{"data.num_folds": 3}))
    assert seen == [os.getpid()] and not (out / ".lock").exists()


def _write_folds(args) -> str:
    from fastlesion.data.splits import load_or_make_folds

    ds, cfg, barrier = args
    barrier.wait()
    folds, _ = load_or_make_folds(ds, cfg)
    return folds.to_csv(index=False)


def _worker(ds, cfg, barrier, queue) -> None:
    try:
        queue.put(("ok", _write_folds((ds, cfg, barrier))))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put(("error", repr(e)))


def test_concurrent_folds_file_writers_leave_one_valid_file(tmp_path):
    """Ray trials or several runs start on one data root at once: they all make the folds file at the same moment;
    every one gets the same folds and the file is whole (one writer; a temp name of its own; an atomic rename)."""
    from fastlesion.data.splits import make_folds_table

    n = 8000
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"path": [str(tmp_path / f"img_{i:06d}.jpg") for i in range(n)],
                          "label": (rng.random(n) < 0.2).astype(int), "group": [f"p{i // 3}" for i in range(n)]})
    ds = Dataset(table=table, classes=["a", "b"], root=tmp_path, kind="csv")
    cfg = load_config(None, {"data.dataset": "csv", "data.root": str(tmp_path)}).data
    expected = make_folds_table(ds, cfg).to_csv(index=False)
    ctx = mp.get_context("fork")
    for _ in range(3):
        (tmp_path / "folds_k5_s42.csv").unlink(missing_ok=True)
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(ds, cfg, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert all(status == "ok" for status, _ in results), results
        assert all(text == expected for _, text in results)
        assert (tmp_path / "folds_k5_s42.csv").read_text() == expected
        assert not list(tmp_path.glob(".folds*")) and not list(tmp_path.glob("*.lock"))  # no temp or lock left


# --------------------------------------------------------------------------------------------------- 5: duplicates
def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def _csv_cfg(root: Path, **kw):
    return load_config(None, {"data.dataset": "csv", "data.root": str(root), "data.csv": "d.csv", **kw}).data


def test_duplicate_csv_rows_are_dropped_with_one_warning(tmp_path, caplog):
    for i in range(6):
        _jpeg(tmp_path / "img" / f"{i}.jpg", i)
    rows = [{"path": f"img/{i}.jpg", "label": "ab"[i % 2]} for i in range(6)]
    rows += [{"path": "img/2.jpg", "label": "a"}, {"path": "./img/2.jpg", "label": "b"}, {"path": "img/5.jpg",
                                                                                         "label": "b"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(_csv_cfg(tmp_path))
    assert len(ds) == 6 and ds.table["path"].is_unique
    assert ds.table.loc[ds.table["path"].str.endswith("2.jpg"), "label"].tolist() == [0]  # the first row kept
    warned = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(warned) == 1 and "3 duplicate row(s)" in warned[0] and "img/2.jpg" in warned[0], warned
    assert "1 of them had another label" in warned[0]


def test_duplicate_isic_rows_count_once_in_validation(tiny_isic, tmp_path, caplog):
    from fastlesion.data.splits import split_dataset

    root = tmp_path / "isic"
    shutil.copytree(tiny_isic, root)
    df = pd.read_csv(root / "train.csv")
    pd.concat([df, df.iloc[:3]]).to_csv(root / "train.csv", index=False)
    cfg = load_config(None, {"data.dataset": "isic2020", "data.root": str(root),
                             "data.folds_file": str(tmp_path / "folds.csv")}).data
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(cfg)
    assert len(ds) == 80
    assert any("3 duplicate row(s)" in r.getMessage() and df["image_name"][0] in r.getMessage()
               for r in caplog.records)
    split = split_dataset(ds, cfg)
    assert split.val["path"].is_unique and len(split.train) + len(split.val) == 80


# --------------------------------------------------------------------------------------------------- 5: symlinks
@pytest.mark.parametrize("kind", ["isic2020", "ham10000", "csv", "folder"])
def test_symlinked_image_out_of_the_root_is_refused_in_every_kind(kind, tiny_isic, tiny_ham, tmp_path, capsys):
    outside = tmp_path / "elsewhere" / "secret.jpg"
    _jpeg(outside, 99)
    root = tmp_path / "data"
    if kind in ("isic2020", "ham10000"):
        shutil.copytree(tiny_isic if kind == "isic2020" else tiny_ham, root)
        victim = sorted(root.glob("train/*.jpg" if kind == "isic2020" else "HAM10000_images_part_1/*.jpg"))[0]
        args = {}
    else:
        for i in range(6):
            _jpeg(root / ("a" if i < 3 else "b") / f"{i}.jpg", i)
        victim = root / "a" / "0.jpg"
        if kind == "csv":
            pd.DataFrame({"path": [f"{'a' if i < 3 else 'b'}/{i}.jpg" for i in range(6)],
                          "label": [0, 0, 0, 1, 1, 1]}).to_csv(root / "d.csv", index=False)
            args = {"csv": "d.csv"}
        else:
            args = {}
    victim.unlink()
    victim.symlink_to(outside)
    cfg = load_config(None, {"data.dataset": kind, "data.root": str(root),
                             **{f"data.{k}": v for k, v in args.items()}}).data
    match = rf"1 image\(s\) are symlinks to files outside the data root .*{re.escape(str(victim))} -> " \
            rf"{re.escape(str(outside))}"
    for strict in (True, False):  # training and `fastlesion check`
        with pytest.raises(DatasetError, match=match):
            load_dataset(cfg, strict=strict)
    cli = ["train", "--data", str(root), "--dataset", kind, "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(cli + (["--csv", "d.csv"] if kind == "csv" else [])) == 2
    assert re.search(match, _one_error_line(capsys.readouterr().err))
    # a symlink to another image inside the root is fine (and, both being listed, that image counts once)
    victim.unlink()
    victim.symlink_to(root / "b" / "5.jpg" if kind in ("csv", "folder") else sorted(victim.parent.glob("*.jpg"))[0])
    ds = load_dataset(cfg)
    assert ds.table["path"].map(os.path.realpath).is_unique


def test_symlinked_folder_is_not_an_escape_for_csv(tmp_path):
    """The rule is one for every kind: a folder inside the root may be a link (images on another disk)."""
    disk = tmp_path / "disk2"
    for i in range(6):
        _jpeg(disk / f"{i}.jpg", i)
    root = tmp_path / "data"
    root.mkdir()
    (root / "img").symlink_to(disk, target_is_directory=True)
    pd.DataFrame({"path": [f"img/{i}.jpg" for i in range(6)], "label": [0, 1] * 3}).to_csv(root / "d.csv",
                                                                                          index=False)
    ds = load_dataset(_csv_cfg(root))
    assert len(ds) == 6 and all(p.startswith(str(root / "img")) for p in ds.table["path"])
    pd.DataFrame({"path": ["../disk2/0.jpg", "img/1.jpg"], "label": [0, 1]}).to_csv(root / "d.csv", index=False)
    with pytest.raises(DatasetError, match="escapes the data root"):  # a name leading out is still refused
        load_dataset(_csv_cfg(root))


def test_exclusion_file_works_through_a_symlinked_image_folder(tiny_isic, tmp_path):
    root = tmp_path / "isic"
    root.mkdir()
    shutil.copy(tiny_isic / "train.csv", root / "train.csv")
    (root / "train").symlink_to(tiny_isic / "train", target_is_directory=True)
    names = pd.read_csv(root / "train.csv")["image_name"][:2]
    (tmp_path / "exclude.txt").write_text("".join(f"train/{n}.jpg\n" for n in names))
    ds = load_dataset(load_config(None, {"data.dataset": "isic2020", "data.root": str(root),
                                         "data.exclude_file": str(tmp_path / "exclude.txt")}).data)
    assert len(ds) == 78 and len(ds.excluded) == 2


# --------------------------------------------------------------------------------------------------- 6: user files
def test_overwrite_deletes_only_what_the_library_wrote(tiny_isic, tmp_path):
    from fastlesion.engine.train import train

    out = tmp_path / "r"
    train(tiny_cfg(tiny_isic, out))
    (out / "plots" / "my_figure.png").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    (out / "eval_val").mkdir(exist_ok=True)
    train(tiny_cfg(tiny_isic, out, **{"run.overwrite": True}))
    assert (out / "plots" / "my_figure.png").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "mine"
    assert (out / "plots" / "curves.png").is_file() and (out / "eval_val").is_dir()


def test_overwrite_removes_plots_folder_only_when_empty(tmp_path):
    from fastlesion.engine.rundir import PLOT_FILES, RUN_FILES, remove_run_files

    (tmp_path / "plots").mkdir()
    for name in [*RUN_FILES, *(f"plots/{p}" for p in PLOT_FILES), "best.pt.tmp"]:
        (tmp_path / name).write_text("x")
    remove_run_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_synthetic_never_regenerates_over_foreign_files(tmp_path, capsys):
    from fastlesion.data.synthetic import generate

    root = generate("isic2020", tmp_path / "s", n=8, size=32)
    mine = root / "train" / "my_photo.jpg"
    mine.write_bytes(b"mine")
    before = sorted(p.name for p in (root / "train").iterdir())
    for kwargs in ({"n": 10}, {"n": 8}):  # other parameters, and the same ones (no longer complete)
        with pytest.raises(DatasetError, match=rf"{re.escape(str(mine))} was not written by the synthetic generator; "
                                               "refusing"):
            generate("isic2020", root, size=32, **kwargs)
        assert sorted(p.name for p in (root / "train").iterdir()) == before  # nothing deleted
    assert main(["synth", "--out", str(root), "--n", "10", "--size", "32", "--workers", "1"]) == 2
    assert "my_photo.jpg" in _one_error_line(capsys.readouterr().err)
    mine.unlink()
    generate("ham10000", root, n=8, size=32)  # only the generator's own files: replaced
    assert not (root / "train").exists() and (root / "HAM10000_metadata.csv").is_file()


def test_synthetic_set_without_a_file_list_still_regenerates(tmp_path):
    """A set written before the generator kept its file list: the names come from the marker's parameters."""
    from fastlesion.data.synthetic import FILES, generate

    root = generate("isic2020", tmp_path / "s", n=8, size=32)
    (root / FILES).unlink()
    generate("isic2020", root, n=10, size=32)
    assert len(pd.read_csv(root / "train.csv")) == 10 and len(list((root / "train").iterdir())) == 10


# --------------------------------------------------------------------------------------------------- 10: resume
def _best_is_epoch_one(monkeypatch) -> None:
    from fastlesion.engine.state import EarlyStop

    real = EarlyStop.update
    monkeypatch.setattr(EarlyStop, "update", lambda self, value, epoch: real(self, value if epoch == 1 else -1.0,
                                                                             epoch))


def _files(out: Path) -> list[str]:
    """The run folder's files; TensorBoard's event files are one per process by design (a resumed run adds one)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.parent.name != "tb")


@pytest.mark.parametrize("old_best_pt", [False, True])
def test_resumed_run_folder_matches_an_uninterrupted_one(tiny_isic, tmp_path, monkeypatch, old_best_pt):
    import torch

    from fastlesion.engine.train import train

    _best_is_epoch_one(monkeypatch)
    whole = tmp_path / "whole"
    train(tiny_cfg(tiny_isic, whole, **{"train.epochs": 3}))
    out = tmp_path / "resumed"
    first = train(tiny_cfg(tiny_isic, out, **{"train.epochs": 2}))
    if old_best_pt:  # a best.pt written before it kept the labels: predictions_val.csv has them
        state = torch.load(out / "best.pt", weights_only=True)
        del state["val_labels"], state["val_probs"]
        torch.save(state, out / "best.pt")
    shutil.rmtree(out / "plots")
    summary = train(tiny_cfg(tiny_isic, out, **{"train.epochs": 3}), resume=out)
    assert summary["best_epoch"] == 1 and summary["epochs_run"] == 3
    assert _files(out) == _files(whole)  # plots/roc.png included
    m = pd.read_csv(out / "metrics.csv")
    assert summary["train_seconds"] >= first["train_seconds"]
    assert summary["train_seconds"] >= m["epoch_seconds"].sum()  # every epoch's time, both processes'
