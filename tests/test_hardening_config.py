"""Issue 10 hardening: range checks on every config key, one ``error:`` line for OSErrors (and a bug report line for
everything unexpected), and the leftover local Ray of a killed search."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastlesion
from fastlesion import cli
from fastlesion.cli import main, run_command
from fastlesion.config import Config, ConfigError, load_config, replace


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


# --------------------------------------------------------------------------------------------------- item 3: ranges
BAD_VALUES = [  # (key, value, what the message says)
    ("train.steps_per_epoch", "0", "must be >= 1"),
    ("train.steps_per_epoch", "-3", "must be >= 1"),
    ("train.patience", "-1", "must be >= 0"),
    ("optim.ema_decay", "5", r"must be in \[0, 1\), got 5.0"),
    ("optim.ema_decay", "1", r"must be in \[0, 1\)"),
    ("optim.ema_decay", "-0.1", r"must be in \[0, 1\)"),
    ("optim.lr", "nan", "must be a finite number, got nan"),
    ("optim.lr", "inf", "must be a finite number, got inf"),
    ("optim.lr", "-inf", "must be a finite number"),
    ("optim.lr", "0", "must be > 0"),
    ("optim.weight_decay", "-0.01", "must be >= 0"),
    ("optim.weight_decay", "nan", "finite"),
    ("optim.momentum", "1", r"must be in \[0, 1\)"),
    ("optim.momentum", "-0.5", r"must be in \[0, 1\)"),
    ("optim.betas", "0.9,1.0", r"optim\.betas\[1\] must be in \[0, 1\)"),
    ("optim.betas", "-0.1,0.9", r"optim\.betas\[0\] must be in \[0, 1\)"),
    ("optim.betas", "nan,0.9", r"optim\.betas\[0\] must be a finite number"),
    ("optim.min_lr_ratio", "1.5", r"must be in \[0, 1\]"),
    ("optim.gamma", "0", r"must be in \(0, 1\]"),
    ("optim.gamma", "2", r"must be in \(0, 1\]"),
    ("optim.warmup_epochs", "-1", "must be >= 0"),
    ("optim.step_epochs", "0", "must be >= 1"),
    ("optim.plateau_patience", "-1", "must be >= 0"),
    ("optim.clip_grad", "0", "must be > 0"),
    ("optim.clip_grad", "-1", "must be > 0"),
    ("optim.clip_grad", "inf", "finite"),
    ("optim.label_smoothing", "2", r"must be in \[0, 1\)"),
    ("optim.label_smoothing", "1", r"must be in \[0, 1\)"),
    ("optim.focal_gamma", "-1", "must be >= 0"),
    ("loader.hflip", "1.5", r"must be in \[0, 1\]"),
    ("loader.vflip", "-0.1", r"must be in \[0, 1\]"),
    ("loader.hue", "0.6", r"must be in \[0, 0\.5\]"),
    ("loader.hue", "-0.1", r"must be in \[0, 0\.5\]"),
    ("loader.brightness", "-0.2", "must be >= 0"),
    ("loader.contrast", "-0.2", "must be >= 0"),
    ("loader.saturation", "-0.2", "must be >= 0"),
    ("loader.aug_strength", "-1", "must be >= 0"),
    ("loader.oversample_power", "-0.5", "must be >= 0"),
    ("loader.rotate", "181", r"must be in \[0, 180\]"),
    ("loader.rotate", "-1", r"must be in \[0, 180\]"),
    ("loader.ratio", "2,1", "0 < min <= max"),
    ("loader.ratio", "0,1", "0 < min <= max"),
    ("loader.scale", "nan,1", r"loader\.scale\[0\] must be a finite number"),
    ("loader.eval_batch_size", "0", "must be >= 1"),
    ("loader.prefetch", "0", "must be >= 1"),
    ("loader.seed", "-1", "must be >= 0"),
    ("loader.eval_crop", "nan", "finite"),
    ("model.drop_rate", "1", r"must be in \[0, 1\)"),
    ("model.drop_path_rate", "-0.1", r"must be in \[0, 1\)"),
    ("data.limit", "0", "must be >= 1"),
    ("data.num_folds", "1", "must be >= 2"),
    ("data.holdout", "nan", "finite"),
    ("data.synthetic_n", "0", "must be >= 1"),
    ("data.synthetic_size", "8", "must be >= 21"),
    ("data.synthetic_positive_rate", "1.5", r"must be in \(0, 1\)"),
    ("data.synthetic_positive_rate", "0", r"must be in \(0, 1\)"),
    ("data.synthetic_layout", "imagenet", "is not one of"),
    ("data.synthetic_seed", "-1", "must be >= 0"),
    ("data.split_seed", "-1", r"must be in \[0, 4294967295\]"),
]


@pytest.mark.parametrize("key,value,match", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_out_of_range_is_refused_everywhere_naming_the_key(tmp_path, capsys, key, value, match):
    pattern = match if match.startswith(key.split(".")[0]) else rf"{re.escape(key)}.*{match}"
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=pattern):
        replace(Config(), **{key: value})
    section, name = key.split(".")
    p = tmp_path / "c.yaml"
    p.write_text(f"{section}:\n  {name}: {'[' + value + ']' if ',' in value else value}\n".replace("nan", ".nan")
                 .replace("inf", ".inf"))
    with pytest.raises(ConfigError, match=pattern):
        load_config(p)
    # `fastlesion config` refuses what `train` would: one line, exit status 2
    assert main(["config", f"--{key}", value]) == 2
    assert key in _one_error_line(capsys)


GOOD_EDGES = {"optim.ema_decay": 0.0, "loader.hflip": 1.0, "loader.vflip": 0.0, "loader.hue": 0.5, "loader.rotate": 180,
              "optim.min_lr_ratio": 1.0, "optim.gamma": 1.0, "train.steps_per_epoch": 1, "optim.clip_grad": None,
              "optim.label_smoothing": 0.0, "loader.eval_batch_size": 1, "data.limit": 1, "train.patience": 0,
              "loader.prefetch": 1, "optim.warmup_epochs": 0, "loader.aug_strength": 0, "model.drop_rate": 0.0,
              "optim.betas": (0.0, 0.999), "data.synthetic_size": 21, "loader.ratio": (1.0, 1.0),
              "optim.momentum": 0.0, "optim.weight_decay": 0.0, "data.split_seed": 2**32 - 1}


def test_edges_of_the_ranges_are_accepted():
    cfg = replace(Config(), GOOD_EDGES)
    assert cfg.optim.ema_decay == 0.0 and cfg.loader.hue == 0.5 and cfg.train.steps_per_epoch == 1
    assert load_config(None, {"data.synthetic_size": 21}).data.synthetic_size == 21


@pytest.mark.parametrize("args,key", [
    (["--lr", "nan"], "optim.lr"),
    (["--lr", "inf"], "optim.lr"),
    (["--optim.label_smoothing", "2"], "optim.label_smoothing"),
    (["--optim.ema_decay", "5"], "optim.ema_decay"),
    (["--train.steps_per_epoch", "0"], "train.steps_per_epoch"),
])
def test_train_refuses_before_anything_starts(tmp_path, capsys, args, key):
    out = tmp_path / "run"
    assert main(["train", "--model", "lenet", "--out", str(out), *args]) == 2
    assert key in _one_error_line(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- item 7: one line
def test_oserror_with_a_path_is_one_line(capsys):
    def body() -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "runs/x/metrics.csv")

    assert run_command(body) == 2
    assert _one_error_line(capsys) == "error: runs/x/metrics.csv: Read-only file system"

    def perm() -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "runs/x")

    assert run_command(perm) == 2
    assert _one_error_line(capsys) == "error: runs/x: Permission denied"

    def rename() -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), "a.tmp", None, "b")  # as os.replace raises

    assert run_command(rename) == 2
    assert _one_error_line(capsys) == f"error: a.tmp -> b: {os.strerror(errno.EXDEV)}"


def test_disk_full_without_a_path_is_one_line(capsys):
    def body() -> int:  # what a write() to an open file raises: no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert run_command(body) == 2
    assert _one_error_line(capsys) == "error: No space left on device (ENOSPC)"


def test_unexpected_exception_is_a_bug_report(capsys):
    def body() -> int:
        raise ZeroDivisionError("boom")

    assert run_command(body) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and "ZeroDivisionError: boom" in err[-2]
    assert err[-1] == f"fastlesion {fastlesion.__version__}: this is a bug; please report it with the traceback above"

    def no_errno() -> int:  # an OSError with no errno is a library's own error, not the machine's
        raise OSError("something odd")

    assert run_command(no_errno) == 1
    assert "this is a bug" in capsys.readouterr().err


def _ro_mkdir(monkeypatch, ro: Path, code: int) -> None:
    """Every mkdir under ``ro`` fails as on a read-only file system (or a full disk): works as root too."""
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if str(Path(self).absolute()).startswith(str(ro.absolute())):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)


TRAIN_ARGS = ["train", "--model", "lenet", "--image-size", "32", "--epochs", "1", "--backend", "torch",
              "--workers", "0", "--quiet", "--data.synthetic_n", "40", "--data.synthetic_size", "32"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_train_out_on_a_read_only_or_full_disk(tmp_path, capsys, monkeypatch, code):
    ro = tmp_path / "ro"
    _ro_mkdir(monkeypatch, ro, code)
    assert main([*TRAIN_ARGS, "--out", str(ro / "run")]) == 2
    line = _one_error_line(capsys)
    assert str(ro) in line and line.endswith(os.strerror(code)), line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_train_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main([*TRAIN_ARGS, "--out", str(ro / "run")]) == 2
        line = _one_error_line(capsys)
        assert str(ro / "run") in line and "Permission denied" in line, line
    finally:
        ro.chmod(0o700)


def test_the_cli_entry_reports_an_oserror_of_a_command(capsys, monkeypatch):
    def cmd_config(args, extra):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/config.yaml")

    monkeypatch.setattr(cli, "cmd_config", cmd_config)
    assert main(["config"]) == 2
    assert _one_error_line(capsys) == "error: out/config.yaml: No space left on device"


# --------------------------------------------------------------------------------------------------- item 12: Ray
@pytest.fixture
def res():
    pytest.importorskip("ray")
    from fastlesion.tune import resources

    return resources


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _dead_pid(psutil) -> tuple[int, float]:
    """(pid, create time) of a process that has ended: a driver killed with kill -9."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    create = psutil.Process(p.pid).create_time()
    p.kill()
    p.wait()
    return p.pid, create


