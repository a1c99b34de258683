#!/usr/bin/env bash
# One device call that checks fastlesion's GPU paths and measures the README's GPU tables.
#
# For a session lent a GPU (../shared/GPU.md): stage DALI first (bash ../shared/gpu/stage-dali.sh, then the
# `run` calls it prints), then make one call:
#     export PYTHONPATH=$PWD/.gpu-stage/site:$PWD:$PYTHONPATH; bash tools/gpu_check.sh
# Everything it measures is appended to $OUT/gpu.jsonl (rows with the hardware fingerprint) and the logs go to
# $OUT; merge with the CPU rows: python benchmarks/compare.py benchmarks/results/*.jsonl OUT/gpu.jsonl
# Written without a GPU at hand: the first session that runs it should fix what it finds.
# QUICK=1 shortens every step (a first check that the paths work at all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastlesion-gpu-check}
mkdir -p "$OUT"
export FASTLESION_CACHE=${FASTLESION_CACHE:-/tmp/fastlesion-cache}  # generated images stay out of $OUT
PY=${PY:-python3}
THREADS=${THREADS:-$(nproc)}
step() { echo; echo "=== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
$PY -c "import nvidia.dali as d; print('DALI', d.__version__)" || echo "DALI missing: stage it first (GPU.md)"

step "GPU tests (pytest -m gpu)"
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -15

if [ "${QUICK:-0}" = 1 ]; then
  step "quick benchmarks"
  $PY benchmarks/train_throughput.py --models resnet18 --batch-sizes 64 --steps 5 --repeats 2 \
      --modes eager-fp32-nchw,compile-bf16-cl --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/train.txt" | tail -12
  $PY benchmarks/end_to_end.py --quick --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/e2e.txt" | tail -12
  exit 0
fi

step "loader throughput: DALI gpu/cpu vs torch DataLoader, $THREADS threads"
$PY benchmarks/loader_throughput.py --threads "$THREADS" --batch-size 128 --n 2048 --scales medium \
    --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/loader.txt" | tail -12
$PY benchmarks/loader_throughput.py --threads "$THREADS" --batch-size 64 --scales large \
    --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/loader-large.txt" | tail -12

step "train step: resnet50 224 px batch 256, eager fp32 vs AMP + channels_last + compile"
$PY benchmarks/train_throughput.py --models resnet50 --batch-sizes 256 \
    --modes eager-fp32-nchw,eager-bf16-nchw,eager-bf16-cl,compile-bf16-cl \
    --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/train.txt" | tail -15

step "end to end from JPEGs: resnet50, every loader backend, GPU utilisation"
$PY benchmarks/end_to_end.py --model resnet50 --batch-size 256 --n 4096 --workers "$THREADS" \
    --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/e2e.txt" | tail -15
