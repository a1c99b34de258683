"""End-to-end training throughput from JPEG files on disk, per loader backend (DALI gpu / DALI cpu / torch).

For each backend the same model, batch and speed settings are first timed on a fixed input tensor already on the
device (the synthetic-input rate: the loader fully hidden), then on batches from the loader training uses
(:func:`fastlesion.data.loader.build_loader`, decoding and augmenting the JPEGs). Both use
:func:`fastlesion.engine.loop.train_step`. Reported per backend: images/s, the fraction of the synthetic-input rate
reached (1.0 = the loader costs nothing), the time per step blocked waiting for the next batch, GPU utilisation and
memory (NVML, sampled in a background thread) and CPU utilisation.

Segmentation (``--task segmentation``; the default for a segmentation ``--model`` such as ``unet_resnet34``): the
loader decodes each image with its mask and applies the same random crop, flips and rotation to both, the step
trains one mask-logit channel with the Dice + BCE loss, and the synthetic-input rate uses images with float masks.
The data is a segmentation set (``--data`` in the ``isic2018-seg`` layout, or ``--dataset csv`` with a mask column),
or a generated synthetic ``isic2018-seg`` set.

    python benchmarks/end_to_end.py --out results/e2e.jsonl        # synthetic ISIC-like JPEGs, every backend here
    python benchmarks/end_to_end.py --data /data/isic2020 --model resnet50 --batch-size 128 --workers 8
    python benchmarks/end_to_end.py --model unet_resnet34 --out results/e2e.jsonl   # U-Net on a synthetic mask set
    python benchmarks/end_to_end.py --quick                         # seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from fastlesion.config import DataConfig, TrainConfig  # noqa: E402
from fastlesion.data.loader import build_loader, dali_available  # noqa: E402
from fastlesion.engine.loop import train_step  # noqa: E402
from fastlesion.engine.runtime import resolve_runtime  # noqa: E402
from fastlesion.errors import FastlesionError  # noqa: E402
from fastlesion.models import model_task as registry_task  # noqa: E402

BACKENDS = ("torch", "dali-cpu", "dali-gpu")
TASKS = ("classification", "segmentation")
SCALES = {"small": 128, "medium": None, "large": None}  # image width; None = the generator's mix (or large mix)
NORMAL = {"batch_size": 64, "image_size": 224, "workers": min(8, os.cpu_count() or 1),
          "steps": 30, "warmup": 5, "repeats": 3, "n": 1000, "scale": "medium"}
QUICK = {"batch_size": 8, "image_size": 64, "workers": 1, "steps": 3, "warmup": 2, "repeats": 1,
         "n": 32, "scale": "small"}
DEFAULT_MODELS = {(False, "classification"): "resnet50", (False, "segmentation"): "unet_resnet34",
                  (True, "classification"): "lenet", (True, "segmentation"): "unet_mobilenetv3_small_050"}
"""(--quick, task) -> the model benchmarked when --model is not given."""
SYNTHETIC_LAYOUTS = {"classification": "isic2020", "segmentation": "isic2018-seg"}
"""task -> the layout of the generated set."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="dataset root with JPEGs (isic2020, ham10000 or folder layout); "
                                                "default: a synthetic ISIC-like set generated into "
                                                "~/.cache/fastlesion/bench")
    p.add_argument("--dataset", default=None, help="layout of --data (default: detected)")
    p.add_argument("--n", type=int, help="images of the generated set (default: 1000)")
    p.add_argument("--scale", choices=tuple(SCALES),
                   help="generated image sizes: small (128 px wide), medium (512-768 px, default), "
                        "large (2000-6000 px, like the ISIC originals)")
    p.add_argument("--model", help="model name (default: resnet50; unet_resnet34 with --task segmentation)")
    p.add_argument("--task", choices=TASKS, help="classification | segmentation (default: the task of --model; "
                                                "segmentation reads images with masks)")
    p.add_argument("--backends", default=None, help=f"comma-separated of {', '.join(BACKENDS)} (default: those "
                                                    "available here)")
    p.add_argument("--batch-size", type=int, help="batch size (default: 64)")
    p.add_argument("--image-size", type=int, help="square input size (default: 224)")
    p.add_argument("--workers", type=int, help="DataLoader workers / DALI CPU threads (default: min(8, cores))")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default: 30)")
    p.add_argument("--warmup", type=int, help="untimed steps first (pipeline start, compile; default: 5)")
    p.add_argument("--repeats", type=int, help="timed repeats; medians are reported (default: 3)")
    p.add_argument("--amp", default="auto", choices=("auto", "fp32", "off", "bf16", "fp16"),
                   help="auto: as training (bf16 or fp16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on with CUDA")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto: on with CUDA")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--no-compile-cache", action="store_true", help="disable inductor's on-disk caches "
                                                                    "(cold compile times)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests (32 small JPEGs, lenet or "
                                                        "unet_mobilenetv3_small_050, 64 px, batch 8, 3 steps)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else NORMAL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model = DEFAULT_MODELS[(args.quick, args.task or "classification")]
    if args.task is None:
        args.task = common.model_task(args.model)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1 or args.batch_size < 1 or args.n < 1:
        p.error("--steps, --repeats, --warmup, --batch-size and --n must be >= 1")
    return args


