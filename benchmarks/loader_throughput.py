"""Loader throughput: images/s of the DALI training pipeline (cpu, and gpu with CUDA) against the torch DataLoader.

Both run the same training augmentation (random resized crop, flips, rotation, colour jitter, normalise; the
``LoaderConfig`` defaults) on synthetic ISIC-like sets at two scales, with the same number of DALI threads and
DataLoader workers:

* ``medium`` — 600x450 JPEGs (the size of HAM10000 and of the usual pre-resized ISIC sets);
* ``large``  — 2048-6000 px wide JPEGs like the ISIC 2020 originals (quality 90);
* ``large512`` (optional) — the large set after ``fastlesion prepare --size 512`` (shorter side 512).

Each repeat runs one epoch (a new shuffle), drops the first ``--warmup`` batches (pipeline start, worker start,
first decodes) and times the rest; the reported number is the median over ``--repeats``, the backends interleaved
so that a busy machine slows them alike. The ratio is to the torch loader measured in the same run.
Results are printed as a rich table and appended as JSON lines to ``--out`` (with a hardware fingerprint).

Example:
    python benchmarks/loader_throughput.py --threads 2 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SCALES = {"medium": {"size": 600, "large": False}, "large": {"size": None, "large": True},
          "large512": {"size": None, "large": True, "prepare": 512}}
DEFAULT_N = {"medium": 480, "large": 192, "large512": 192}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scales", default="medium,large",
                   help="comma-separated: medium (600x450), large (>=2048 px), large512 (large after `fastlesion "
                        "prepare --size 512`)")
    p.add_argument("--n", type=int, default=None,
                   help=f"images per synthetic set (default: {DEFAULT_N['medium']} medium, {DEFAULT_N['large']} large)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="DALI CPU threads = torch DataLoader workers (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--image-size", type=int, default=224, help="output image size (default 224)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per backend; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="batches dropped at the start of every repeat")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="untimed epochs per backend before the repeats (worker start, memory pools, page cache)")
    p.add_argument("--backends", default="torch,dali-cpu,dali-gpu",
                   help="comma-separated subset of torch, dali-cpu, dali-gpu (gpu only runs with CUDA)")
    p.add_argument("--cache", default=None, help="folder of the synthetic sets (default ~/.cache/fastlesion/bench)")
    p.add_argument("--seed", type=int, default=0, help="synthetic set and shuffling seed")
    p.add_argument("--no-fast-idct", action="store_true", help="DALI: accurate IDCT in training too")
    p.add_argument("--out", default=None, help="append one JSON line per (scale, backend) to this file")
    return p.parse_args(argv)


def dataset(scale: str, n: int, seed: int, cache: Path, threads: int):
    """The synthetic ISIC 2020 set of ``scale`` (generated once into the cache) and its table."""
    from fastlesion.data.catalog import load_isic2020
    from fastlesion.data.synthetic import generate

    spec = SCALES[scale]
    kind = "large" if spec["large"] else scale
    root = cache / f"isic2020-{kind}-n{n}-s{seed}"
    generate("isic2020", root, n=n, seed=seed, size=spec["size"], large=spec["large"], workers=max(1, threads),
             progress=sys.stderr.isatty())
    if spec.get("prepare"):  # the large set through `fastlesion prepare --size 512` (resumable: done once)
        from fastlesion.data.resize import prepare

        small = cache / f"isic2020-{kind}-n{n}-s{seed}-prepared{spec['prepare']}"
        prepare(root, small, size=spec["prepare"], workers=max(1, threads), progress=sys.stderr.isatty())
        root = small
    return load_isic2020(root).table


def image_dims(paths: list[str]) -> str:
    """Median width x height of the set, e.g. ``600x450``."""
    from PIL import Image

    dims = []
    for p in paths:
        with Image.open(p) as im:
            dims.append(im.size)
    w = statistics.median(d[0] for d in dims)
    h = statistics.median(d[1] for d in dims)
    return f"{int(w)}x{int(h)}"


def make_loader(backend: str, table, cfg, image_size: int):
    if backend == "torch":
        from fastlesion.data.torch_loader import TorchLoader

        return TorchLoader(table, cfg, image_size, train=True)
    from fastlesion.data.dali import DaliLoader

    device = backend.split("-")[1]
    return DaliLoader(table, cfg, image_size, train=True, device="cuda" if device == "gpu" else "cpu",
                      dali_device=device)


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_seconds(loader) -> float:
    """CPU time used so far by this process (all its threads: DALI) plus the DataLoader's worker processes."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    it = getattr(getattr(loader, "loader", None), "_iterator", None)  # torch: persistent worker processes
    for w in getattr(it, "_workers", None) or []:
        total += _proc_cpu_seconds(w.pid)
    return total