def _holder(session: Path, ray_like: bool) -> subprocess.Popen:
    """A process holding a file of ``session`` open; ``ray_like``: its arguments name a file of Ray's package (as
    Ray's own Python processes do); otherwise a bystander (a `tail -f` of the logs)."""
    import ray

    ready = session / f"ready-{ray_like}"
    code = (f"import sys, time; f = open({str(session / 'logs' / 'worker.out')!r}, 'a'); "
            f"open({str(ready)!r}, 'w').close(); time.sleep(120)")
    extra = [str(Path(ray.__file__).resolve())] if ray_like else ["bystander"]
    p = _spawn([sys.executable, "-c", code, *extra])
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    return p


def _marker(res, folder: Path, name: str, driver: tuple[int, float], processes: list, session: Path | None,
            host: str | None = None) -> Path:
    psutil = res._psutil()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({
        "host": host or socket.gethostname(), "boot_time": psutil.boot_time(),
        "driver": {"pid": driver[0], "create_time": driver[1], "name": "python"},
        "session_dir": str(session) if session else None, "started": "earlier",
        "processes": [{"pid": p.pid, "create_time": psutil.Process(p.pid).create_time(), "name": "x"}
                      for p in processes]}))
    return path


def _alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def test_leftover_ray_of_a_dead_driver_is_stopped(res, tmp_path, caplog):
    psutil = res._psutil()
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    recorded = _spawn(["sleep", "60"])
    worker, bystander = _holder(session, True), _holder(session, False)
    try:
        marker = _marker(res, tmp_path / "m", "dead", _dead_pid(psutil), [recorded], session)
        found = res.find_leftover_rays(tmp_path / "m")
        assert len(found) == 1 and found[0].pids == sorted([recorded.pid, worker.pid])  # never the bystander
        with caplog.at_level("WARNING"):
            res.stop_leftover_rays(tmp_path / "m", timeout=5)
        for p in (recorded, worker):
            p.wait(timeout=10)
        assert _alive(bystander) and not marker.exists()
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 1 and "stopped 2 leftover process(es)" in msgs[0] and str(session) in msgs[0]
    finally:
        for p in (recorded, worker, bystander):
            p.kill()
            p.wait()


