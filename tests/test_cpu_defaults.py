"""CPU defaults: ``auto`` precision and memory format follow the CPU's bf16 instructions; ``loader.workers`` None
is the usable cores, capped."""

from __future__ import annotations

import pytest
import torch

from fastlesion import hardware
from fastlesion.config import AUTO_WORKERS_MAX, Config, LoaderConfig, TrainConfig, load_config
from fastlesion.engine import inference, runtime


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_is_bf16_channels_last_only_with_bf16_instructions(native, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_fast_bf16", lambda: native)
    rt = runtime.resolve_runtime(TrainConfig(device="cpu"))
    assert (rt.amp_dtype, rt.channels_last, rt.compile) == ((torch.bfloat16, True, False) if native
                                                            else (None, False, False))
    off = runtime.resolve_runtime(TrainConfig(device="cpu", amp="off", channels_last="off"))
    assert (off.amp_dtype, off.channels_last) == (None, False)  # named values win over the CPU
    # eval/predict run as training validated (so they reproduce its metrics), without compile
    inf = inference.inference_runtime(Config(train=TrainConfig(device="cpu", compile="on")))
    assert (inf.amp_dtype, inf.channels_last, inf.compile) == (rt.amp_dtype, rt.channels_last, False)


def test_cpu_has_native_bf16_reads_the_cpu_flags(tmp_path, monkeypatch):
    real_open = open

    def fake(flags):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\n")
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a,
                                                                            **k))
        hardware.cpu_has_native_bf16.cache_clear()
        return hardware.cpu_has_native_bf16()

    try:
        assert fake("fpu sse4_2 avx2 avx512f amx_bf16 amx_tile") is True
        assert fake("fpu sse4_2 avx2 avx512f avx512_bf16") is True
        assert fake("fpu sse4_2 avx2 avx512f avx512bw") is False
    finally:
        hardware.cpu_has_native_bf16.cache_clear()


def test_workers_default_is_the_usable_cores_capped(monkeypatch):
    import fastlesion.data.loader as loader_mod

    cfg = LoaderConfig()
    assert cfg.workers is None and load_config(None, {"loader.workers": "none"}).loader.workers is None
    assert LoaderConfig(workers=3).resolved_workers() == 3 and LoaderConfig(workers=0).resolved_workers() == 0
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 2)
    assert cfg.resolved_workers() == 2
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 64)
    assert cfg.resolved_workers() == AUTO_WORKERS_MAX
    with pytest.raises(Exception, match="loader.workers must be >= 0"):
        LoaderConfig(workers=-1)
