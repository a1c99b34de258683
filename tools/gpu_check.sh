#!/usr/bin/env bash
# The one device script: checks fastlesion's GPU paths and measures the README's GPU tables on a lent GPU machine
# (../shared/GPU.md). Two stages, each sized to one device call (at most 10 minutes; the script caps every step and
# stops starting new ones at BUDGET_S, 540 s by default, so the summary always prints):
#
#   STAGE=1 bash tools/gpu_check.sh   needs nothing carried: the machine, the CUDA tests that need no DALI
#                                     (pytest -m gpu -k "not dali"), the train-step matrix (resnet50, 224 px,
#                                     batch 256: eager fp32, eager bf16 NCHW, eager bf16 channels_last, compile bf16
#                                     channels_last), synthetic 600x450 JPEGs and end to end from them through the
#                                     torch DataLoader, then ISIC-size JPEGs for stage 2 (most valuable first), then
#                                     the loader peers on both sets (torch DataLoader vs plain PIL, PIL draft
#                                     decoding, torchvision decode_jpeg on the GPU: no DALI needed)
#   STAGE=2 bash tools/gpu_check.sh   once DALI is staged (tools/stage_dali.sh): DALI's GPU tests (pytest -m gpu
#                                     -k dali: a GPU test that needs DALI has dali in its file or test name), loader
#                                     throughput DALI gpu vs DALI cpu vs torch at all CPU threads (600x450 JPEGs),
#                                     end to end through DALI gpu, the loaders again on ISIC-size JPEGs
#
# On the GPU machine the project is not pip-installed: the script puts the repository (and a DALI staged under
# .gpu-stage/site) on PYTHONPATH itself and runs python3. Rows go to $OUT/stage<N>.jsonl (merge them with other
# machines' rows: python benchmarks/compare.py benchmarks/results/*.jsonl OUT/stage1.jsonl), the whole log to
# $OUT/stage<N>.log, the step table to $OUT/stage<N>-summary.md and the results table to $OUT/stage<N>-compare.md
# (4 files per stage). The last lines printed are the results table and one line per step. A failed step is
# reported and the script goes on; the exit status is 1 if any step failed.
#
# CPU rehearsal of every command of both stages with tiny sizes and --device cpu (dali-cpu stands in for dali-gpu
# end to end; the loader benchmark leaves dali-gpu out by itself without CUDA); exit 0 only if every step ran:
#     GPU_CHECK_DRY=1 bash tools/gpu_check.sh            (tests/test_gpu_check.py runs it)
#
# Settings (environment): STAGE (1, 2 or 1,2; default 1, and 1,2 in the rehearsal), OUT, PY (python3), THREADS
# (all cores), BUDGET_S (540), N_MEDIUM (4096 images of 600x450), N_LARGE (192 images 2000-6000 px wide), N_PEERS
# (1024: the first medium images the stage-1 peers read),
# FASTLESION_CACHE (default .gpu-stage/cache, kept between the calls to one warm machine), TAIL (12: lines of each
# step's output printed; all of it is in the log).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY:-0}
[ "$DRY" = 1 ] || DRY=0
STAGES=${STAGE:-$([ "$DRY" = 1 ] && echo 1,2 || echo 1)}
PY=${PY:-python3}
THREADS=${THREADS:-$(nproc)}
BUDGET_S=${BUDGET_S:-540}
T0=$SECONDS

WORK=$(mktemp -d /tmp/fastlesion-gpu-check-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/fastlesion-gpu-check-dry}
  export FASTLESION_CACHE=${FASTLESION_CACHE:-$WORK/cache}
  THREADS=1
  N_MEDIUM=${N_MEDIUM:-12}
  N_LARGE=${N_LARGE:-2}
else
  OUT=${OUT:-/tmp/fastlesion-gpu-check}
  export FASTLESION_CACHE=${FASTLESION_CACHE:-$ROOT/.gpu-stage/cache}
  N_MEDIUM=${N_MEDIUM:-4096}
  N_LARGE=${N_LARGE:-192}