def test_a_running_search_and_other_machines_are_left_alone(res, tmp_path):
    psutil = res._psutil()
    recorded = _spawn(["sleep", "60"])
    try:
        me = psutil.Process()
        running = _marker(res, tmp_path, "running", (me.pid, me.create_time()), [recorded], None)
        other = _marker(res, tmp_path, "other", _dead_pid(psutil), [recorded], None, host="another-machine")
        assert res.find_leftover_rays(tmp_path) == []
        assert res.stop_leftover_rays(tmp_path) == []
        assert _alive(recorded) and running.exists() and other.exists()
    finally:
        recorded.kill()
        recorded.wait()


def test_a_reused_pid_is_not_stopped_and_stale_markers_go(res, tmp_path):
    psutil = res._psutil()
    recorded = _spawn(["sleep", "60"])
    try:
        reused = _marker(res, tmp_path, "reused", _dead_pid(psutil), [recorded], None)
        m = json.loads(reused.read_text())
        m["processes"][0]["create_time"] -= 3600  # the recorded process started an hour earlier: another one
        reused.write_text(json.dumps(m))
        garbage = tmp_path / "garbage.json"
        garbage.write_text("{not json")
        assert res.find_leftover_rays(tmp_path) == []
        assert _alive(recorded) and not reused.exists() and not garbage.exists()
    finally:
        recorded.kill()
        recorded.wait()


