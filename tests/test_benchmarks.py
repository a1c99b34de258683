"""Smoke tests of the benchmarks (tiny settings, CPU) and of the cross-machine comparison."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import read_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks/ package lives at the repo root

from benchmarks import common, compare, end_to_end, loader_throughput, train_throughput  # noqa: E402

TRAIN_KEYS = {"bench", "model", "mode", "compile", "amp", "channels_last", "image_size", "batch_size",
              "requested_batch_size", "images_per_s", "step_ms", "compile_seconds", "peak_mem_mb", "status", "error",
              "device_name", "notes", "timestamp", "fingerprint", "settings"}
E2E_KEYS = {"model", "mode", "backend", "loader_device", "batch_size", "image_size", "workers", "images_per_s",
            "synthetic_images_per_s", "fraction_of_synthetic", "data_wait_ms", "gpu_util_mean", "gpu_mem_mb",
            "cpu_util_percent", "device_name", "fingerprint", "settings", "status"}






# ------------------------------------------------------------------------------------------------ helpers
def test_mode_names_round_trip():
    modes = common.all_modes()
    assert len(modes) == 12 and len(set(modes)) == 12
    assert modes[0] == "eager-fp32-nchw" and "compile-bf16-cl" in modes
    for m in modes:
        assert common.mode_name(*common.parse_mode(m)) == m
    with pytest.raises(ValueError, match="eager|compile"):
        common.parse_mode("jit-fp32-nchw")


def test_mode_ratios_pairs_one_switch():
    rows = [{"model": "m", "image_size": 32, "batch_size": 4, "mode": mode, "images_per_s": v, "status": "ok"}
            for mode, v in [("eager-fp32-nchw", 10.0), ("eager-bf16-nchw", 20.0), ("eager-fp32-cl", 15.0),
                            ("compile-fp32-nchw", 30.0), ("compile-bf16-cl", 80.0)]]
    rows.append({**rows[0], "mode": "eager-fp16-nchw", "images_per_s": 99.0, "status": "failed"})
    by = {r["comparison"]: r for r in common.mode_ratios(rows)}
    assert by["bf16 AMP vs fp32"]["ratio"] == pytest.approx(2.0)
    assert by["channels_last vs NCHW"]["ratio"] == pytest.approx(1.5)
    assert by["compile vs eager"]["ratio"] == pytest.approx(3.0)
    assert "fp16 AMP vs fp32" not in by  # failed rows do not count
    assert by["best vs eager-fp32-nchw"]["ratio"] == pytest.approx(8.0)
    assert by["best vs eager-fp32-nchw"]["pairs"][0][1] == "compile-bf16-cl"


def test_gpu_sampler_without_gpu_or_nvml_never_raises():
    s = common.GpuSampler(torch.device("cpu")).start()
    summary = s.stop()
    assert summary["gpu_util_mean"] is None and summary["gpu_mem_mb"] is None and "no GPU" in summary["gpu_note"]
    if not torch.cuda.is_available():  # a CUDA device asked for where there is none / no NVML: a note, no crash
        with common.GpuSampler(torch.device("cuda", 0)) as s:
            time.sleep(0.05)
        assert s.summary()["gpu_util_mean"] is None and s.summary()["gpu_note"]


def test_cpu_meter_sees_work():
    meter = common.CpuMeter().start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        sum(range(1000))
    res = meter.stop()
    assert res["cpu_cores"] >= 1
    assert res["proc_cpu_percent"] > 0
    assert res["cpu_util_percent"] is None or 0 <= res["cpu_util_percent"] <= 100.5


def test_append_jsonl_appends_and_cleans(tmp_path):
    out = tmp_path / "sub" / "r.jsonl"
    common.append_jsonl(out, {"a": 1.0, "b": float("nan"), "d": torch.float16})
    common.append_jsonl(out, [{"a": 2}])
    rows = read_rows(out)
    assert rows == [{"a": 1.0, "b": None, "d": "torch.float16"}, {"a": 2}]


# ------------------------------------------------------------------------------------------------ train_throughput
def test_train_throughput_quick_writes_rows(tmp_path, one_thread):
    out = tmp_path / "train.jsonl"
    rows = train_throughput.run(["--quick", "--models", "lenet,resnet18", "--modes",
                                 "eager-fp32-nchw,eager-bf16-nchw", "--out", str(out)])
    written = read_rows(out)
    assert len(rows) == len(written) == 4
    for r in written:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert r["status"] == "ok", r["error"]
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_mb"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["step_ms"], rel=0.01)
        assert r["batch_size"] == r["requested_batch_size"] == 4 and r["image_size"] == 32
        assert r["compile_seconds"] is None and r["compile"] is False
        assert isinstance(r["fingerprint"], dict) and r["fingerprint"]
        assert r["settings"]["steps"] == 2 and r["settings"]["quick"] is True
        assert r["device_name"]
        if not torch.cuda.is_available():
            assert r["device"] == "cpu" and "no GPU" in r["notes"]
    assert {(r["model"], r["mode"]) for r in written} == {(m, k) for m in ("lenet", "resnet18")
                                                          for k in ("eager-fp32-nchw", "eager-bf16-nchw")}
    assert {r["amp"] for r in written} == {"fp32", "bf16"}


def test_train_throughput_compile_row(tmp_path, one_thread, capsys):
    out = tmp_path / "compile.jsonl"
    rows = train_throughput.run(["--quick", "--models", "lenet", "--modes", "eager-fp32-nchw,compile-fp32-nchw",
                                 "--out", str(out)])
    by = {r["mode"]: r for r in read_rows(out)}
    assert len(rows) == 2
    row = by["compile-fp32-nchw"]
    assert row["compile"] is True
    if row["status"] == "ok":
        assert row["compile_seconds"] is not None and row["compile_seconds"] >= 0
        assert row["first_step_s"] >= row["compile_seconds"]
        assert "compile vs eager" in capsys.readouterr().out
    else:  # no C++ toolchain: recorded as failed, the run went on
        assert row["status"] == "failed" and row["error"]
    assert by["eager-fp32-nchw"]["status"] == "ok"


def test_train_throughput_halves_batch_on_oom_and_records_failures(tmp_path, monkeypatch):
    calls = []

    def fake_measure(name, image_size, batch, mode, device, args):
        calls.append((name, batch))
        if name == "broken":
            raise RuntimeError("Compilation failed\nlong traceback line")
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"images_per_s": 10.0, "step_ms": 100.0, "first_step_s": 1.0, "compile_seconds": None,
                "peak_mem_mb": 1.0}

    monkeypatch.setattr(train_throughput, "measure_case", fake_measure)
    out = tmp_path / "oom.jsonl"
    rows = train_throughput.run(["--models", "broken,lenet", "--modes", "eager-fp32-nchw", "--batch-sizes", "4",
                                 "--image-sizes", "32", "--out", str(out)])
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"] == "RuntimeError: Compilation failed" and rows[0]["images_per_s"] is None
    assert calls == [("broken", 4), ("lenet", 4), ("lenet", 2), ("lenet", 1)]
    assert rows[1]["batch_size"] == 1 and rows[1]["requested_batch_size"] == 4
    assert "out of memory at batch 4" in rows[1]["notes"] and "out of memory at batch 2" in rows[1]["notes"]
    assert len(read_rows(out)) == 2


def test_train_throughput_bad_mode_is_a_clear_error():
    with pytest.raises(SystemExit, match="fp64"):
        train_throughput.run(["--quick", "--modes", "eager-fp64-nchw"])


# ------------------------------------------------------------------------------------------------ end_to_end
def test_end_to_end_quick_writes_rows(tmp_path, one_thread):
    from fastlesion.data.loader import dali_available

    out = tmp_path / "e2e.jsonl"
    backends = ["torch"] + (["dali-cpu"] if dali_available() else [])
    rows = end_to_end.run(["--quick", "--backends", ",".join(backends), "--out", str(out)])
    written = read_rows(out)
    assert len(rows) == len(written) == len(backends)
    for r, backend in zip(written, backends):
        assert E2E_KEYS <= set(r), E2E_KEYS - set(r)
        assert r["status"] == "ok", r["error"]
        assert r["backend"] == backend and r["loader_backend"] == backend.split("-")[0]
        assert r["images_per_s"] > 0 and r["synthetic_images_per_s"] > 0 and r["data_wait_ms"] >= 0
        assert r["fraction_of_synthetic"] == pytest.approx(r["images_per_s"] / r["synthetic_images_per_s"],
                                                           rel=1e-3)
        assert r["batch_size"] == 8 and r["image_size"] == 64 and r["workers"] == 1 and r["num_images"] == 32
        assert r["mode"] == common.mode_name(r["compile"], r["amp"], r["channels_last"])
        assert r["cpu_util_percent"] is None or r["cpu_util_percent"] >= 0
        assert r["proc_cpu_percent"] > 0
        if not torch.cuda.is_available():
            assert r["gpu_util_mean"] is None and r["gpu_mem_mb"] is None and "GPU" in r["notes"]
            assert r["loader_device"] == "cpu"


def test_end_to_end_flags_rows_a_busy_machine_spoilt():
    ok = {"synthetic_images_per_s_before": 100.0, "synthetic_images_per_s_after": 110.0, "fraction_of_synthetic": 0.8}
    assert end_to_end.drift_warning(ok) is None
    drift = end_to_end.drift_warning({**ok, "synthetic_images_per_s_after": 300.0})
    assert drift.startswith("unreliable") and "100.0 -> 300.0" in drift
    assert "12.90x" in end_to_end.drift_warning({**ok, "fraction_of_synthetic": 12.9})


def test_end_to_end_dali_gpu_without_gpu_is_skipped_not_crashed(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    monkeypatch.setattr(end_to_end, "measure_backend", lambda *a, **k: pytest.fail("must not measure"))
    rows = end_to_end.run(["--quick", "--backends", "dali-gpu", "--out", str(tmp_path / "x.jsonl")])
    assert rows[0]["status"] == "skipped" and "CUDA" in rows[0]["error"]


# ------------------------------------------------------------------------------------------------ loader
def test_loader_throughput_smoke_rows_and_compare(tmp_path, one_thread):
    from fastlesion.data.loader import dali_available

    out = tmp_path / "loader.jsonl"
    backends = ["torch"] + (["dali-cpu"] if dali_available() else [])
    argv = ["--scales", "medium", "--n", "24", "--threads", "1", "--batch-size", "4", "--image-size", "32",
            "--repeats", "2", "--warmup", "1", "--warmup-epochs", "0", "--backends", ",".join(backends),
            "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert loader_throughput.main(argv) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == backends
    for r in rows:
        for key in ("backend", "device", "image_scale", "threads", "images_per_s", "fingerprint"):
            assert key in r, key
        assert set(common.REQUIRED_KEYS) <= set(r)
        assert r["image_scale"] == "medium" and r["threads"] == 1 and r["images_per_s"] > 0
        assert len(r["runs_images_per_s"]) == 2 and r["timed_images_per_repeat"] == 20  # 24 images, 1 batch dropped
        assert r["image_dims"] == "600x450" and r["device"] == "cpu"
    assert rows[0]["ratio_vs_torch"] == pytest.approx(1.0)
    if len(rows) == 2:
        assert rows[1]["ratio_vs_torch"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"], rel=0.01)
    res = compare.compare([str(out)], out=tmp_path / "cmp", plots=False)  # loader rows merge like the others
    assert {c.split(" ")[0] for c in res["table"]["config"]} == set(backends)


# ------------------------------------------------------------------------------------------------ compare
def _row(model, mode, ips, fp, device, bench="train_step", **kw):
    return {"bench": bench, "model": model, "mode": mode, "batch_size": 64, "requested_batch_size": 64,
            "image_size": 224, "images_per_s": ips, "device_name": device, "status": "ok", "fingerprint": fp, **kw}


def test_compare_two_machines(tmp_path):
    cpu_fp = {"cpu": {"model": "Intel Xeon Test", "cores": 2}, "hostname": "box", "ram_gb": 24}
    gpu_fp = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920}], "hostname": "gpu1"}
    a, b = tmp_path / "cpu.jsonl", tmp_path / "gpu.jsonl"
    common.append_jsonl(a, [_row("resnet18", "eager-fp32-nchw", 10.0, cpu_fp, "cpu: Intel Xeon Test"),
                            _row("resnet18", "eager-fp32-nchw", 14.0, cpu_fp, "cpu: Intel Xeon Test"),  # median 12
                            _row("resnet50", "eager-fp32-nchw", 4.0, cpu_fp, "cpu: Intel Xeon Test"),
                            _row("resnet50", "eager-bf16-cl", 5.0, cpu_fp, "cpu: Intel Xeon Test",
                                 status="failed"),
                            _row("resnet18", "eager-fp32-nchw", 5.0, cpu_fp, "cpu: Intel Xeon Test",
                                 bench="end_to_end", backend="torch")])
    common.append_jsonl(b, [_row("resnet18", "eager-fp32-nchw", 600.0, gpu_fp, "NVIDIA A100-SXM4-80GB"),
                            _row("resnet50", "eager-fp32-nchw", 400.0, gpu_fp, "NVIDIA A100-SXM4-80GB"),
                            _row("resnet50", "eager-bf16-cl", 1000.0, gpu_fp, "NVIDIA A100-SXM4-80GB"),
                            _row("resnet18", "eager-fp32-nchw", 500.0, gpu_fp, "NVIDIA A100-SXM4-80GB",
                                 bench="end_to_end", backend="torch")])
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b), "--out", str(out)]) == 0
    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    cpu_m, gpu_m = "Intel Xeon Test (2 cores) @ box", "NVIDIA A100-SXM4-80GB"
    by = {(r["bench"], r["model"], r["config"]): r for r in table}
    assert len(by) == 4
    r18 = by[("train_step", "resnet18", "eager-fp32-nchw")]
    assert float(r18[cpu_m]) == pytest.approx(12.0) and float(r18[f"{cpu_m} / ref"]) == pytest.approx(1.0)
    assert float(r18[f"{gpu_m} / ref"]) == pytest.approx(50.0)
    assert float(by[("train_step", "resnet50", "eager-fp32-nchw")][f"{gpu_m} / ref"]) == pytest.approx(100.0)
    only_gpu = by[("train_step", "resnet50", "eager-bf16-cl")]  # the CPU row failed: no reference, no ratio
    assert float(only_gpu[gpu_m]) == pytest.approx(1000.0) and only_gpu[f"{gpu_m} / ref"] == ""
    assert float(by[("end_to_end", "resnet18", "torch eager-fp32-nchw")][f"{gpu_m} / ref"]) == pytest.approx(100.0)
    md = (out / "comparison.md").read_text()
    assert "Reference: **Intel Xeon Test (2 cores) @ box**" in md and "600.0 (50.00x)" in md and "no GPU" in md
    for model in ("resnet18", "resnet50"):
        png = out / f"{model}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = compare.compare([str(a), str(b)], reference="a100", out=tmp_path / "cmp2", plots=False)
    assert res["reference"] == gpu_m
    t = res["table"].set_index(["bench", "model", "config"])
    assert t.loc[("train_step", "resnet18", "eager-fp32-nchw"), f"{cpu_m} / ref"] == pytest.approx(0.02)
    assert math.isnan(t.loc[("train_step", "resnet50", "eager-bf16-cl"), cpu_m])
    for ref in ("gpu", "gpu.jsonl", str(b)):  # the README's `--reference lab` names a result file
        res = compare.compare([str(a), str(b)], reference=ref, out=tmp_path / "cmp4", plots=False)
        assert res["reference"] == gpu_m
    with pytest.raises(SystemExit, match="matches no machine"):
        compare.compare([str(a), str(b)], reference="H100", out=tmp_path / "cmp3", plots=False)


# ------------------------------------------------------------------------------------------------ one way to measure
CPU_METER_KEYS = {"cpu_util_percent", "proc_cpu_percent", "cpu_cores"}


def test_build_training_wraps_with_trainings_wrap_model(monkeypatch):
    from fastlesion.engine import runtime

    calls = []

    def spy(raw, rt, ddp=False):
        calls.append((rt, ddp))
        return runtime.wrap_model(raw, rt, ddp)

    monkeypatch.setattr(common, "wrap_model", spy)
    rt = common.make_runtime(torch.device("cpu"), False, "fp32", True)
    s = common.build_training("lenet", 2, rt)
    assert calls == [(rt, False)]
    assert s.model is s.raw and s.raw.training  # eager: the step calls the raw module, in train mode
    assert next(s.raw.parameters()).device.type == "cpu"
    assert not hasattr(common, "setup_backends")  # the backend switches live in Runtime.set_backends only


def test_benchmark_error_is_a_fastlesion_error_and_a_system_exit():
    from fastlesion.errors import FastlesionError

    e = common.BenchmarkError("--modes: bad")
    assert isinstance(e, FastlesionError) and isinstance(e, SystemExit)
    assert e.code == "--modes: bad" and str(e) == "--modes: bad"


def test_loader_throughput_rows_like_the_others_and_no_fast_idct(tmp_path, one_thread, monkeypatch):
    from fastlesion.data.loader import dali_available

    configs = []
    make_loader = loader_throughput.make_loader

    def spy(backend, table, cfg, image_size, device):
        configs.append((backend, cfg))
        return make_loader(backend, table, cfg, image_size, device)

    monkeypatch.setattr(loader_throughput, "make_loader", spy)
    out = tmp_path / "loader.jsonl"
    backends = ["torch"] + (["dali-cpu"] if dali_available() else [])
    argv = ["--scales", "medium", "--n", "12", "--threads", "1", "--batch-size", "4", "--image-size", "32",
            "--repeats", "1", "--warmup", "1", "--warmup-epochs", "0", "--backends", ",".join(backends),
            "--cache", str(tmp_path / "cache"), "--no-fast-idct", "--out", str(out)]
    assert loader_throughput.main(argv) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == backends
    assert [b for b, _ in configs] == backends and all(cfg.fast_idct is False for _, cfg in configs)
    for r in rows:
        assert set(common.REQUIRED_KEYS) | CPU_METER_KEYS <= set(r), set(common.REQUIRED_KEYS) - set(r)
        assert {"bench", "timestamp", "machine", "fingerprint", "settings", "status"} <= set(r)
        assert r["bench"] == "loader_throughput" and r["status"] == "ok" and r["error"] is None
        assert r["proc_cpu_percent"] > 0 and r["cpu_cores"] >= 1 and r["cpu_ms_per_image"] > 0
        assert r["timed_images_per_repeat"] == 8  # 12 images, 1 batch of 4 dropped
        assert r["device_name"] == common.base_row("x", common.resolve_device("auto"), {})["device_name"]
        assert r["settings"]["no_fast_idct"] is True
        assert r["fast_idct"] is (False if r["backend"] == "dali" else None)
    assert rows[0]["backend"] == "torch" and rows[0]["device"] == "cpu"
    if len(rows) == 2:
        assert rows[1]["backend"] == "dali" and rows[1]["device"] == "cpu"


def test_loader_config_carries_fast_idct():
    assert common.loader_config("dali-cpu", 4, 1, fast_idct=False).fast_idct is False
    cfg = common.loader_config("dali-gpu", 4, 2)
    assert (cfg.backend, cfg.device, cfg.batch_size, cfg.workers, cfg.fast_idct) == ("dali", "gpu", 4, 2, True)
    assert common.loader_config("torch", 4, 1).backend == "torch"


BAD_FLAGS = [
    (train_throughput, ["--quick", "--modes", "eager-fp64-nchw"], "fp64"),
    (train_throughput, ["--quick", "--batch-sizes", "four"], "--batch-sizes"),
    (end_to_end, ["--quick", "--backends", "torch,bogus"], "bogus"),
    (end_to_end, ["--quick", "--backends", "torch", "--data", "/nonexistent/isic"], "/nonexistent/isic"),
    (loader_throughput, ["--scales", "huge"], "huge"),
    (loader_throughput, ["--backends", "torch,dali-tpu"], "dali-tpu"),
    (compare, ["/nonexistent/results.jsonl"], "not found"),
    (compare, ["/nonexistent/results.jsonl", "--label", "oops"], "FILE=NAME"),
]


@pytest.mark.parametrize("script,argv,needle", BAD_FLAGS,
                         ids=[f"{s.__name__.split('.')[-1]}:{a[-1]}" for s, a, _ in BAD_FLAGS])
def test_bad_flag_value_is_one_error_line_and_status_2(script, argv, needle, tmp_path, capsys):
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.parametrize("script", [train_throughput, end_to_end])
def test_device_cuda_without_cuda_is_one_error_line(script, capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert script.main(["--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "CUDA" in err[0], err


def test_compare_keeps_loader_rows_of_other_augmentation_apart():
    row = {"bench": "loader_throughput", "mode": "torch", "image_scale": "large", "settings": {"aug_strength": 1.0}}
    assert compare.row_config(row) == "torch large"
    assert compare.row_config({**row, "settings": {"aug_strength": 0.0}}) == "torch large aug0"
    assert compare.row_config({**row, "settings": {"aug_strength": 0.5}}) == "torch large aug0.5"
    assert compare.row_config({k: v for k, v in row.items() if k != "settings"}) == "torch large"  # older rows


def test_compare_bad_metric_is_one_error_line(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    common.append_jsonl(f, _row("resnet18", "eager-fp32-nchw", 10.0, {"hostname": "box"}, "cpu: X"))
    assert compare.main([str(f), "--metric", "images_per_fortnight", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images_per_fortnight" in err[0], err


def test_loader_throughput_as_a_script_fails_with_one_error_line(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_throughput.py"
    res = subprocess.run([sys.executable, str(script), "--scales", "huge"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: --scales")


# ------------------------------------------------------------------------------------------------ loader peers
PEER_ARGV = ["--threads", "1", "--batch-size", "4", "--image-size", "32", "--repeats", "1", "--warmup", "1",
             "--warmup-epochs", "0"]


def test_loader_throughput_peers_yield_rows_and_the_default_vs_best_peer_line(tmp_path, one_thread, capsys):
    out = tmp_path / "peers.jsonl"
    argv = ["--scales", "medium", "--n", "12", *PEER_ARGV, "--backends", ",".join(loader_throughput.PEERS),
            "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert loader_throughput.main(argv) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["torch", *loader_throughput.PEERS]  # torch is always there (the ratio)
    best = max((r for r in rows if r["peer"]), key=lambda r: r["images_per_s"])
    for r in rows:
        assert set(common.REQUIRED_KEYS) <= set(r)
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["timed_images_per_repeat"] == 8
        assert r["backend"] == r["mode"] and r["device"] == ("gpu" if r["mode"] == "torchvision-decode"
                                                             and torch.cuda.is_available() else "cpu")
        assert r["peer"] is (r["mode"] != "torch")
        assert r["augmentation"].startswith("rrc(0.35-1, 0.75-1.33) hflip 0.5 vflip 0.5 rotate 30 jitter(")
        assert r["best_peer"] == best["mode"]
        assert r["vs_best_peer"] == pytest.approx(r["images_per_s"] / best["images_per_s"], rel=0.01)
    lines = capsys.readouterr().out.strip().splitlines()
    from fastlesion.data.loader import dali_available

    # auto's choice for these images: DALI on a GPU; on CPU 600x450 px for 32 px outputs is torch, DCT-scaled
    default = "dali-gpu" if torch.cuda.is_available() and dali_available() else "torch"
    assert {r["default_backend"] for r in rows} == {default}
    assert lines[-1].startswith(f"medium: default {default} vs best peer {best['mode']}: ")
    if default == "torch":
        assert lines[-1].endswith(f"{rows[0]['vs_best_peer']:.2f}x")


def test_loader_throughput_decode_bound_row_and_ratios_to_pil_and_to_it(tmp_path, one_thread, capsys):
    out = tmp_path / "bound.jsonl"
    argv = ["--scales", "medium", "--n", "8", *PEER_ARGV, "--backends", "torch,pil,decode-bound",
            "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert loader_throughput.main(argv) == 0
    rows = {r["mode"]: r for r in read_rows(out)}
    assert list(rows) == ["torch", "pil", "decode-bound"]
    bound, pil = rows["decode-bound"], rows["pil"]
    assert bound["bound"] is True and bound["peer"] is False and rows["torch"]["bound"] is False
    assert bound["timed_images_per_repeat"] == 4 and bound["best_peer"] == "pil"  # a ceiling, never a peer
    for r in rows.values():
        assert r["vs_pil"] == pytest.approx(r["images_per_s"] / pil["images_per_s"], rel=0.01)
        assert r["vs_decode_bound"] == pytest.approx(r["images_per_s"] / bound["images_per_s"], rel=0.01)
    lines = capsys.readouterr().out.strip().splitlines()
    default = rows["torch"]["default_backend"]
    if default == "torch":  # the summary: vs pil, vs the bound, and last (the contract) vs the best peer
        assert lines[-3] == f"medium: default torch vs pil: {rows['torch']['vs_pil']:.2f}x"
        assert lines[-2] == (f"medium: default torch vs decode-bound: {rows['torch']['vs_decode_bound']:.2f}x "
                             f"(decode-bound vs pil: {bound['vs_pil']:.2f}x)")
    assert lines[-1].startswith(f"medium: default {default} vs best peer pil: ")
    assert "decode-bound" not in loader_throughput.parse_args([]).backends  # named, never run by default


def test_decode_only_decodes_at_the_scale_the_crop_needs(tmp_path, monkeypatch):
    from PIL import Image

    from fastlesion.data import decode

    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (200, 120, 90)).save(big, quality=90)
    seen = []
    real = decode.decode_scaled
    monkeypatch.setattr(decode, "decode_scaled", lambda im, o, f, **kw: seen.append(f) or real(im, o, f, **kw))
    torch.manual_seed(0)
    for _ in range(20):
        assert loader_throughput.decode_only(str(big), 224, (0.35, 1.0), (3 / 4, 4 / 3)).numel() == 0
    torch.manual_seed(0)  # the same draws as the torch loader's crop: the same factors
    want = [decode.dct_factor(min(decode.draw_crop(1800, 2400, (0.35, 1.0), (3 / 4, 4 / 3))[2:]), 224)
            for _ in range(20)]
    assert seen == want and len(set(want)) > 1  # a per-crop choice (4 and 8 here)


def test_loader_throughput_peers_same_augmentation_off_for_every_row(tmp_path, one_thread):
    from PIL import Image

    from fastlesion.data.transforms import jitter

    out = tmp_path / "peers.jsonl"
    argv = ["--scales", "medium", "--n", "8", *PEER_ARGV, "--backends", "torch,pil", "--aug-strength", "0",
            "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert loader_throughput.main(argv) == 0
    rows = read_rows(out)
    assert {r["augmentation"] for r in rows} == {"rrc(0.35-1, 0.75-1.33) hflip 0.5 vflip 0.5 normalise"}
    cfg = common.loader_config("torch", 4, 1)
    names = [type(t).__name__ for t in loader_throughput.peer_transforms(cfg, 32).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRotation",
                     "ColorJitter", "ToImage", "ToDtype", "Normalize"]
    assert jitter(cfg)["rotate"] == 30
    x = loader_throughput.peer_transforms(cfg, 32)(Image.new("RGB", (60, 45)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_loader_throughput_on_a_catalog_dataset(tmp_path, one_thread):
    from fastlesion.data.synthetic import generate

    root = generate("isic2020", tmp_path / "tiny-isic", n=12, seed=0, size=160, workers=1, progress=False)
    out = tmp_path / "data.jsonl"
    argv = ["--data", str(root), *PEER_ARGV, "--backends", "torch,pil-draft,torchvision-decode", "--out", str(out)]
    assert loader_throughput.main(argv) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["torch", "pil-draft", "torchvision-decode"]
    for r in rows:
        assert set(common.REQUIRED_KEYS) <= set(r)
        assert r["image_scale"] == "tiny-isic" and r["n_images"] == 12 and r["image_dims"] == "160x120"
        assert r["data_root"] == str(Path(root).resolve()) and r["status"] == "ok"
    assert loader_throughput.main(["--data", str(root), "--dataset", "isic2020", "--n", "8", *PEER_ARGV,
                                   "--backends", "torch", "--out", str(out)]) == 0
    assert read_rows(out)[-1]["n_images"] == 8
    assert loader_throughput.main(["--data", str(tmp_path / "nope"), "--backends", "torch"]) == 2
    assert loader_throughput.main(["--data", str(root), "--dataset", "bogus", "--backends", "torch"]) == 2


def test_pil_draft_decodes_smaller_but_keeps_the_crop_at_least_image_size(tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (200, 120, 90)).save(big, quality=90)
    assert loader_throughput.draft_factor(2000, 224) == 8 and loader_throughput.draft_factor(1000, 224) == 4
    assert loader_throughput.draft_factor(500, 224) == 2 and loader_throughput.draft_factor(300, 224) == 1
    assert loader_throughput.draft_factor(100, 224) == 1
    torch.manual_seed(0)
    for image_size in (64, 224, 512, 1500):
        for _ in range(20):
            img, (top, left, h, w), factor = loader_throughput.draft_open(str(big), image_size, (0.35, 1.0),
                                                                          (0.75, 4 / 3))
            assert img.size == (-(-2400 // factor), -(-1800 // factor))
            if factor > 1:  # decoded smaller, yet the crop still has >= image_size pixels on both sides
                assert min(h, w) >= image_size
            assert 0 <= top and top + h <= img.height and 0 <= left and left + w <= img.width
            # the shortest crop side is >= 1065 px here (area >= 0.35, ratio 3/4..4/3): 1/8, 1/4, 1/2 decodes
            assert factor >= {64: 8, 224: 4, 512: 2, 1500: 1}[image_size]
            if image_size == 64:
                assert img.size == (300, 225)
    small = tmp_path / "small.jpg"
    Image.new("RGB", (300, 225)).save(small)
    img, _, factor = loader_throughput.draft_open(str(small), 224, (0.35, 1.0), (0.75, 4 / 3))
    assert factor == 1 and img.size == (300, 225)  # nothing to gain: decoded whole


def test_compare_keeps_equal_labels_with_different_fingerprints_apart(tmp_path):
    fp1 = {"cpu_model": "AMD EPYC", "cpu_cores_logical": 2, "hostname": "vm", "ram_gb": 23.5,
           "cpu_simd": ["avx2", "avx512f"], "torch": "2.14.1"}
    fp2 = {**fp1, "ram_gb": 7.8, "cpu_simd": ["avx2"]}
    fp1_new_torch = {**fp1, "torch": "2.15.0", "platform": "Linux-6.9"}  # software only: the same machine
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common.append_jsonl(a, [_row("resnet18", "eager-fp32-nchw", 10.0, fp1, "cpu: AMD EPYC"),
                            _row("resnet18", "eager-fp32-nchw", 12.0, fp1_new_torch, "cpu: AMD EPYC")])
    common.append_jsonl(b, [_row("resnet18", "eager-fp32-nchw", 30.0, fp2, "cpu: AMD EPYC")])
    assert common.machine_label(fp1) == common.machine_label(fp2) == "AMD EPYC (2 cores) @ vm"
    res = compare.compare([str(a), str(b)], out=tmp_path / "cmp", plots=False)
    machines = res["machines"]
    assert len(machines) == 2 and machines[0] != machines[1]
    assert all(m.startswith("AMD EPYC (2 cores) @ vm #") for m in machines)
    row = res["table"].iloc[0]
    assert row[machines[0]] == pytest.approx(11.0) and row[machines[1]] == pytest.approx(30.0)
    assert row[f"{machines[1]} / ref"] == pytest.approx(30.0 / 11.0)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert f"M1: {machines[0]}" in md and f"M2: {machines[1]}" in md and "RAM 7.8 GB" in md
    again = compare.compare([str(a), str(b)], out=tmp_path / "cmp2", plots=False)  # a stable name, run to run
    assert again["machines"] == machines
    assert compare.compare([str(a), str(b)], reference=machines[1], out=tmp_path / "cmp3",
                           plots=False)["reference"] == machines[1]
    one = compare.compare([str(a)], out=tmp_path / "cmp4", plots=False)  # no clash: the plain label
    assert one["machines"] == ["AMD EPYC (2 cores) @ vm"]


def test_torchvision_decode_batched_path_runs_through_workers(tmp_path, monkeypatch):
    """The GPU path of torchvision-decode (workers read bytes, the loader decodes a batch with one decode_jpeg call,
    then transforms per sample), with the CPU standing in for CUDA: what crosses the worker queue must pickle."""
    from fastlesion.data.catalog import load_isic2020
    from fastlesion.data.synthetic import generate

    root = generate("isic2020", tmp_path / "tiny", n=8, seed=0, size=96, workers=1, progress=False)
    table = load_isic2020(Path(root)).table
    cfg = common.loader_config("torch", 2, 1)
    init = loader_throughput.PeerImages.__init__
    monkeypatch.setattr(loader_throughput.PeerImages, "__init__",
                        lambda self, *a, gpu=False: init(self, *a, gpu=True))
    loader = loader_throughput.PeerLoader("torchvision-decode", table, cfg, 32, torch.device("cpu"))
    loader.gpu, loader.transform = True, loader_throughput.peer_transforms(cfg, 32)
    loader.loader.collate_fn = loader_throughput._bytes_collate
    seen = []
    for x, y, idx in loader:
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        seen += idx.tolist()
    assert sorted(seen) == list(range(8))


def test_default_backend_follows_the_augmentation(tmp_path, monkeypatch):
    """600x450 JPEGs at 224 px on CPU: dali-cpu with the default augmentation, torch with crops and flips only."""
    import pandas as pd
    from PIL import Image

    import fastlesion.data.loader as loader_mod

    paths = []
    for i in range(2):
        Image.new("RGB", (600, 450), (i * 90, 80, 60)).save(tmp_path / f"{i}.jpg", quality=90)
        paths.append(str(tmp_path / f"{i}.jpg"))
    monkeypatch.setattr(loader_mod, "dali_available", lambda: True)
    table, cpu = pd.DataFrame({"path": paths, "label": [0, 1]}), torch.device("cpu")
    assert loader_throughput.default_backend(cpu, table, 224) == "dali-cpu"
    assert loader_throughput.default_backend(cpu, table, 224, aug_strength=0) == "torch"