def time_epoch(loader, epoch: int, warmup: int) -> tuple[float, int, float]:
    """(images/s, images timed, CPU ms per image) of one epoch, after dropping ``warmup`` batches."""
    loader.set_epoch(epoch)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    images, t0, c0 = 0, None, 0.0
    for i, (x, _, _) in enumerate(loader):
        if i + 1 == warmup:
            sync()
            t0, c0 = time.perf_counter(), cpu_seconds(loader)
        elif i + 1 > warmup:
            images += x.shape[0]
    sync()
    if t0 is None or images == 0:
        raise SystemExit(f"epoch of {len(loader)} batches is too short for --warmup {warmup}: raise --n")
    # the torch workers' share of the last batches is read before they go idle: close enough for a per-image cost
    return images / (time.perf_counter() - t0), images, 1000 * (cpu_seconds(loader) - c0) / images


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from fastlesion.config import LoaderConfig
    from fastlesion.data import dali as dali_module
    from fastlesion.data.catalog import cache_dir
    from fastlesion.data.loader import dali_available
    from fastlesion.hardware import fingerprint

    console = Console(width=None if sys.stdout.isatty() else 150)
    cache = Path(args.cache).expanduser() if args.cache else cache_dir() / "bench"
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    for s in scales:
        if s not in SCALES:
            raise SystemExit(f"--scales: unknown scale {s!r} (choose from {', '.join(SCALES)})")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not dali_available():
        console.print("[yellow]NVIDIA DALI is not installed: only the torch loader is measured[/]")
        backends = [b for b in backends if not b.startswith("dali")]
    if "dali-gpu" in backends and not torch.cuda.is_available():
        backends.remove("dali-gpu")
    if "torch" not in backends:
        backends.insert(0, "torch")  # the ratio needs it
    dali_module.FAST_IDCT_TRAIN = not args.no_fast_idct
    fp = fingerprint()
    device_label = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {fp.get('cpu_model')}"
    torch.set_num_threads(max(1, args.threads))
    cfg = LoaderConfig(batch_size=args.batch_size, workers=args.threads, seed=args.seed)

    table = Table(title=f"loader throughput: train pipeline, {args.image_size}px, batch {args.batch_size}, "
                        f"{args.threads} threads/workers, median of {args.repeats}")
    numeric = ("threads", "images/s", "range", "vs torch", "CPU ms/img")
    for col in ("scale", "images", "backend", "device", *numeric):
        table.add_column(col, justify="right" if col in numeric else "left")
    records = []
    for scale in scales:
        n = args.n or DEFAULT_N[scale]
        data = dataset(scale, n, args.seed, cache, args.threads)
        dims = image_dims(data["path"].tolist())
        loaders = {b: make_loader(b, data, cfg, args.image_size) for b in backends}
        runs: dict[str, list[float]] = {b: [] for b in backends}
        cpu_ms: dict[str, list[float]] = {b: [] for b in backends}
        timed: dict[str, int] = {}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for b in backends:
            for e in range(args.warmup_epochs):
                for _ in loaders[b]:
                    pass
                loaders[b].set_epoch(1000 + e)
        for r in range(args.repeats):
            for b in backends:  # interleaved: background load slows every backend alike
                ips, timed[b], cms = time_epoch(loaders[b], r, args.warmup)
                runs[b].append(ips)
                cpu_ms[b].append(cms)
                console.print(f"  {scale} {b} repeat {r + 1}/{args.repeats}: {ips:.1f} images/s, "
                              f"{cms:.1f} CPU ms/image", style="dim")
        del loaders
        base = statistics.median(runs["torch"])
        for b in backends:
            med = statistics.median(runs[b])
            ratio = med / base
            name, device = ("torch", "cpu") if b == "torch" else ("dali", b.split("-")[1])
            table.add_row(scale, f"{dims} x{n}", name, device, str(args.threads), f"{med:.1f}",
                          f"{min(runs[b]):.1f}-{max(runs[b]):.1f}", f"{ratio:.2f}x",
                          f"{statistics.median(cpu_ms[b]):.1f}")
            records.append({
                "bench": "loader_throughput", "model": "loader", "mode": b, "device_name": device_label,
                "backend": name, "device": device, "image_scale": scale, "image_dims": dims, "threads": args.threads,
                "batch_size": args.batch_size, "image_size": args.image_size, "images_per_s": round(med, 2),
                "runs_images_per_s": [round(v, 2) for v in runs[b]], "ratio_vs_torch": round(ratio, 3),
                "repeats": args.repeats, "warmup_batches": args.warmup,
                "warmup_epochs": args.warmup_epochs, "timed_images_per_repeat": timed[b],
                "cpu_ms_per_image": round(statistics.median(cpu_ms[b]), 2), "load_avg_1m_before": load,
                "n_images": n, "fast_idct": (not args.no_fast_idct) if name == "dali" else None,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["python", "benchmarks/loader_throughput.py", *(argv or sys.argv[1:])]),
                "fingerprint": fp,
            })
    console.print(table)
    gpu = fp.get("gpu_name") or "no GPU"
    console.print(f"machine: {fp.get('cpu_model')}, {fp.get('cpu_cores_logical')} cores, {fp.get('ram_gb')} GB RAM, "
                  f"{gpu}; torch {fp.get('torch')}, DALI {fp.get('dali')}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for rec in records:
                f.write(json.dumps(rec, default=str) + "\n")
        console.print(f"appended {len(records)} JSON lines to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
