"""Time to accuracy: wall-clock seconds until the validation AUC first reaches a target, per configuration.

Images/s says how fast a step is; a user waits for a good model. Each configuration (loader backend, model, AMP,
compile, channels_last) trains with the library's own :func:`fastlesion.engine.train.train` on the same data, split
and settings, and the ``report`` callback training calls after every epoch (the one Ray Tune trials use) stops the
run at the first epoch whose ``val_auc`` reaches ``--target-auc``. The clock starts at the ``train(cfg)`` call, so
model building, loader start-up, compilation, evaluation and checkpoint writing all count: what a user waits for.

A configuration is ``LOADER:MODEL:AMP:COMPILE[:CHANNELS_LAST]``:

* LOADER ``auto`` (what ``loader.backend=auto`` picks) | ``torch`` | ``dali`` | ``dali-cpu`` | ``dali-gpu``;
* MODEL a registry name (``fastlesion models``);
* AMP ``auto`` | ``off`` (or ``fp32``) | ``bf16`` | ``fp16``; COMPILE and CHANNELS_LAST ``auto`` | ``on`` | ``off``
  (CHANNELS_LAST defaults to ``auto``): the ``train.*`` values, ``auto`` resolved as training resolves it.

The first configuration is the baseline: every row carries ``speedup_vs_baseline`` (the baseline's seconds to target
over this one's, same seed; > 1 = reached sooner). With ``--seeds 0,1,2`` every configuration trains once per seed
(``train.seed`` and ``loader.seed``), seed by seed with the configurations in the given order, so that drift of a
shared machine hits them alike; the summary gives the median over seeds.

    python benchmarks/time_to_auc.py --target-auc 0.85 --out results.jsonl      # synthetic set, torch fp32 vs defaults
    python benchmarks/time_to_auc.py --data /data/isic2020 --target-auc 0.85 --max-epochs 15 \\
        --configs torch:resnet18:off:off:off,dali:resnet18:bf16:on:on --seeds 0,1,2 --out results.jsonl
    python benchmarks/time_to_auc.py --target-auc 0.9 --set optim.lr=3e-4 --set data.synthetic_n=1600

Row keys: ``config, loader, model, amp, compile, channels_last, seed, target_auc, reached, seconds_to_target,
epochs_to_target, train_seconds_to_target, best_auc, best_epoch, epochs_run, total_seconds, images_per_s,
val_auc_per_epoch, elapsed_s_per_epoch (seconds since the train() call at each epoch's end), speedup_vs_baseline,
status, error, fingerprint, ...``. ``--full-curves`` trains every configuration for all ``--max-epochs`` (the target
still timed at its first epoch), so that the rows also compare the validation curves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from fastlesion.hardware import cpu_has_native_bf16  # noqa: E402

DEFAULT_CONFIGS = "torch:resnet18:off:off:off,auto:resnet18:auto:auto:auto"
"""The plain PyTorch baseline (torch DataLoader, fp32, eager, NCHW) against the library's defaults."""
LOADERS = ("auto", "torch", "dali", "dali-cpu", "dali-gpu")
AMPS = {"auto": "auto", "off": "off", "fp32": "off", "bf16": "bf16", "fp16": "fp16"}
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class Spec:
    """One configuration: ``LOADER:MODEL:AMP:COMPILE[:CHANNELS_LAST]`` as the ``train``/``loader`` keys it sets."""

    text: str
    loader: str
    model: str
    amp: str
    compile: str
    channels_last: str = "auto"

    def overrides(self) -> dict[str, Any]:
        backend, _, device = self.loader.partition("-")
        return {"loader.backend": backend, "loader.device": device or "auto", "model.name": self.model,
                "train.amp": self.amp, "train.compile": self.compile, "train.channels_last": self.channels_last}