def prepare_data(args: argparse.Namespace) -> Path:
    """``--data`` as given, or the synthetic set of the task (isic2020, or isic2018-seg with masks) for
    ``--n``/``--scale``, generated once into the cache."""
    if args.data:
        root = Path(args.data).expanduser()
        if not root.is_dir():
            raise common.BenchmarkError(f"--data {args.data}: no such folder")
        return root
    from fastlesion.data.catalog import cache_dir
    from fastlesion.data.synthetic import generate

    layout = SYNTHETIC_LAYOUTS[getattr(args, "task", None) or "classification"]
    root = cache_dir() / "bench" / f"{layout}-n{args.n}-{args.scale}"
    print(f"dataset: synthetic {layout}, {args.n} images ({args.scale}) in {root}", flush=True)
    return generate(layout, root, n=args.n, seed=0, size=SCALES[args.scale], large=args.scale == "large",
                    workers=min(4, os.cpu_count() or 1), progress=not args.quick)


def load_table(root: Path, dataset: str | None, task: str = "classification"):
    """The catalog's dataset of ``root`` (kind detected unless ``dataset``), read for ``task``; a set of the other
    task (no masks for a segmentation model, masks for a classifier) is a :class:`common.BenchmarkError`."""
    from fastlesion.data.catalog import detect_kind, load_dataset

    kind = dataset or detect_kind(root)
    kwargs = {"task": task} if task != "classification" else {}
    ds = load_dataset(DataConfig(dataset=kind, root=str(root)), progress=False, **kwargs)
    found = getattr(ds, "task", "classification")
    if found != task:
        what = "holds masks (a segmentation set)" if found == "segmentation" else "has no masks"
        raise common.BenchmarkError(f"--data {root}: the {kind} set {what}, but the benchmark trains a {task} "
                                    f"model; pass --task {found} with a {found} --model, or another --data")
    return ds


def default_backends(device: torch.device) -> tuple[list[str], list[str]]:
    notes = []
    backends = ["torch"]
    if dali_available():
        backends.append("dali-cpu")
        if device.type == "cuda":
            backends.append("dali-gpu")
        else:
            notes.append("dali-gpu left out: no GPU")
    else:
        notes.append("DALI not installed: torch loader only")
    return backends, notes