fi
mkdir -p "$OUT" "$FASTLESION_CACHE"
for s in ${STAGES//,/ }; do  # a rerun into the same $OUT starts these files afresh
  rm -f "$OUT/stage$s.log" "$OUT/stage$s.jsonl" "$OUT/stage$s-summary.md" "$OUT/stage$s-compare.md"
done
# the project is not installed on the GPU machine: run it from this checkout (and a staged DALI, if there is one)
SITE=${DALI_SITE:-$ROOT/.gpu-stage/site}
if [ -d "$SITE" ] && [ "$DRY" = 0 ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BENCH=$FASTLESION_CACHE/bench  # the synthetic JPEG sets, named as benchmarks/loader_throughput.py names them
MEDIUM=$BENCH/isic2020-medium-n$N_MEDIUM-s0
LARGE=$BENCH/isic2020-large-n$N_LARGE-s0

if [ "$DRY" = 1 ]; then  # the same commands, tiny
  DEV=cpu; E2E_DALI=dali-cpu
  TRAIN_SIZE=(--models lenet --image-sizes 32 --batch-sizes 4 --steps 2 --warmup 1 --repeats 1 --device cpu)
  E2E_SIZE=(--model lenet --batch-size 4 --image-size 32 --steps 2 --warmup 1 --repeats 1 --device cpu)
  LOADER_SIZE=(--batch-size 1 --repeats 1 --warmup 1 --warmup-epochs 0)
  LOADER_LARGE_SIZE=("${LOADER_SIZE[@]}")
  N_PEERS=${N_PEERS:-$N_MEDIUM}
else
  DEV=cuda; E2E_DALI=dali-gpu
  TRAIN_SIZE=(--models resnet50 --image-sizes 224 --batch-sizes 256 --steps 20 --warmup 5 --repeats 3 --device cuda)
  E2E_SIZE=(--model resnet50 --batch-size 256 --image-size 224 --steps 20 --warmup 5 --repeats 3 --device cuda)
  LOADER_SIZE=(--batch-size 128 --repeats 5 --warmup 2 --warmup-epochs 1)
  # N_LARGE images make N_LARGE / 128 = 1 batch of 128 (too few for --warmup 2): batches of 32, 6 an epoch
  LOADER_LARGE_SIZE=(--batch-size 32 --repeats 3 --warmup 1 --warmup-epochs 1)
  N_PEERS=${N_PEERS:-1024}
fi
MODES=eager-fp32-nchw,eager-bf16-nchw,eager-bf16-cl,compile-bf16-cl
PEER_BACKENDS=torch,pil,pil-draft,torchvision-decode  # stage 1: no DALI; torchvision-decode decodes on the GPU

MACHINE='
import os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cpus", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", "bf16",
          torch.cuda.is_bf16_supported())
elif sys.argv[1] == "cuda":
    sys.exit("no CUDA device visible to torch")
'
CHECK_ROWS='
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
bad = [" ".join(" ".join(str(r.get(k) or "") for k in ("model", "mode", "backend", "status", "error")).split())
       for r in rows if r.get("status") not in ("ok", "skipped")]
print(f"{len(rows) - len(bad)}/{len(rows)} rows ok" + "".join("; " + b for b in bad))
sys.exit(1 if bad else 0)
'
TRAIN=("$PY" benchmarks/train_throughput.py --out @ROWS@)
E2E=("$PY" benchmarks/end_to_end.py --out @ROWS@)
LOADER=("$PY" benchmarks/loader_throughput.py --out @ROWS@ --cache "$BENCH" --threads "$THREADS")
SYNTH=("$PY" -m fastlesion.cli synth --layout isic2020 --seed 0 --workers "$THREADS")

STATUS=()  # one "stage|step|verdict|seconds|notes" line per step
FAILED=0

# step STAGE NAME CAP_S COMMAND...: run it with a time cap (never past BUDGET_S), log it, check its rows.
# A literal @ROWS@ in the command becomes the step's own rows file; they are appended to $OUT/stage<N>.jsonl.
step() {
  local stage=$1 name=$2 cap=$3; shift 3
  local log="$OUT/stage$stage.log" rows="$WORK/rows-$stage-$name.jsonl" left=$((BUDGET_S - (SECONDS - T0)))
  local cmd=("${@//@ROWS@/$rows}")
  ((cap > left - 15)) && cap=$((left - 15))
  printf '\n=== stage %s: %s (at most %s s)\n$ %s\n' "$stage" "$name" "$cap" "${cmd[*]}" | tee -a "$log"
  if ((cap < 10)); then
    echo "--- $name: SKIPPED: the time budget (BUDGET_S=$BUDGET_S) is spent" | tee -a "$log"
    STATUS+=("$stage|$name|SKIPPED (no time left)|0|"); FAILED=1; return
  fi
  local t=$SECONDS rc
  timeout -k 20 "$cap" "${cmd[@]}" < /dev/null 2>&1 | tee -a "$log" > "$WORK/step.txt"
  rc=${PIPESTATUS[0]}
  tail -n "${TAIL:-12}" "$WORK/step.txt"
  local dt=$((SECONDS - t)) verdict=ok info=""
  if [ -s "$rows" ]; then
    cat "$rows" >> "$OUT/stage$stage.jsonl"
    info=$("$PY" -c "$CHECK_ROWS" "$rows") || verdict="FAILED (rows)"
  fi
  if ((rc == 124 || rc == 137)); then verdict="FAILED (timed out after $cap s)"
  elif ((rc == 5)) && [[ $name == *tests ]]; then info="no test selected"
  elif ((rc != 0)); then verdict="FAILED (exit $rc)"
  fi
  [ "$verdict" = ok ] || FAILED=1
  echo "--- $name: $verdict in $dt s${info:+ ($info)}" | tee -a "$log"
  STATUS+=("$stage|$name|$verdict|$dt|$info")
}

stage1() {
  if [ "$DRY" = 0 ] || command -v nvidia-smi > /dev/null; then
    step 1 nvidia-smi 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  fi
  step 1 machine 60 "$PY" -c "$MACHINE" "$DEV"
  step 1 cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -k "not dali" tests
  step 1 train-step 330 "${TRAIN[@]}" "${TRAIN_SIZE[@]}" --modes "$MODES"
  step 1 data-medium 150 "${SYNTH[@]}" --out "$MEDIUM" --n "$N_MEDIUM" --size 600
  step 1 e2e-torch 240 "${E2E[@]}" "${E2E_SIZE[@]}" --data "$MEDIUM" --dataset isic2020 --workers "$THREADS" \
      --backends torch
  step 1 data-large 120 "${SYNTH[@]}" --out "$LARGE" --n "$N_LARGE" --large  # for stage 2, made here while cheap
  # the peers last (the budget skips them first): the first N_PEERS medium images, all the large ones
  step 1 loader-peers 120 "${LOADER[@]}" --data "$MEDIUM" --dataset isic2020 --n "$N_PEERS" --scale-label medium \
      "${LOADER_SIZE[@]}" --device "$DEV" --backends "$PEER_BACKENDS"
  step 1 loader-peers-large 120 "${LOADER[@]}" --n "$N_LARGE" --scales large "${LOADER_LARGE_SIZE[@]}" \
      --device "$DEV" --backends "$PEER_BACKENDS"
}

stage2() {
  step 2 dali-import 60 "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__, 'from', d.__file__)"
  step 2 dali-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -k dali tests
  step 2 loader 240 "${LOADER[@]}" --n "$N_MEDIUM" --scales medium "${LOADER_SIZE[@]}" \
      --backends torch,dali-cpu,dali-gpu
  step 2 e2e-dali 240 "${E2E[@]}" "${E2E_SIZE[@]}" --data "$MEDIUM" --dataset isic2020 --workers "$THREADS" \
      --backends "$E2E_DALI"
  step 2 loader-large 150 "${LOADER[@]}" --n "$N_LARGE" --scales large "${LOADER_LARGE_SIZE[@]}" \
      --backends torch,dali-cpu,dali-gpu
}

echo "gpu_check: stage(s) $STAGES$([ "$DRY" = 1 ] && echo ', CPU rehearsal (GPU_CHECK_DRY=1)'), out $OUT," \
     "threads $THREADS, budget $BUDGET_S s"
for s in ${STAGES//,/ }; do
  case $s in
    1) stage1 ;;
    2) stage2 ;;
    *) echo "STAGE must be 1, 2 or 1,2 (got $s)" >&2; exit 2 ;;
  esac
