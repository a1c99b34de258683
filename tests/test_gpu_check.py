"""The device scripts never spend GPU time on a typo: tools/gpu_check.sh's CPU rehearsal runs every command of both
stages (tiny sizes, --device cpu), and tools/stage_dali.sh's parts go back together on the receiving side."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "tools" / "gpu_check.sh"
STAGE_DALI = ROOT / "tools" / "stage_dali.sh"
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
STAGE1 = ["machine", "cuda-tests", "train-step", "data-medium", "e2e-torch", "data-large"]
STAGE2 = ["dali-import", "dali-tests", "loader", "e2e-dali", "loader-large"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STAGE", "OUT", "GPU_CHECK_DRY", "BUDGET_S")}
    env.update(PY=sys.executable, FASTLESION_CACHE=str(tmp_path / "cache"), **extra)
    return env


@pytest.mark.parametrize("script", sorted((ROOT / "tools").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_every_step_of_both_stages(tmp_path):
    out = tmp_path / "out"
    env = _env(tmp_path, GPU_CHECK_DRY="1", OUT=str(out))
    if not HAS_DALI:  # stage 2 needs DALI (its cpu backend stands in for the gpu one)
        env["STAGE"] = "1"
    p = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "gpu_check: every step ran" in p.stdout
    stages = {"1": STAGE1, "2": STAGE2} if HAS_DALI else {"1": STAGE1}
    for stage, steps in stages.items():
        summary = (out / f"stage{stage}-summary.md").read_text()
        for name in steps:
            assert f"| {stage} | {name} | ok |" in summary, summary
        assert (out / f"stage{stage}.log").stat().st_size > 0
        assert (out / f"stage{stage}-compare.md").exists()
        assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files from $OUT
    rows = [json.loads(line) for line in (out / "stage1.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rows if r["bench"] == "train_step"} == {
        "eager-fp32-nchw", "eager-bf16-nchw", "eager-bf16-cl", "compile-bf16-cl"}
    assert [r["backend"] for r in rows if r["bench"] == "end_to_end"] == ["torch"]
    assert all(r["status"] == "ok" for r in rows)
    if HAS_DALI:
        rows = [json.loads(line) for line in (out / "stage2.jsonl").read_text().splitlines()]
        loader = {(r["image_scale"], r["backend"]) for r in rows if r["bench"] == "loader_throughput"}
        assert loader == {(s, b) for s in ("medium", "large") for b in ("torch", "dali")}
        assert [r["backend"] for r in rows if r["bench"] == "end_to_end"] == ["dali-cpu"]


def test_gpu_check_reports_a_failed_step_and_goes_on(tmp_path):
    """A step that fails is reported, the rest still run, the exit status says so (here: a stage that does not
    exist is refused at once, and a python that cannot start fails every step but the summary still prints)."""
    env = _env(tmp_path, GPU_CHECK_DRY="1", OUT=str(tmp_path / "out"), STAGE="3")
    p = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "STAGE must be" in p.stderr
    env.update(STAGE="2", PY=str(tmp_path / "no-such-python"))
    p = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "SOME STEPS FAILED" in p.stdout
    for name in STAGE2:
        assert any(line.split()[:2] == ["2", name] and "FAILED" in line for line in p.stdout.splitlines()), name


def test_stage_dali_parts_go_back_together(tmp_path):
    """pack (here from a made-up site folder instead of the DALI wheels), receive each part, install: the same
    files, and a part missing is a clear error rather than a broken install."""
    site = tmp_path / "site"
    (site / "nvidia" / "dali").mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text("")
    (site / "nvidia" / "dali" / "__init__.py").write_text("__version__ = 'fake'\n")
    blob = os.urandom(3 * 2**20)  # incompressible: several parts of 1 MiB
    (site / "nvidia" / "dali" / "lib.so").write_bytes(blob)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(tmp_path, STAGE_DALI_ROOT=str(repo))
    run = lambda *a: subprocess.run(["bash", str(STAGE_DALI), *a], env=env, capture_output=True, text=True,
                                    timeout=300)
    p = run("pack", "--from", str(site), "--part-mib", "1", "--fast")
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'carry=[".gpu/p0"]' in p.stdout and "STAGE=2 bash tools/gpu_check.sh" in p.stdout
    held = tmp_path / "held"  # each device call carries one part: hold them all back, then carry one at a time
    (repo / ".gpu").rename(held)
    parts = sorted(held.iterdir())
    assert len(parts) >= 3
    for i, part in enumerate(parts):
        (repo / ".gpu").mkdir()
        part.rename(repo / ".gpu" / part.name)
        p = run("receive")
        assert p.returncode == 0, p.stdout + p.stderr
        shutil.rmtree(repo / ".gpu")
        if i == 0:  # not every part there yet: refused, nothing installed
            p = run("install", "--no-check")
            assert p.returncode != 0 and "missing" in p.stderr
            assert not (repo / ".gpu-stage" / "site").exists()
    p = run("install", "--no-check")
    assert p.returncode == 0, p.stdout + p.stderr
    got = repo / ".gpu-stage" / "site" / "nvidia" / "dali" / "lib.so"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()
    assert (repo / ".gpu-stage" / "site" / "nvidia" / "dali" / "__init__.py").read_text() == "__version__ = 'fake'\n"


def test_gpu_check_stage1_runs_the_loader_peers_without_dali():
    """Stage 1 (nothing carried, no DALI) measures the peers on both synthetic sets; stage 2 keeps the DALI rows."""
    text = GPU_CHECK.read_text()
    stage1 = text[text.index("stage1() {"):text.index("stage2() {")]
    stage2 = text[text.index("stage2() {"):text.index("echo \"gpu_check: stage(s)")]
    assert "PEER_BACKENDS=torch,pil,pil-draft,torchvision-decode" in text
    for name, data in (("loader-peers", '--data "$MEDIUM" --dataset isic2020 --n "$N_PEERS" --scale-label medium'),
                       ("loader-peers-large", '--n "$N_LARGE" --scales large')):
        line = next(x for x in stage1.splitlines() if x.strip().startswith(f"step 1 {name} "))
        i = stage1.index(line)
        command = stage1[i:stage1.index("\n", stage1.index("--backends", i))]
        assert data in command and '--device "$DEV"' in command
        assert '--backends "$PEER_BACKENDS"' in command and "dali" not in command
    # the peers come last, so a spent budget skips them rather than the large set stage 2 needs
    assert stage1.index("step 1 data-large") < stage1.index("step 1 loader-peers ") \
        < stage1.index("step 1 loader-peers-large")
    assert stage2.count("--backends torch,dali-cpu,dali-gpu") == 2
