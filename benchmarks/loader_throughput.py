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
Results are printed as a table and appended as JSON lines to ``--out``: rows like the other benchmarks' (device name,
hardware fingerprint, settings, CPU use of the process tree while timed), plus the loader's own keys.

Example:
    python benchmarks/loader_throughput.py --threads 2 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

SCALES = {"medium": {"size": 600, "large": False}, "large": {"size": None, "large": True},
          "large512": {"size": None, "large": True, "prepare": 512}}
DEFAULT_N = {"medium": 480, "large": 192, "large512": 192}
BACKENDS = ("torch", "dali-cpu", "dali-gpu")


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


def make_loader(backend: str, table, cfg, image_size: int, device: torch.device):
    """The training loader of ``backend`` through :func:`fastlesion.data.loader.build_loader`, as training builds it;
    batches land on ``device`` for dali-gpu, on the CPU for torch and dali-cpu."""
    from fastlesion.data.loader import build_loader

    return build_loader(table, cfg, image_size, train=True, device=device if backend == "dali-gpu" else "cpu")


def time_epoch(loader, epoch: int, warmup: int, device: torch.device) -> tuple[float, int, common.CpuMeter]:
    """(images/s, images timed, CPU meter of the timed part) of one epoch, after dropping ``warmup`` batches.

    The meter covers this process tree (DALI threads, DataLoader worker processes), read at the last batch,
    before the workers go idle.
    """
    loader.set_epoch(epoch)
    meter = common.CpuMeter()
    images, t0 = 0, None

    def start() -> float:
        common.sync(device)
        meter.start()
        return time.perf_counter()

    if warmup == 0:
        t0 = start()
    for i, (x, _, _) in enumerate(loader):
        if i + 1 == warmup:
            t0 = start()
        elif i + 1 > warmup:
            images += x.shape[0]
    common.sync(device)
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    meter.stop()
    if t0 is None or images == 0:
        raise common.BenchmarkError(f"an epoch of {len(loader)} batches is too short for --warmup {warmup}: "
                                    "raise --n or lower --warmup")
    return images / elapsed, images, meter