def parse_spec(text: str) -> Spec:
    """``torch:resnet18:off:off`` -> :class:`Spec`; anything else is one :class:`common.BenchmarkError` line."""
    parts = [p.strip() for p in text.split(":")]
    usage = "LOADER:MODEL:AMP:COMPILE[:CHANNELS_LAST] (e.g. torch:resnet18:off:off or dali:resnet18:bf16:on:on)"
    if len(parts) not in (4, 5) or not all(parts):
        raise common.BenchmarkError(f"--configs: {text!r} is not {usage}")
    loader, model, amp, compile_ = parts[:4]
    cl = parts[4] if len(parts) == 5 else "auto"
    for what, value, choices in (("loader", loader, LOADERS), ("AMP", amp, tuple(AMPS)),
                                 ("compile", compile_, SWITCHES), ("channels_last", cl, SWITCHES)):
        if value not in choices:
            raise common.BenchmarkError(f"--configs: {text!r}: {what} {value!r} is not one of {', '.join(choices)}")
    from fastlesion.errors import FastlesionError
    from fastlesion.models import model_task

    try:
        task = model_task(model)
    except FastlesionError as e:
        raise common.BenchmarkError(f"--configs: {text!r}: {e}") from None
    if task != "classification":
        raise common.BenchmarkError(f"--configs: {text!r}: {model} is a {task} model; time to AUC needs a "
                                    "classifier")
    return Spec(text=":".join([loader, model, amp, compile_, cl]), loader=loader, model=model, amp=AMPS[amp],
                compile=compile_, channels_last=cl)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target-auc", type=float, required=True, help="validation AUC to reach, in (0.5, 1]")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated LOADER:MODEL:AMP:COMPILE[:CHANNELS_LAST], the first one the baseline "
                        f"(default: {DEFAULT_CONFIGS})")
    p.add_argument("--data", default=None, help="dataset root (default: the built-in synthetic set, "
                                                "data.synthetic_* keys)")
    p.add_argument("--dataset", default=None, help="layout of --data (default: detected)")
    p.add_argument("--max-epochs", type=int, default=10, help="give up after this many epochs; also train.epochs, "
                                                              "so the lr schedule spans them (default: 10)")
    p.add_argument("--image-size", type=int, default=128, help="data.image_size (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="loader.batch_size (default: 32)")
    p.add_argument("--workers", type=int, default=None, help="loader.workers (default: the library's, the usable "
                                                             "CPU cores up to 8)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (train.seed and loader.seed); each "
                                                "configuration trains once per seed (default: 0)")
    p.add_argument("--config", default=None, help="a fastlesion YAML config as the base of every run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override for every run, e.g. optim.lr=3e-4 (repeatable)")
    p.add_argument("--runs", default=None, help="keep the run folders under this folder (default: a temporary "
                                                "folder, deleted at the end)")
    p.add_argument("--full-curves", action="store_true", help="train all --max-epochs even after the target is "
                                                                 "reached (whole validation curves in the rows; "
                                                                 "seconds_to_target is still the first time)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up (two steps of each "
                                                               "configuration) that keeps one-off start-up costs out "
                                                               "of the first configuration's time")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    args = p.parse_args(argv)
    if not 0.5 < args.target_auc <= 1.0:
        p.error(f"--target-auc must be in (0.5, 1], got {args.target_auc}")
    for flag in ("max_epochs", "image_size", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def spec_config(spec: Spec, seed: int, base: Any, epochs: int, run_dir: Path, **more: Any) -> Any:
    """``base`` with the configuration's keys, the seed, ``train.epochs`` and its own run folder."""
    from fastlesion.config import replace

    return replace(base, {**spec.overrides(), "train.seed": seed, "loader.seed": seed, "train.epochs": epochs,
                          "run.out": str(run_dir), "run.overwrite": True, **more})


def warm_up(specs: list[Spec], base: Any, runs: Path) -> None:
    """Two untimed training steps and one evaluation of each configuration, compiled ones eager: lazy imports,
    thread pools, DALI's start-up and the kernels' first calls are paid here, not by the first timed run; the
    compilation is not (so a compiled configuration's time includes it, as a user's first run does)."""
    from fastlesion.engine.train import train

    for i, spec in enumerate(specs):
        try:
            train(spec_config(spec, 0, base, 1, runs / f"warmup-{i}",
                              **{"train.steps_per_epoch": 2, "train.compile": "off"}))
        except Exception:  # noqa: BLE001 - the timed run of this configuration reports the failure in its row
            pass


class TargetReached(Exception):
    """Raised by the report callback to end ``train(cfg)`` at the epoch that reached the target."""


def base_config(args: argparse.Namespace, data_root: Path | None) -> Any:
    """The settings every run shares: ``--config``, the flags, ``--set`` (last wins); no early stopping (the
    target or ``--max-epochs`` ends a run), no TensorBoard or plots (nothing a benchmark reads)."""
    from fastlesion.config import load_config

    over: dict[str, Any] = {"data.image_size": args.image_size, "loader.batch_size": args.batch_size,
                            "train.patience": 0, "train.early_stop_metric": "val_auc", "run.quiet": True,
                            "run.plots": False, "run.tensorboard": False}
    if args.workers is not None:
        over["loader.workers"] = args.workers
    if data_root is not None:
        from fastlesion.data.catalog import detect_kind

        over.update({"data.root": str(data_root), "data.dataset": args.dataset or detect_kind(data_root)})
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise common.BenchmarkError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        over[key.strip()] = value.strip()
    return load_config(args.config, over)


def run_config(spec: Spec, seed: int, base: Any, args: argparse.Namespace, run_dir: Path,
               train_table: Any) -> dict[str, Any]:
    """Train one configuration until the target (or ``--max-epochs``); the row's measured keys."""
    from fastlesion.data.loader import choose_backend, resolve_dali_device
    from fastlesion.engine.runtime import resolve_runtime
    from fastlesion.engine.train import train

    cfg = spec_config(spec, seed, base, args.max_epochs, run_dir)
    rt = resolve_runtime(cfg.train)
    backend, _ = choose_backend(cfg.loader, train_table, cfg.data.image_size)  # what training's loader builds
    rows: list[dict[str, Any]] = []
    elapsed: list[float] = []  # seconds since the train() call at the end of each epoch
    reached: dict[str, Any] = {}

    def report(row: dict[str, Any], out: Path) -> None:
        rows.append(row)
        elapsed.append(time.perf_counter() - t0)
        if not reached and float(row["val_auc"]) >= args.target_auc:  # NaN (one class in validation) never does
            reached.update(seconds=elapsed[-1], epoch=int(row["epoch"]))
            if not args.full_curves:
                raise TargetReached

    t0 = time.perf_counter()
    try:
        train(cfg, report=report)
    except TargetReached:
        pass
    total = time.perf_counter() - t0
    aucs = [float(r["val_auc"]) for r in rows]
    done = rows[:reached["epoch"]] if reached else rows
    train_s = sum(float(r["train_seconds"]) for r in done)
    images = sum(float(r["images_per_s"]) * float(r["train_seconds"]) for r in done)
    best = max(range(len(aucs)), key=lambda i: aucs[i]) if aucs else None
    return {
        "loader": f"dali-{resolve_dali_device(cfg.loader)}" if backend == "dali" else backend,
        "amp": rt.amp_name, "compile": rt.compile, "channels_last": rt.channels_last, "device": rt.device.type,
        "workers": cfg.loader.resolved_workers(),
        "reached": bool(reached),
        "seconds_to_target": round(reached["seconds"], 2) if reached else None,
        "epochs_to_target": reached.get("epoch"),
        "train_seconds_to_target": round(sum(float(r["epoch_seconds"]) for r in done), 2) if reached else None,
        "best_auc": round(aucs[best], 4) if best is not None else None,
        "best_epoch": best + 1 if best is not None else None,
        "epochs_run": len(rows), "total_seconds": round(total, 2),
        "images_per_s": round(images / train_s, 2) if train_s > 0 else None,
        "val_auc_per_epoch": [round(a, 4) for a in aucs],
        "elapsed_s_per_epoch": [round(s, 2) for s in elapsed],
    }


def _print_results(rows: list[dict[str, Any]], specs: list[Spec], target: float) -> None:
    table = []
    for r in rows:
        table.append([r["config"], r["seed"], r["loader"], r["amp"], "on" if r["compile"] else "off",
                      "on" if r["channels_last"] else "off",
                      f"{r['seconds_to_target']:.1f}" if r.get("seconds_to_target") is not None else "-",
                      r.get("epochs_to_target") or "-",
                      f"{r['best_auc']:.4f}" if r.get("best_auc") is not None else "-",
                      f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-",
                      f"{r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else "-",
                      r["status"] + (f": {r['error']}" if r.get("error") else "")])
    common.print_table(f"Time to validation AUC {target} on {rows[0]['device_name']}" if rows else "Time to AUC",
                       ["config", "seed", "loader", "amp", "compile", "cl", "s to target", "epochs", "best AUC",
                        "images/s", "vs baseline", "status"], table)


def summary_lines(rows: list[dict[str, Any]], specs: list[Spec], target: float) -> list[str]:
    """One line per configuration: median seconds to target over the seeds that reached it, and its ratio to the
    baseline's median (``> 1`` = reached sooner)."""
    lines, base_s = [], None
    for i, spec in enumerate(specs):
        mine = [r for r in rows if r["config"] == spec.text and r["status"] == "ok"]
        hit = [r["seconds_to_target"] for r in mine if r["reached"]]
        med = statistics.median(hit) if hit else None
        if i == 0:
            base_s = med
        epochs = [r["epochs_to_target"] for r in mine if r["reached"]]
        what = (f"{med:.1f} s (median of {len(hit)}/{len(mine)} runs that reached it, epochs "
                f"{','.join(map(str, epochs))})" if med is not None else f"not reached in {len(mine)} run(s)")
        ratio = ("baseline" if i == 0 else f"{base_s / med:.2f}x baseline" if base_s and med
                 else "no ratio (one side did not reach the target)")
        lines.append(f"time to AUC {target}: {spec.text}: {what}; {ratio}")
    return lines


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the rows (also appended to ``--out``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_spec(t) for t in common.split_list(args.configs)]
    if not specs:
        raise common.BenchmarkError(f"--configs: no configuration given in {args.configs!r}")
    if len({s.text for s in specs}) != len(specs):
        raise common.BenchmarkError(f"--configs: a configuration is listed twice in {args.configs!r}")
    seeds = [int(s) for s in common.split_list(args.seeds) if s.isdigit()]
    if not seeds or len(seeds) != len(common.split_list(args.seeds)):
        raise common.BenchmarkError(f"--seeds: expected comma-separated whole numbers >= 0, got {args.seeds!r}")
    data_root = None
    if args.data:
        data_root = Path(args.data).expanduser()
        if not data_root.is_dir():
            raise common.BenchmarkError(f"--data {args.data}: no such folder")
    base = base_config(args, data_root)
    if base.train.task != "classification":
        raise common.BenchmarkError("time to AUC needs a classification set (train.task=classification)")
    from fastlesion.engine.train import prepare_data

    data = prepare_data(base)  # the synthetic set generated and the folds file written before any clock starts
    print(f"{base.data.dataset}: {len(data.split.train)} train / {len(data.split.val)} val images, fold "
          f"{base.data.fold}; {base.data.image_size} px, batch {base.loader.batch_size}, at most {args.max_epochs} "
          f"epochs; target val_auc {args.target_auc}", flush=True)
    settings = dict(vars(args), configs_resolved=[s.text for s in specs], seeds_resolved=seeds,
                    argv=sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if base.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    baseline: dict[int, float | None] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="time-to-auc-") as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp)
        if not args.no_warmup:
            warm_up(specs, base, runs)
            common.reset_compiler()
        for seed in seeds:
            for i, spec in enumerate(specs):
                row: dict[str, Any] = {
                    **common.base_row("time_to_auc", device, settings),
                    "config": spec.text, "model": spec.model, "seed": seed, "target_auc": args.target_auc,
                    "image_size": base.data.image_size, "batch_size": base.loader.batch_size,
                    "dataset": base.data.dataset, "n_train": len(data.split.train), "n_val": len(data.split.val),
                    "max_epochs": args.max_epochs, "status": "ok", "error": None, "speedup_vs_baseline": None}
                row["cpu_native_bf16"] = cpu_has_native_bf16()
                try:
                    row.update(run_config(spec, seed, base, args, runs / f"{i}-{spec.text.replace(':', '-')}-s{seed}",
                                          data.split.train))
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - recorded in the row, the other configurations go on
                    row.update(status="failed", error=common.one_line(e), reached=False, seconds_to_target=None)
                    for key in ("loader", "amp", "compile", "channels_last"):
                        row.setdefault(key, None)
                finally:
                    common.free_memory(device)
                    common.reset_compiler()
                if i == 0:
                    baseline[seed] = row["seconds_to_target"]
                if baseline.get(seed) and row["seconds_to_target"]:
                    row["speedup_vs_baseline"] = round(baseline[seed] / row["seconds_to_target"], 3)
                rows.append(row)
                common.append_jsonl(args.out, row)
                result = (f"{row['seconds_to_target']:.1f} s, epoch {row['epochs_to_target']}" if row["reached"]
                          else f"not reached (best AUC {row.get('best_auc')})" if row["status"] == "ok"
                          else f"FAILED {row['error']}")
                print(f"[{time.perf_counter() - t_start:6.0f} s] {spec.text} seed {seed}: {result}", flush=True)
    if rows:
        _print_results(rows, specs, args.target_auc)
        for line in summary_lines(rows, specs, args.target_auc):
            print(line)
    common.print_notes(["no GPU: CPU rows"] if device.type == "cpu" else [], rows, args.out)
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