def endless(loader) -> Iterator[tuple]:
    """Batches of the loader over as many epochs as asked (``set_epoch`` at each new epoch, as training does)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the loader yielded no batch (dataset smaller than one batch?)")
        epoch += 1


def measure_backend(backend: str, table, num_classes: int, rt, args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic-input rate, then loader-fed rate, for one backend (a fresh model, so backends start equal).

    A segmentation table (a ``mask`` column) makes the loader yield ``(images, masks, idx)``: the step is the same
    ``train_step`` with the masks as targets."""
    device = rt.device
    s = common.build_training(args.model, num_classes, rt, task=args.task)
    data = common.synthetic_batch(args.batch_size, args.image_size, num_classes, device, rt.channels_last,
                                  task=s.task)

    def synthetic_step() -> None:
        train_step(s.model, data, s.loss_fn, s.optimizer, s.scaler, rt)

    with common.GpuSampler(device) as gpu_syn:
        timing = common.time_steps(synthetic_step, device, warmup=args.warmup, steps=args.steps,
                                   repeats=args.repeats)

    common.reset_peak_memory(device)
    loader = build_loader(table, common.loader_config(backend, args.batch_size, args.workers), args.image_size,
                          train=True, device=device, channels_last=rt.channels_last)
    backend_name, loader_device = loader.backend, loader.device_name
    it = endless(loader)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        x, y, _ = next(it)
        train_step(s.model, (x, y), s.loss_fn, s.optimizer, s.scaler, rt)
    common.sync(device)
    warmup_s = time.perf_counter() - t0

    rates, waits, steps_s = [], [], []
    cpu = common.CpuMeter().start()
    gpu = common.GpuSampler(device).start()
    try:
        for _ in range(args.repeats):
            images, wait = 0, 0.0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tw = time.perf_counter()
                x, y, _ = next(it)
                wait += time.perf_counter() - tw
                train_step(s.model, (x, y), s.loss_fn, s.optimizer, s.scaler, rt)
                images += x.shape[0]
            common.sync(device)
            elapsed = time.perf_counter() - t0
            rates.append(images / elapsed)
            waits.append(wait / args.steps)
            steps_s.append(elapsed / args.steps)
    finally:
        gpu_summary = gpu.stop()
        cpu_summary = cpu.stop()
    del x, y, it, loader
    # the synthetic rate again after the loader run: machine load that drifted during the run shows up as a gap
    # between the two, and the median over both halves is what the loader-fed rate is compared with
    after = common.time_steps(synthetic_step, device, warmup=1, steps=args.steps, repeats=args.repeats)
    synthetic_s = statistics.median(timing.repeat_step_s + after.repeat_step_s)
    synthetic_ips = args.batch_size / synthetic_s
    peak, peak_kind = common.peak_memory_mb(device)
    result = {
        "loader_backend": backend_name,
        "loader_device": loader_device,
        "images_per_s": round(statistics.median(rates), 2),
        "images_per_s_repeats": [round(r, 2) for r in rates],
        "step_ms": round(1000 * statistics.median(steps_s), 3),
        "synthetic_images_per_s": round(synthetic_ips, 2),
        "synthetic_images_per_s_before": round(args.batch_size / timing.step_s, 2),
        "synthetic_images_per_s_after": round(args.batch_size / after.step_s, 2),
        "synthetic_step_ms": round(1000 * synthetic_s, 3),
        "fraction_of_synthetic": round(statistics.median(rates) / synthetic_ips, 4),
        "data_wait_ms": round(1000 * statistics.median(waits), 3),
        "data_wait_fraction": round(statistics.median(waits) / statistics.median(steps_s), 4),
        "warmup_s": round(warmup_s, 3),
        "first_step_s": round(timing.first_step_s, 3),
        "compile_seconds": round(timing.compile_s, 3) if rt.compile else None,
        "peak_mem_mb": round(peak, 1),
        "peak_mem_kind": peak_kind,
        "synthetic_gpu_util_mean": gpu_syn.summary()["gpu_util_mean"],
        **gpu_summary,
        **cpu_summary,
        "params": s.params,
    }
    return result