def _median(values: list[Any]) -> Any:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def resolve_backends(text: str, device: torch.device) -> tuple[list[str], list[str]]:
    """The backends asked for that can run here (torch always: the ratio needs it), and notes on the rest."""
    from fastlesion.data.loader import dali_available

    backends = common.split_list(text)
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise common.BenchmarkError(f"--backends: unknown {bad or text!r}; choose from {', '.join(BACKENDS)}")
    notes = []
    if not dali_available() and any(b.startswith("dali") for b in backends):
        notes.append("NVIDIA DALI is not installed: only the torch loader is measured")
        backends = [b for b in backends if not b.startswith("dali")]
    if "dali-gpu" in backends and device.type != "cuda":
        notes.append("dali-gpu left out: no GPU")
        backends.remove("dali-gpu")
    if "torch" not in backends:
        backends.insert(0, "torch")  # the ratio needs it
    return backends, notes


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also appended to ``--out``)."""
    args = parse_args(argv)
    from fastlesion.data.catalog import cache_dir

    cache = Path(args.cache).expanduser() if args.cache else cache_dir() / "bench"
    scales = common.split_list(args.scales)
    bad = [s for s in scales if s not in SCALES]
    if bad or not scales:
        raise common.BenchmarkError(f"--scales: unknown scale {bad[0] if bad else args.scales!r} "
                                    f"(choose from {', '.join(SCALES)})")
    device = common.resolve_device("auto")
    backends, run_notes = resolve_backends(args.backends, device)
    if device.type == "cpu":
        run_notes.append("no GPU: CPU rows")
    torch.set_num_threads(max(1, args.threads))
    fast_idct = not args.no_fast_idct
    configs = {b: common.loader_config(b, args.batch_size, args.threads, args.seed, fast_idct=fast_idct)
               for b in backends}
    settings = dict(vars(args))
    settings.update(device_resolved=str(device), backends_resolved=backends, scales_resolved=scales,
                    argv=sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", "benchmarks/loader_throughput.py", *(argv or sys.argv[1:])])
    rows: list[dict[str, Any]] = []
    for scale in scales:
        n = args.n or DEFAULT_N[scale]
        data = dataset(scale, n, args.seed, cache, args.threads)
        dims = image_dims(data["path"].tolist())
        loaders = {b: make_loader(b, data, configs[b], args.image_size, device) for b in backends}
        runs: dict[str, list[float]] = {b: [] for b in backends}
        cpu_ms: dict[str, list[float]] = {b: [] for b in backends}
        cpu: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        timed: dict[str, int] = {}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for b in backends:
            for e in range(args.warmup_epochs):
                loaders[b].set_epoch(1000 + e)
                for _ in loaders[b]:
                    pass
        for r in range(args.repeats):
            for b in backends:  # interleaved: background load slows every backend alike
                ips, timed[b], meter = time_epoch(loaders[b], r, args.warmup, device)
                runs[b].append(ips)
                cpu_ms[b].append(1000 * meter.cpu_seconds / timed[b])
                cpu[b].append(meter.result)
                print(f"  {scale} {b} repeat {r + 1}/{args.repeats}: {ips:.1f} images/s, "
                      f"{cpu_ms[b][-1]:.1f} CPU ms/image", flush=True)
        kinds = {b: (loaders[b].backend, loaders[b].device_name) for b in backends}
        del loaders
        base = statistics.median(runs["torch"])
        scale_rows = []
        for b in backends:
            med = statistics.median(runs[b])
            name, loader_device = kinds[b]
            scale_rows.append({
                **common.base_row("loader_throughput", device, settings),
                "model": "loader", "mode": b, "backend": name,
                "device": loader_device,  # where the loader decodes (cpu / gpu), not the torch device
                "image_scale": scale, "image_dims": dims, "threads": args.threads,
                "batch_size": args.batch_size, "image_size": args.image_size, "images_per_s": round(med, 2),
                "runs_images_per_s": [round(v, 2) for v in runs[b]], "ratio_vs_torch": round(med / base, 3),
                "repeats": args.repeats, "warmup_batches": args.warmup,
                "warmup_epochs": args.warmup_epochs, "timed_images_per_repeat": timed[b],
                "cpu_ms_per_image": round(statistics.median(cpu_ms[b]), 2), "load_avg_1m_before": load,
                "n_images": n, "fast_idct": configs[b].fast_idct if name == "dali" else None,
                "cpu_util_percent": _median([c["cpu_util_percent"] for c in cpu[b]]),
                "proc_cpu_percent": _median([c["proc_cpu_percent"] for c in cpu[b]]),
                "cpu_cores": cpu[b][0]["cpu_cores"],
                "command": command, "status": "ok", "error": None, "notes": "; ".join(run_notes),
            })
        common.append_jsonl(args.out, scale_rows)
        rows += scale_rows
    _print_results(rows, args)
    common.print_notes(run_notes, rows, args.out)
    return rows


def _print_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = [[r["image_scale"], f"{r['image_dims']} x{r['n_images']}", r["backend"], r["device"], r["threads"],
              f"{r['images_per_s']:.1f}", f"{min(r['runs_images_per_s']):.1f}-{max(r['runs_images_per_s']):.1f}",
              f"{r['ratio_vs_torch']:.2f}x", f"{r['cpu_ms_per_image']:.1f}",
              "-" if r["proc_cpu_percent"] is None else f"{r['proc_cpu_percent']:.1f}"] for r in rows]
    common.print_table(f"loader throughput: train pipeline, {args.image_size}px, batch {args.batch_size}, "
                       f"{args.threads} threads/workers, median of {args.repeats}",
                       ["scale", "images", "backend", "device", "threads", "images/s", "range", "vs torch",
                        "CPU ms/img", "proc CPU %"], table)
    if rows:
        fp = rows[0]["fingerprint"]
        print(f"machine: {rows[0]['machine']}, {fp.get('ram_gb')} GB RAM; torch {fp.get('torch')}, "
              f"DALI {fp.get('dali')}")


def main(argv: list[str] | None = None) -> int:
    return common.run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