done

# the results table, then one line per step (the device tool's reply shows the end of the output)
for s in ${STAGES//,/ }; do
  [ -s "$OUT/stage$s.jsonl" ] || continue
  echo; echo "=== stage $s results"
  "$PY" benchmarks/compare.py "$OUT/stage$s.jsonl" --no-plots --out "$WORK/compare-$s" > "$WORK/compare.txt" 2>&1
  rc=$?
  cat "$WORK/compare.txt" >> "$OUT/stage$s.log"
  grep -v '^wrote ' "$WORK/compare.txt"
  if ((rc != 0)); then echo "compare.py FAILED (exit $rc)"; STATUS+=("$s|compare|FAILED (exit $rc)|0|"); FAILED=1; fi
  if [ -f "$WORK/compare-$s/comparison.md" ]; then cp "$WORK/compare-$s/comparison.md" "$OUT/stage$s-compare.md"; fi
done
echo; echo "=== steps ($((SECONDS - T0)) s in all; rows, logs and tables under $OUT)"
for s in ${STAGES//,/ }; do printf '| stage | step | status | s | notes |\n|---|---|---|---:|---|\n' \
    > "$OUT/stage$s-summary.md"; done
printf '%-5s %-18s %-30s %5s  %s\n' stage step status s notes
for line in "${STATUS[@]}"; do
  IFS='|' read -r st name verdict dt info <<< "$line"
  printf '%-5s %-18s %-30s %5s  %s\n' "$st" "$name" "$verdict" "$dt" "$info"
  echo "| $st | $name | $verdict | $dt | $info |" >> "$OUT/stage$st-summary.md"
done
if ((FAILED)); then echo "gpu_check: SOME STEPS FAILED (see above and $OUT/stage*.log)"; exit 1; fi
echo "gpu_check: every step ran"
