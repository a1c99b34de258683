"""Train-step throughput on synthetic input tensors: models x image/batch sizes x speed modes.

For each case a fresh model is built as training builds it and :func:`fastlesion.engine.loop.train_step` (forward,
backward, SGD step) runs on a fixed batch already on the device, so the number is what the model and the speed
switches (torch.compile, AMP, channels_last) give when the loader is fully hidden. The first step (lazy init,
cudnn autotune, compilation) and the warm-up are excluded and the compile time reported separately; the device is
synchronised around each timed block and the step time is the median over repeats. On out-of-memory the batch is
halved and retried down to 1; a model that fails (e.g. to compile) gets a ``failed`` row and the run goes on.

A segmentation model (``unet_resnet18``, ``unet_resnet34``, ``fpn_resnet34``, ...; ``fastlesion models``) is
measured as segmentation training runs it: one mask-logit channel, the Dice + BCE loss, and a batch of images with
float masks ``N x 1 x S x S`` (sizes must be multiples of 32); its rows say ``"task": "segmentation"``.

    python benchmarks/train_throughput.py --out results/train.jsonl                  # the full default matrix
    python benchmarks/train_throughput.py --models resnet50 --modes eager-fp32-nchw,compile-bf16-cl --batch-sizes 128
    python benchmarks/train_throughput.py --models resnet34,unet_resnet34 --image-sizes 256   # classifier vs U-Net
    python benchmarks/train_throughput.py --quick                                     # seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from fastlesion.engine.loop import train_step  # noqa: E402

DEFAULT_MODELS = "resnet18,resnet50,efficientnet_b0,densenet121,mobilenetv2_100"
NORMAL = {"models": DEFAULT_MODELS, "image_sizes": "224", "batch_sizes": "64", "steps": 20, "warmup": 5,
          "repeats": 3}
QUICK = {"models": "lenet,resnet18", "image_sizes": "32", "batch_sizes": "4", "steps": 2, "warmup": 1, "repeats": 2,
         "modes": "eager-fp32-nchw,eager-bf16-nchw,eager-fp32-cl"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", help=f"comma-separated model names (default: {DEFAULT_MODELS})")
    p.add_argument("--image-sizes", help="comma-separated square input sizes (default: 224)")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (default: 64; halved on out-of-memory)")
    p.add_argument("--modes", help="comma-separated <eager|compile>-<fp32|bf16|fp16>-<nchw|cl> (default: the full "
                                   "matrix; on CPU fp32 and bf16 only, on GPUs without bf16 fp32 and fp16)")
    p.add_argument("--compile-models", help="run the compile modes only for these models (default: all models)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default: 20)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing, the first one included (default: 5)")
    p.add_argument("--repeats", type=int, help="timed repeats; the median is reported (default: 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: None = 'default')")
    p.add_argument("--no-compile-cache", action="store_true", help="disable inductor's on-disk caches (cold "
                                                                    "compile times; a warm cache hides most)")
    p.add_argument("--num-classes", type=int, default=2, help="classifier outputs (default: 2, ISIC benign/malignant; "
                                                              "a segmentation model has one mask channel)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests (lenet/resnet18, 32 px, "
                                                        "batch 4, 2 steps, three eager modes)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else NORMAL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("steps", "warmup", "repeats"):
        if getattr(args, key) < (0 if key == "warmup" else 1):
            p.error(f"--{key} must be >= {0 if key == 'warmup' else 1}")
    return args


def default_modes(device: torch.device) -> tuple[list[str], list[str]]:
    """The mode matrix this device supports well, and notes on what was left out."""
    if device.type == "cpu":
        return common.all_modes(("fp32", "bf16")), ["fp16 autocast left out on CPU (slow or unsupported for some "
                                                     "ops); ask for it with --modes"]
    if not torch.cuda.is_bf16_supported():
        return common.all_modes(("fp32", "fp16")), ["bf16 left out: this GPU does not support it"]
    return common.all_modes(), []


def measure_case(name: str, image_size: int, batch: int, mode: str, device: torch.device,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one case; exceptions (OOM, compile failures) propagate to :func:`run_case`."""
    compile_, amp, cl = common.parse_mode(mode)
    rt = common.make_runtime(device, compile_, amp, cl, args.compile_mode)
    common.reset_peak_memory(device)
    s = common.build_training(name, args.num_classes, rt)
    data = common.synthetic_batch(batch, image_size, args.num_classes, device, cl, task=s.task)
    last: list[torch.Tensor] = []

    def step() -> None:
        last[:] = [train_step(s.model, data, s.loss_fn, s.optimizer, s.scaler, rt)]

    timing = common.time_steps(step, device, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    peak, peak_kind = common.peak_memory_mb(device)
    last_loss = float(last[0])
    return {
        "images_per_s": round(batch / timing.step_s, 2),
        "step_ms": round(1000 * timing.step_s, 3),
        "step_ms_repeats": [round(1000 * t, 3) for t in timing.repeat_step_s],
        "first_step_s": round(timing.first_step_s, 3),
        "compile_seconds": round(timing.compile_s, 3) if compile_ else None,
        "peak_mem_mb": round(peak, 1),
        "peak_mem_kind": peak_kind,
        "params": s.params,
        "loss_finite": bool(torch.isfinite(torch.tensor(last_loss))),
    }


def run_case(name: str, image_size: int, batch: int, mode: str, device: torch.device, args: argparse.Namespace,
             settings: dict[str, Any], run_notes: list[str]) -> dict[str, Any]:
    """One row: measure, halving the batch on out-of-memory; any other error gives a ``failed`` row."""
    compile_, amp, cl = common.parse_mode(mode)
    row: dict[str, Any] = {
        **common.base_row("train_step", device, settings),
        "model": name, "task": common.model_task(name), "mode": mode, "compile": compile_, "amp": amp,
        "channels_last": cl,
        "image_size": image_size, "requested_batch_size": batch, "batch_size": batch,
        "images_per_s": None, "step_ms": None, "first_step_s": None, "compile_seconds": None, "peak_mem_mb": None,
        "status": "ok", "error": None,
    }
    notes = list(run_notes)
    b = batch
    while True:
        err: BaseException | None = None
        try:
            row.update(measure_case(name, image_size, b, mode, device, args))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
            err = e
        finally:
            common.free_memory(device)
            if compile_:
                common.reset_compiler()
        if err is None:
            row["batch_size"] = b
            break
        oom, text = common.is_oom(err), common.one_line(err)
        err = None  # drop the traceback (and the tensors its frames hold) before retrying
        common.free_memory(device)
        if oom and b > 1:
            notes.append(f"out of memory at batch {b}, retried with {b // 2}")
            b //= 2
            continue
        row.update(status="oom" if oom else "failed", error=text, batch_size=b)
        break
    row["notes"] = "; ".join(notes)
    return row


def _print_results(rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        table.append([r["model"], r["mode"], r["image_size"],
                      r["batch_size"] if r["batch_size"] == r["requested_batch_size"]
                      else f"{r['batch_size']} (asked {r['requested_batch_size']})",
                      f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-",
                      f"{r['step_ms']:.1f}" if r["step_ms"] else "-",
                      f"{r['compile_seconds']:.1f}" if r.get("compile_seconds") is not None else "-",
                      f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] else "-",
                      r["status"] + (f": {r['error']}" if r["error"] else "")])
    common.print_table(f"Train-step throughput on {rows[0]['device_name']}" if rows else "Train-step throughput",
                       ["model", "mode", "size", "batch", "images/s", "step ms", "compile s", "peak MB", "status"],
                       table)


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also appended to ``--out``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_compile_cache:
        common.disable_compile_caches()
    device = common.resolve_device(args.device)
    run_notes: list[str] = []
    if args.modes is None:
        modes, mode_notes = default_modes(device)
        run_notes += mode_notes
    else:
        modes = common.split_list(args.modes)
        if not modes:
            raise common.BenchmarkError(f"--modes: no mode given in {args.modes!r}")
        for m in modes:
            try:
                common.parse_mode(m)
            except ValueError as e:
                raise common.BenchmarkError(f"--modes: {e}") from None
    if device.type == "cpu":
        run_notes.append("no GPU: CPU rows; peak_mem_mb is the process's peak RSS")
    models = common.split_list(args.models)
    if not models:
        raise common.BenchmarkError(f"--models: no model given in {args.models!r}")
    image_sizes = common.int_list(args.image_sizes, "--image-sizes")
    common.check_seg_sizes(models, image_sizes)
    batch_sizes = common.int_list(args.batch_sizes, "--batch-sizes")
    compile_models = set(common.split_list(args.compile_models)) if args.compile_models else None
    settings = {k: v for k, v in vars(args).items()}
    settings.update(device_resolved=str(device), modes_resolved=modes, argv=sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for name in models:
        for size in image_sizes:
            for batch in batch_sizes:
                for mode in modes:
                    if mode.startswith("compile") and compile_models is not None and name not in compile_models:
                        continue
                    row = run_case(name, size, batch, mode, device, args, settings, run_notes)
                    rows.append(row)
                    common.append_jsonl(args.out, row)
                    extra = f" compile {row['compile_seconds']:.1f} s" if row.get("compile_seconds") else ""
                    result = (f"{row['images_per_s']:.1f} img/s ({row['step_ms']:.1f} ms/step, batch "
                              f"{row['batch_size']}){extra}" if row["status"] == "ok"
                              else f"{row['status'].upper()} {row['error']}")
                    print(f"[{time.perf_counter() - t_start:6.0f} s] {name} {size}px b{batch} {mode}: {result}",
                          flush=True)
    if rows:
        _print_results(rows)
        common.print_mode_ratios(common.mode_ratios(rows))
    common.print_notes(run_notes, rows, args.out)
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
