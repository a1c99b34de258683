#!/usr/bin/env bash
# Stages NVIDIA DALI for the lent GPU machine (../shared/GPU.md): python 3.12, torch 2.11 with CUDA 13, no DALI, no
# package registry, and at most 64 MiB carried per device call, the working tree included.
#
#   bash tools/stage_dali.sh [pack] [--python 3.12] [--part-mib N] [--fast] [--from SITE]   here, from anywhere
#   bash tools/stage_dali.sh receive            on the device: copy the carried part(s) into .gpu-stage/parts
#   bash tools/stage_dali.sh install [--no-check]  on the device, once every part is there: unpack into
#                                               .gpu-stage/site and import DALI from it
#
# pack downloads only what `import nvidia.dali` and the decoders of this project need (pinned, no dependency
# resolution): nvidia-dali-cuda130 2.4.0, nvidia-nvimgcodec-cu13 (DALI's image codecs) and nvidia-nvjpeg (CUDA 13
# nvJPEG, which nvimgcodec's GPU JPEG decoder loads), and DALI's import-time Python dependencies optree, gast,
# astunparse and six. It leaves out: nvidia-libnvcomp-cu13 (loaded only by fn.experimental.inflate and the TIFF
# codec), nvidia-nvjpeg2k-cu13 and nvidia-nvtiff-cu13 (JPEG 2000 / TIFF), nvtx, makefun and libcst (DALI's
# experimental dynamic mode only), numpy/packaging/typing-extensions/pyyaml (the image has them). From the files it
# drops DALI's C++ headers and command-line scripts, the extension modules built for other Pythons, nvimgcodec's
# Python binding (DALI uses its C library), its codec extensions for JPEG 2000, TIFF and OpenCV formats; it strips
# the symbol tables of the shared libraries (the dynamic symbols stay). The tree goes into one tar.xz (x86 BCJ
# filter) cut into parts that fit one call each, .gpu/p0 ... .gpu/pN (git-ignored), each with a manifest.
# pack prints the device calls to make, back to back (the machine goes back ~30 s after a call ends, and with it
# .gpu-stage): the first part rides along with STAGE=1 of tools/gpu_check.sh, the last one with STAGE=2.
#
# --from SITE packs an existing folder instead (the tests do); --fast compresses quickly (xz -1; tests).
# --python 3.11 packs for python 3.11 instead, to rehearse the install and the import on a CPU machine here.
set -euo pipefail
ROOT=${STAGE_DALI_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
cmd=pack
case ${1:-} in pack|receive|install) cmd=$1; shift ;; esac
PYVER=3.12 PART_MIB="" FAST=0 FROM="" CHECK=1
while (($#)); do
  case $1 in
    --python) PYVER=$2; shift 2 ;;
    --part-mib) PART_MIB=$2; shift 2 ;;
    --fast) FAST=1; shift ;;
    --from) FROM=$(cd "$2" && pwd); shift 2 ;;
    --no-check) CHECK=0; shift ;;
    *) echo "stage_dali.sh: unknown argument $1 (see the head of tools/stage_dali.sh)" >&2; exit 2 ;;
  esac
done
ARCHIVE=dali-site.tar.xz
STAGE=.gpu-stage

receive() {
  mkdir -p "$STAGE/parts"
  local n=0 p
  for p in .gpu/p*/"$ARCHIVE".*; do
    [ -e "$p" ] || continue
    cp "$p" "$STAGE/parts/"; n=$((n + 1))
  done
  for p in .gpu/p*/manifest; do [ -e "$p" ] && cp "$p" "$STAGE/parts/manifest"; done
  ((n > 0)) || { echo "receive: no part under .gpu/p*/ (name one in the call's carry)" >&2; exit 1; }
  echo "received $n part(s); $STAGE/parts has: $(cd "$STAGE/parts" && ls "$ARCHIVE".* | tr '\n' ' ')"
}