def test_what_cannot_be_stopped_gets_the_kill_command(res, tmp_path, caplog, monkeypatch):
    psutil = res._psutil()
    recorded = _spawn(["sleep", "60"])
    try:
        marker = _marker(res, tmp_path, "dead", _dead_pid(psutil), [recorded], None)

        def denied(self):
            raise psutil.AccessDenied(self.pid)

        monkeypatch.setattr(psutil.Process, "terminate", denied)
        monkeypatch.setattr(psutil.Process, "kill", denied)
        with caplog.at_level("WARNING"):
            res.stop_leftover_rays(tmp_path, timeout=0.1)
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 1 and f"`kill -9 {recorded.pid}`" in msgs[0] and "ray stop" in msgs[0], msgs
        assert _alive(recorded) and marker.exists()  # reminded again at the next start
    finally:
        monkeypatch.undo()
        recorded.kill()
        recorded.wait()


@pytest.mark.slow
def test_a_local_ray_session_writes_its_marker_and_stops_leftovers(res, tmp_path, monkeypatch):
    """The marker of the running session records the driver and Ray's processes; it goes with Ray. A leftover of
    an earlier, killed search is stopped when the next local Ray starts."""
    from fastlesion.tune.settings import TuneSettings

    psutil = res._psutil()
    monkeypatch.setenv("FASTLESION_CACHE", str(tmp_path / "cache"))
    leftover = _spawn(["sleep", "60"])
    try:
        _marker(res, res.local_ray_dir(), "vm-1", _dead_pid(psutil), [leftover], None)
        with res.ray_session(TuneSettings(gpus_per_trial=0, cpus_per_trial=1), None):
            assert leftover.wait(timeout=10) is not None
            m = json.loads(res.local_ray_marker().read_text())
            assert m["driver"]["pid"] == os.getpid() and m["host"] == socket.gethostname()
            assert "raylet" in {p["name"] for p in m["processes"]} and m["session_dir"]
            assert res.find_leftover_rays() == []  # this search is running: not a leftover
        assert not res.local_ray_marker().exists()
        assert [p.name for p in res.local_ray_dir().iterdir()] == []
    finally:
        leftover.kill()
        leftover.wait()


def test_a_full_disk_wrapped_by_a_library_is_one_line(capsys):
    def body() -> int:  # torch.save on a full disk: RuntimeError("... unexpected pos ...") raised while handling it
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    assert run_command(body) == 1  # `from None` drops the context: nothing says it was the disk
    assert "this is a bug" in capsys.readouterr().err

    def wrapped() -> int:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/last.pt.tmp")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    assert run_command(wrapped) == 2
    assert _one_error_line(capsys) == "error: runs/x/last.pt.tmp: No space left on device"


def test_too_few_groups_names_data_num_folds():
    import numpy as np

    from fastlesion.data.splits import assign_folds
    from fastlesion.errors import DatasetError

    with pytest.raises(DatasetError, match="data.num_folds=5"):
        assign_folds(np.array([0, 1, 0]), np.arange(3), num_folds=5, seed=0)
    with pytest.raises(DatasetError, match="data.holdout=0.2 and data.num_folds=5"):
        assign_folds(np.array([0, 1, 0, 1, 0, 1]), np.arange(6), num_folds=5, seed=0, holdout=0.2)


def test_checkpoint_on_a_full_disk_is_one_oserror_naming_the_file(tmp_path, monkeypatch):
    import errno

    import torch

    from fastlesion.engine import checkpoint as ckpt

    def full(obj, f):
        try:
            f.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:  # torch wraps the write error in a RuntimeError
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: unexpected pos") from e

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left on device") as info:
        ckpt.save_atomic({"a": 1}, tmp_path / "best.pt")
    assert info.value.filename == str(tmp_path / "best.pt.tmp") and not (tmp_path / "best.pt.tmp").exists()