def run_backend(backend: str, table, num_classes: int, rt, args: argparse.Namespace, settings: dict[str, Any],
                run_notes: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    device = rt.device
    row: dict[str, Any] = {
        **common.base_row("end_to_end", device, settings),
        "model": args.model, "task": args.task, "mode": mode_of(rt), "compile": rt.compile, "amp": amp_of(rt),
        "channels_last": rt.channels_last, "backend": backend, "loader_backend": None,
        "loader_device": backend.split("-", 1)[1] if backend.startswith("dali") else "cpu",
        "batch_size": args.batch_size, "requested_batch_size": args.batch_size, "image_size": args.image_size,
        "workers": args.workers, "images_per_s": None, "synthetic_images_per_s": None, "fraction_of_synthetic": None,
        "data_wait_ms": None, "gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_mb": None,
        "cpu_util_percent": None, "status": "ok", "error": None, **extra,
    }
    notes = list(run_notes)
    if backend == "dali-gpu" and device.type != "cuda":
        row.update(status="skipped", error="dali-gpu needs a CUDA device")
    elif backend.startswith("dali") and not dali_available():
        row.update(status="skipped", error="NVIDIA DALI is not installed")
    else:
        err: BaseException | None = None
        try:
            row.update(measure_backend(backend, table, num_classes, rt, args))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
            err = e
        if err is not None:
            row.update(status="oom" if common.is_oom(err) else "failed", error=common.one_line(err))
            err = None
        common.free_memory(device)
        if rt.compile:
            common.reset_compiler()
        if row.get("loader_backend") and row["loader_backend"] != backend.split("-")[0]:
            notes.append(f"asked for {backend}, the loader fell back to {row['loader_backend']}")
        if row.get("gpu_note"):
            notes.append(row["gpu_note"])
        warning = drift_warning(row)
        if warning:
            notes.append(warning)
            print(f"warning: {backend}: {warning}", flush=True)
    row["notes"] = "; ".join(dict.fromkeys(notes))
    return row


def drift_warning(row: dict[str, Any], max_drift: float = 1.5, max_fraction: float = 1.1) -> str | None:
    """A note when the row cannot be trusted: the synthetic-input rate moved a lot between its measurement before
    and after the loader run, or the loader-fed rate beats it (both mean that other load on the machine came and
    went: tiny steps on a busy machine). ``None`` for a plausible row."""
    before, after = row.get("synthetic_images_per_s_before"), row.get("synthetic_images_per_s_after")
    problems = []
    if before and after and max(before, after) / min(before, after) > max_drift:
        problems.append(f"the synthetic-input rate changed {before:.1f} -> {after:.1f} images/s during the run")
    fraction = row.get("fraction_of_synthetic")
    if fraction is not None and fraction > max_fraction:
        problems.append(f"the loader-fed rate is {fraction:.2f}x the synthetic-input rate")
    if not problems:
        return None
    return "unreliable: " + " and ".join(problems) + " (other load on the machine?); rerun on an idle machine " \
           "or with more --steps"


def amp_of(rt) -> str:
    return {"off": "fp32"}.get(rt.amp_name, rt.amp_name)


def mode_of(rt) -> str:
    return common.mode_name(rt.compile, amp_of(rt), rt.channels_last)


def backend_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``dali-* vs torch`` images/s ratios per (model, mode, batch, image size), from rows of one run."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("images_per_s"):
            key = (r["model"], r["mode"], r["batch_size"], r["image_size"])
            groups.setdefault(key, {})[r["backend"]] = float(r["images_per_s"])
    out = []
    for key, by in groups.items():
        for b in ("dali-cpu", "dali-gpu"):
            if b in by and "torch" in by:
                out.append({"model": key[0], "mode": key[1], "batch_size": key[2], "image_size": key[3],
                            "comparison": f"{b} vs torch", "ratio": by[b] / by["torch"]})
    return out


def _print_results(rows: list[dict[str, Any]]) -> None:
    def f(v: Any, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    table = [[r["backend"], r["mode"], r["batch_size"], f(r["images_per_s"]), f(r["synthetic_images_per_s"]),
              f(r["fraction_of_synthetic"], ".2f"), f(r["data_wait_ms"]), f(r["gpu_util_mean"]),
              f(r["gpu_mem_mb"], ".0f"), f(r["cpu_util_percent"]), f(r.get("proc_cpu_percent")),
              r["status"] + (f": {r['error']}" if r["error"] else "")] for r in rows]
    common.print_table(f"End-to-end training throughput: {rows[0]['model']} on {rows[0]['device_name']}",
                       ["backend", "mode", "batch", "images/s", "synthetic img/s", "fraction", "data wait ms",
                        "GPU util %", "GPU MB", "CPU util %", "proc CPU %", "status"], table)
    ratios = backend_ratios(rows)
    for r in rows:
        if r["status"] == "ok":
            hidden = "loader hidden" if r["fraction_of_synthetic"] >= 0.9 else "loader-bound"
            if drift_warning(r):
                hidden = "unreliable, see the warning"
            print(f"{r['backend']}: {r['fraction_of_synthetic']:.2f} of the synthetic-input rate ({hidden})")
    for r in ratios:
        print(f"{r['comparison']} ({r['model']}, {r['mode']}, batch {r['batch_size']}): {r['ratio']:.2f}x")
    if not ratios:
        print("DALI vs torch: not measured in this run (needs the torch backend and a DALI backend)")


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_compile_cache:
        common.disable_compile_caches()
    device = common.resolve_device(args.device)
    try:
        model_task = registry_task(args.model)
    except FastlesionError:  # an unknown name fails in its rows, as before
        model_task = args.task
    if model_task != args.task:
        raise common.BenchmarkError(f"--task {args.task}: --model {args.model} is a {model_task} model (leave --task "
                                    "out to follow the model, or pick a model of that task: `fastlesion models`)")
    if args.task == "segmentation":
        common.check_seg_sizes([args.model], [args.image_size], "--image-size")
    amp = {"fp32": "off"}.get(args.amp, args.amp)
    rt = resolve_runtime(TrainConfig(device=device.type, amp=amp, compile=args.compile,
                                     channels_last=args.channels_last, compile_mode=args.compile_mode),
                         local_rank=device.index or 0)
    run_notes: list[str] = []
    if args.backends:
        backends = common.split_list(args.backends)
        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise common.BenchmarkError(f"--backends: unknown {bad or args.backends!r}; choose from "
                                        f"{', '.join(BACKENDS)}")
    else:
        backends, notes = default_backends(device)
        run_notes += notes
    if device.type == "cpu":
        run_notes.append("no GPU: CPU rows; GPU utilisation columns empty")
    root = prepare_data(args)
    ds = load_table(root, args.dataset, args.task)
    extra = {"dataset_root": str(root), "num_images": len(ds.table), "num_classes": ds.num_classes}
    settings = dict(vars(args))
    settings.update(runtime=rt.describe(), backends_resolved=backends, argv=sys.argv[1:] if argv is None else argv)
    what = "with masks" if args.task == "segmentation" else f"{ds.num_classes} classes"
    print(f"{len(ds.table)} images, {what}; {args.model}; {rt.describe()}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for backend in backends:
        row = run_backend(backend, ds.table, ds.num_classes, rt, args, settings, run_notes, extra)
        rows.append(row)
        common.append_jsonl(args.out, row)
        result = (f"{row['images_per_s']:.1f} img/s = {row['fraction_of_synthetic']:.2f} of synthetic "
                  f"{row['synthetic_images_per_s']:.1f}, data wait {row['data_wait_ms']:.1f} ms/step"
                  if row["status"] == "ok" else f"{row['status'].upper()} {row['error']}")
        print(f"[{time.perf_counter() - t_start:6.0f} s] {args.model} {backend}: {result}", flush=True)
    _print_results(rows)
    common.print_notes(run_notes, rows, args.out)
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