install() {
  local m="$STAGE/parts/manifest"
  [ -f "$m" ] || { echo "install: $m missing: no part received (or the machine was given back): start from part 0" >&2
                   exit 1; }
  local total sha
  total=$(sed -n 's/^parts //p' "$m"); sha=$(sed -n 's/^sha256 //p' "$m")
  local missing=()
  for ((i = 0; i < total; i++)); do
    [ -f "$STAGE/parts/$ARCHIVE.$(printf %02d "$i")" ] || missing+=("$i")
  done
  if ((${#missing[@]})); then
    echo "install: part(s) ${missing[*]} of $total missing (a fresh machine forgets earlier parts): carry them" >&2
    exit 1
  fi
  local got
  got=$(cat "$STAGE/parts/$ARCHIVE".* | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "install: checksum mismatch ($got, manifest $sha): stage again" >&2; exit 1; }
  rm -rf "$STAGE/site.new" && mkdir -p "$STAGE/site.new"
  local t=$SECONDS
  cat "$STAGE/parts/$ARCHIVE".* | python3 -c '
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as tar:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(sys.argv[1], filter="data")
    else:
        tar.extractall(sys.argv[1])
' "$STAGE/site.new"
  rm -rf "$STAGE/site" && mv "$STAGE/site.new" "$STAGE/site"
  echo "installed into $STAGE/site ($(du -sh "$STAGE/site" | cut -f1), unpacked in $((SECONDS - t)) s)"
  if ((CHECK)); then
    PYTHONPATH="$PWD/$STAGE/site${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import nvidia.dali as d
from nvidia.dali.plugin.pytorch import DALIGenericIterator
print('DALI', d.__version__, 'imports from', d.__file__)"
  fi
}

# the files of each wheel that stay out (paths relative to the site folder)
prune() {
  local site=$1 keep_py=${PYVER/./}
  rm -rf "$site"/nvidia/dali/include "$site"/nvidia_dali_cuda130-*.data "$site"/rec2idx.py "$site"/wds2idx.py \
         "$site"/nvidia/nvimgcodec/include "$site"/nvidia/nvimgcodec/tools "$site"/nvidia/cu13/include
  find "$site"/nvidia/dali -maxdepth 1 -name '*.cpython-*.so' ! -name "*.cpython-$keep_py-*" -delete
  rm -f "$site"/nvidia/nvimgcodec/nvimgcodec_impl.cpython-*.so \
        "$site"/nvidia/nvimgcodec/extensions/lib{nvjpeg2k,nvtiff,tiff,opencv}_ext.so*
  find "$site" -name '__pycache__' -prune -exec rm -rf {} +
}

pack() {
  local tree_bytes part_mib
  tree_bytes=$( (git ls-files -co --exclude-standard -z 2>/dev/null || true) | du -cb --files0-from=- 2>/dev/null \
               | tail -1 | cut -f1)
  tree_bytes=${tree_bytes:-0}
  [ -d shared ] && tree_bytes=$((tree_bytes + $(du -sb shared | cut -f1)))
  part_mib=${PART_MIB:-$((64 - tree_bytes / 1048576 - 2))}  # 64 MiB a call, less the working tree, less 2 MiB
  ((part_mib >= 1)) || { echo "pack: the working tree ($((tree_bytes / 1048576)) MiB) leaves no room" >&2; exit 1; }
  local exclude  # .gpu and .gpu-stage stay out of git and out of what a device call sends
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
  if [ -n "$exclude" ]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
    grep -qx '/.gpu-stage/' "$exclude" 2>/dev/null || echo '/.gpu-stage/' >> "$exclude"
  fi
  rm -rf .gpu && mkdir -p .gpu
  local site=$FROM
  if [ -z "$site" ]; then
    site=.gpu/site
    mkdir -p .gpu/wheels "$site"
    local plat=(--only-binary=:all: --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    local wheels=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
                  optree==0.20.0 gast==0.7.0 astunparse==1.6.3 six==1.17.0)
    python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu/wheels "${wheels[@]}"
    echo "downloaded:"; (cd .gpu/wheels && ls -l --block-size=K *.whl | awk '{print "  " $5 "  " $9}')
    local w
    for w in .gpu/wheels/*.whl; do unzip -q -o "$w" -d "$site"; done
    prune "$site"
    if command -v strip > /dev/null; then
      find "$site" -type f -name '*.so*' -exec strip --strip-unneeded {} + 2>/dev/null || true
    else
      echo "note: no strip here, the symbol tables stay (bigger parts)"
    fi
    echo "site folder: $(du -sh "$site" | cut -f1) unpacked"
  fi
  local t=$SECONDS xzopt=(--x86 --lzma2=preset=9e,dict=192MiB)
  ((FAST)) && xzopt=(-1)
  tar -C "$site" -cf - --sort=name --owner=0 --group=0 --numeric-owner . | xz "${xzopt[@]}" -c > ".gpu/$ARCHIVE"
  local sha size n=0
  sha=$(sha256sum ".gpu/$ARCHIVE" | cut -d' ' -f1); size=$(stat -c %s ".gpu/$ARCHIVE")
  split -b "${part_mib}M" -d ".gpu/$ARCHIVE" ".gpu/$ARCHIVE."
  rm -f ".gpu/$ARCHIVE"; [ -z "$FROM" ] && rm -rf .gpu/site .gpu/wheels
  local total
  total=$(ls .gpu/"$ARCHIVE".* | wc -l)
  for p in .gpu/"$ARCHIVE".*; do
    mkdir -p ".gpu/p$n"; mv "$p" ".gpu/p$n/"
    printf 'parts %s\nsha256 %s\nbytes %s\npython %s\n' "$total" "$sha" "$size" "$PYVER" > ".gpu/p$n/manifest"
    n=$((n + 1))
  done
  echo "packed $((size / 1048576)) MiB (xz, $((SECONDS - t)) s) into $total part(s) of at most $part_mib MiB" \
       "(the working tree that travels with each call: $((tree_bytes / 1024)) KiB):"
  for ((i = 0; i < total; i++)); do echo "  .gpu/p$i: $(du -b ".gpu/p$i" | cut -f1) bytes"; done
  echo
  echo "Device calls, back to back (each answer within ~30 s, or the machine and .gpu-stage are gone):"
  local last=$((total - 1))
  echo "  run  carry=[\".gpu/p0\"]  timeout_s=600  command: bash tools/stage_dali.sh receive;" \
       "STAGE=1 bash tools/gpu_check.sh"
  for ((i = 1; i < last; i++)); do
    echo "  run  carry=[\".gpu/p$i\"]  timeout_s=120  command: bash tools/stage_dali.sh receive"
  done
  if ((last > 0)); then
    echo "  run  carry=[\".gpu/p$last\"]  timeout_s=600  command: bash tools/stage_dali.sh receive &&" \
         "bash tools/stage_dali.sh install && STAGE=2 bash tools/gpu_check.sh"
  else
    echo "  run  timeout_s=600  command: bash tools/stage_dali.sh install && STAGE=2 bash tools/gpu_check.sh"
  fi
  echo "then give_back. If install says a part is missing, the machine was given back: carry the parts again from p0."
  echo "Without DALI (or no time left for it), the first call alone: STAGE=1 bash tools/gpu_check.sh (no carry)."
}

"$cmd"
