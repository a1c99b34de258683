"""``fastlesion`` command line: parses into the config and calls library functions, nothing more.

Any option of the config can be set with a dotted flag (``--optim.lr 3e-4`` or ``--optim.lr=3e-4``); the named
flags (``--model``, ``--data``, ``--epochs`` ...) are shortcuts for the common ones. User errors (a bad value, a
missing file) and failures of the machine (a read-only or full disk, a permission) print one line (``error: ...``)
and exit with status 2; anything else is a bug: its traceback, a line asking to report it, exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from fastlesion.config import ConfigError, load_config, to_dict
from fastlesion.errors import FastlesionError

SHORTCUTS = {  # flag dest -> dotted config key
    "data": "data.root", "dataset": "data.dataset", "csv": "data.csv", "fold": "data.fold",
    "exclude": "data.exclude_file", "image_size": "data.image_size", "model": "model.name",
    "pretrained": "model.pretrained_path", "epochs": "train.epochs", "batch_size": "loader.batch_size",
    "workers": "loader.workers", "backend": "loader.backend", "lr": "optim.lr", "ddp": "train.ddp",
    "out": "run.out", "task": "train.task",
}


def _dotted(extra: list[str]) -> list[str]:
    """``["--optim.lr", "3e-4", "--run.quiet=true"]`` -> ``["optim.lr=3e-4", "run.quiet=true"]``."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {tok!r} (config keys look like --section.key VALUE)")
        if "=" in tok:
            out.append(tok[2:])
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"{tok}: missing value")
            out.append(f"{tok[2:]}={extra[i + 1]}")
            i += 2
    return out


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The config flags every training entry takes (``fastlesion train``, ``fastlesion config``, tune/asha.py)."""
    p.add_argument("--config", help="YAML config file (defaults for everything not given)")
    p.add_argument("--data", metavar="ROOT", help="dataset root (data.root); omit for the built-in synthetic set")
    p.add_argument("--dataset", metavar="KIND",
                   help="synthetic | isic2020 | ham10000 | isic2019 | isic2018-seg | csv | folder (data.dataset)")
    p.add_argument("--task", choices=["classification", "segmentation"],
                   help="train.task (an isic2018-seg root implies segmentation)")
    p.add_argument("--csv", help="csv kind: the CSV file (data.csv)")
    p.add_argument("--model", help="model name (model.name); see `fastlesion models`")
    p.add_argument("--pretrained", metavar="FILE", help="local weights file (model.pretrained_path)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="loader.batch_size (per process)")
    p.add_argument("--image-size", dest="image_size", type=int, help="data.image_size")
    p.add_argument("--workers", type=int, help="loader.workers")
    p.add_argument("--backend", choices=["auto", "dali", "torch"], help="loader.backend")
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--exclude", metavar="FILE", help="exclusion list from `fastlesion check` (data.exclude_file)")


def build_config(args: argparse.Namespace, extra: list[str], base: str | Path | None = None):
    """Config file (or ``base``), then the shortcut flags, then dotted overrides (last wins)."""
    overrides = []
    for dest, key in SHORTCUTS.items():
        v = getattr(args, dest, None)
        if v is not None:
            overrides.append(f"{key}={v}")
    if getattr(args, "data", None) and not getattr(args, "dataset", None) and not getattr(args, "config", None):
        from fastlesion.data.catalog import detect_kind

        kind = detect_kind(Path(args.data))
        overrides.append(f"data.dataset={kind}")
        if kind == "isic2018-seg" and not getattr(args, "task", None):
            overrides.append("train.task=segmentation")  # a mask set trains masks
    for flag, key in (("quiet", "run.quiet"), ("overwrite", "run.overwrite")):
        if getattr(args, flag, False):
            overrides.append(f"{key}=true")
    return load_config(getattr(args, "config", None) or base, overrides + _dotted(extra))


# --------------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.engine.train import train

    if args.resume:
        cfg = build_config(args, extra, base=Path(args.resume) / "config.yaml")
        train(cfg, resume=args.resume)
        return 0
    cfg = build_config(args, extra)
    if args.folds == "all":
        from fastlesion.engine.folds import train_folds

        train_folds(cfg)
    else:
        train(cfg)
    return 0


def _synth_size(text: str | None) -> int | tuple[int, int] | None:
    """``synth --size``: ``"600"`` (a width; height = 3/4 of it) or ``"600x450"``; None/empty = the size mix."""
    import re

    from fastlesion.errors import DatasetError

    if text is None or not text.strip():
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if m is None:
        raise DatasetError(f"--size: expected an image width in px or WIDTHxHEIGHT (e.g. 600 or 600x450), "
                           f"got {text!r}")
    w, h = m.groups()
    return (int(w), int(h)) if h else int(w)


def cmd_synth(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.data.synthetic import generate

    size = _synth_size(args.size)
    out = generate(args.layout, args.out, n=args.n, seed=args.seed, size=size, large=args.large,
                   positive_rate=args.positive_rate, workers=args.workers, progress=True)
    print(f"wrote {args.n} {args.layout} images to {out}")
    return 0


def cmd_check(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.data.catalog import detect_kind, load_dataset
    from fastlesion.data.validate import format_summary, run_check

    root = Path(args.root)
    kind = args.dataset or detect_kind(root)
    task = args.task or ("segmentation" if kind == "isic2018-seg" else None)
    overrides = [f"data.root={root}", f"data.dataset={kind}"] + ([f"data.csv={args.csv}"] if args.csv else []) + (
        [f"train.task={task}"] if task else [])
    cfg = load_config(None, overrides + _dotted(extra))
    ds = load_dataset(cfg.data, strict=False, use_exclude=False, task=cfg.train.task)
    out = Path(args.out) if args.out else root
    masks = dict(zip(ds.table["path"], ds.table["mask"], strict=True)) if "mask" in ds.table.columns else None
    res = run_check(ds.table["path"].tolist(), out, root=ds.root, workers=args.workers, progress=not args.quiet,
                    missing=ds.missing, masks=masks, exclude_nonbinary=args.exclude_nonbinary)
    print(format_summary(res))
    return 0 if res.ok else 1


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.data.resize import prepare

    res = prepare(args.src, args.out, size=args.size, mode=args.mode, dataset=args.dataset, workers=args.workers,
                  progress=not args.quiet)
    print(res.summary())
    return 0 if res.ok else 1


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastlesion.models import describe_models

    t = Table(title=f"fastlesion models (params with {args.num_classes} classes; GFLOPs: forward, one "
                    f"{args.image_size}x{args.image_size} image)")
    for c in ("name", "family", "params", "GFLOPs", "note"):
        t.add_column(c, justify="right" if c in ("params", "GFLOPs") else "left")
    rows = describe_models(num_classes=args.num_classes, image_size=args.image_size, name_filter=args.filter)
    for r in rows:
        flops = "-" if r.get("flops") is None else f"{r['flops'] / 1e9:.2f}"
        t.add_row(r["name"], r.get("family", ""), f"{r['params'] / 1e6:.2f}M", flops, r.get("note", ""))
    Console().print(t)
    if not rows:
        print(f"no registered model name contains {args.filter!r}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.engine.inference import eval_checkpoint

    # --data without --dataset: the layout is detected, as `fastlesion train` does
    r = eval_checkpoint(args.checkpoint, _dotted(extra), split=args.split, tta=args.tta, out=args.out,
                        data=args.data, dataset=args.dataset)
    keys = (("dice", "iou", "jaccard65", "pixel_accuracy", "loss") if r.get("task") == "segmentation" else
            ("auc", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "loss"))
    print(f"{args.split} ({r['n']} images{', flip TTA' if args.tta else ''}): "
          + "  ".join(f"{k} {r[k]:.4f}" for k in keys) + f"\nwrote {r['out']}")
    return 0


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.engine.inference import predict

    df = predict(args.checkpoint, args.data, args.out, tta=args.tta, overrides=_dotted(extra), skip_bad=args.skip_bad,
                 progress=sys.stderr.isatty())
    what = "masks" if df.attrs.get("task") == "segmentation" else "predictions"
    print(f"wrote {len(df)} {what} to {df.attrs['out']}")
    if args.skip_bad:
        n = len(df.attrs["skipped"])
        print(f"skipped {n} unreadable image{'' if n == 1 else 's'} (listed in {df.attrs['skipped_file']})")
    return 0


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.report import compare_runs, print_comparison, write_comparison

    df = compare_runs(args.runs)
    print_comparison(df)
    paths = write_comparison(df, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.format, out=args.out, atol=args.atol, n_check=args.n, opset=args.opset)
    extra_files = "".join(f", {f}" for f in r.extra_files)
    print(f"wrote {r.path}{extra_files} ({r.format}, {r.metadata['model_name']}, input [N, 3, "
          f"{r.metadata['image_size']}, {r.metadata['image_size']}] RGB in [0, 1], normalised inside) and {r.sidecar}")
    print(f"check: {r.backend} vs PyTorch on {r.inputs}: max |diff| of the probabilities {r.max_abs_diff:.3g} "
          f"(bound {r.atol:g}): ok")
    return 0


def cmd_explain(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.explain import explain

    index = explain(args.checkpoint, args.images, out=args.out, method=args.method, split=args.split, n=args.n,
                    target_class=args.target_class, overrides=_dotted(extra))
    print(f"wrote {len(index)} {args.method} map{'' if len(index) == 1 else 's'} (layer {index.attrs['layer']}) "
          f"and {Path(args.out) / 'index.csv'}")
    return 0


def cmd_prune(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.prune import format_summary, prune_run

    s = prune_run(args.run, args.out, amount=args.amount, method=args.method, finetune_epochs=args.finetune_epochs,
                  finetune_lr=args.finetune_lr)
    print(format_summary(s))
    return 0


def cmd_eda(args: argparse.Namespace, extra: list[str]) -> int:
    from fastlesion.eda import run_eda

    res = run_eda(args.root, args.out, dataset=args.dataset, csv=args.csv, overrides=_dotted(extra),
                  samples=args.samples)
    print(f"{res['n_images']} images, {len(res['classes'])} classes; wrote {res['summary']} and "
          f"{len(res['files']) - 1} other files to {args.out}")
    return 0


def cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    import yaml

    from fastlesion.config import describe

    if args.reference:
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for key, tp, default, help_ in describe():
            print(f"| `{key}` | {tp} | `{default}` | {help_} |")
        return 0
    print(yaml.safe_dump(to_dict(build_config(args, extra)), sort_keys=False), end="")
    return 0


# --------------------------------------------------------------------------------------------------- parser
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlesion", description="Fast, fair training of skin-lesion classifiers. "
                                "Any config key can be set as --section.key VALUE (see `fastlesion config`).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__import__('fastlesion').__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (one fold, every fold, or under DDP)")
    add_config_args(t)
    t.add_argument("--ddp", type=int, help="start N local DDP workers (train.ddp); torchrun sets its own")
    t.add_argument("--out", help="run folder (run.out)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.pt")
    t.add_argument("--overwrite", action="store_true", help="replace a run folder that holds another run")
    t.add_argument("--fold", type=int, help="validation fold (data.fold)")
    t.add_argument("--folds", choices=["all"], help="'all': train every fold and report mean ± std and OOF AUC")
    t.add_argument("--quiet", action="store_true", help="no progress bars: one line per epoch")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("synth", help="write a synthetic ISIC 2020 / HAM10000 / ISIC 2019 dataset, or an ISIC 2018 "
                                     "Task 1 segmentation set (isic2018-seg: images and lesion masks)")
    s.add_argument("--layout", choices=["isic2020", "ham10000", "isic2020-challenge", "isic2019", "isic2018-seg"],
                   default="isic2020")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=800, help="number of training images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", help="image width (height = 3/4) or WxH; default: a mix of sizes around 600x450")
    s.add_argument("--large", action="store_true", help="2000-6000 px wide images, like the ISIC originals")
    s.add_argument("--positive-rate", type=float, help="fraction of malignant images (isic2020 default 0.05; "
                   "ham10000, isic2019, isic2018-seg: of melanoma-like lesions, default 0.111)")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=cmd_synth)

    c = sub.add_parser("check", help="decode every image; report problems; write an exclusion list")
    c.add_argument("root", metavar="DATA_ROOT")
    c.add_argument("--dataset", metavar="KIND",
                   help="isic2020 | isic2019 | ham10000 | isic2018-seg | csv | folder (default: detected)")
    c.add_argument("--csv", help="csv kind: the CSV file")
    c.add_argument("--task", choices=["classification", "segmentation"],
                   help="segmentation: check the masks too (csv kind: the data.mask_col column); implied by "
                        "isic2018-seg")
    c.add_argument("--exclude-nonbinary", dest="exclude_nonbinary", action="store_true",
                   help="also exclude masks with values other than 0 and one other (they are reported either way)")
    c.add_argument("--out", help="where check_report.csv and exclude.txt go (default: DATA_ROOT)")
    c.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_check)

    r = sub.add_parser("prepare", help="write a resized copy of a dataset (cheap reduced-size JPEG decoding)")
    r.add_argument("src", metavar="SRC")
    r.add_argument("--size", type=int, default=512)
    r.add_argument("--out", required=True, metavar="DST")
    r.add_argument("--mode", choices=["shorter", "square"], default="shorter")
    r.add_argument("--dataset", metavar="KIND", help="layout of SRC (default: detected); masks of isic2018-seg are "
                   "resized with nearest neighbour")
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=cmd_prepare)

    m = sub.add_parser("models", help="list model names with parameter counts")
    m.add_argument("--num-classes", type=int, default=2)
    m.add_argument("--image-size", dest="image_size", type=int, default=224,
                   help="input side the GFLOPs column is counted at (default 224)")
    m.add_argument("--filter", metavar="SUBSTR", help="only the models whose name contains SUBSTR")
    m.set_defaults(fn=cmd_models)

    e = sub.add_parser("eval", help="metrics and plots of a checkpoint on a split")
    e.add_argument("checkpoint")
    e.add_argument("--data", metavar="ROOT", help="another dataset root than the checkpoint's")
    e.add_argument("--dataset", metavar="KIND",
                   help="isic2020 | isic2019 | ham10000 | csv | folder (default: detected)")
    e.add_argument("--split", choices=["val", "test", "all"], default="val")
    e.add_argument("--tta", action="store_true", help="average over flips")
    e.add_argument("--out", help="output folder (default: next to the checkpoint)")
    e.set_defaults(fn=cmd_eval)

    pr = sub.add_parser("predict", help="predict ISIC test.csv (submission CSV) or a folder of images")
    pr.add_argument("checkpoint")
    pr.add_argument("--data", required=True, metavar="ROOT", help="ISIC root with test.csv, or a folder of images")
    pr.add_argument("--out", default=None, help="submission CSV (default submission.csv); a segmentation checkpoint: "
                    "the folder of PNG masks (default masks/)")
    pr.add_argument("--tta", action="store_true", help="average over flips")
    pr.add_argument("--skip-bad", action="store_true",
                    help="check every image first and leave the unreadable ones out (listed with the reason in "
                         "<out stem>.skipped.csv) instead of stopping at the first")
    pr.set_defaults(fn=cmd_predict)

    co = sub.add_parser("compare", help="compare run folders: table, CSV, Markdown and plot")
    co.add_argument("runs", nargs="+", metavar="RUN_DIR")
    co.add_argument("--out", default="comparison", help="output folder")
    co.set_defaults(fn=cmd_compare)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch")
    ex.add_argument("checkpoint")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", help="model file (default: next to the checkpoint, best.onnx / best.torchscript.pt); "
                                  "the metadata also goes to a JSON sidecar (model.onnx -> model.json)")
    ex.add_argument("--atol", type=float, default=1e-4, help="bound on the max abs difference of the probabilities")
    ex.add_argument("--n", type=int, default=8, help="validation images the check runs")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    ex.set_defaults(fn=cmd_export)

    xp = sub.add_parser("explain", help="class-activation maps (Grad-CAM, Grad-CAM++, Score-CAM) as PNGs")
    xp.add_argument("checkpoint")
    xp.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    xp.add_argument("--out", default="explain", help="output folder (PNGs and index.csv)")
    xp.add_argument("--method", choices=["gradcam", "gradcam++", "scorecam"], default="gradcam")
    xp.add_argument("--split", choices=["val", "test", "all"],
                    help="instead of images: the --n images of this split with the highest loss (val: its fold)")
    xp.add_argument("--n", type=int, default=16, help="images of --split")
    xp.add_argument("--class", dest="target_class", help="class to explain (default: the predicted one)")
    xp.set_defaults(fn=cmd_explain)

    pn = sub.add_parser("prune", help="prune a trained model (structured channels or unstructured weights) and "
                                      "measure params, FLOPs, size, CPU latency and val AUC before and after")
    pn.add_argument("run", metavar="RUN_DIR", help="run folder (its best.pt) or a checkpoint file")
    pn.add_argument("--amount", type=float, default=0.5, help="fraction of channels (structured) or weights "
                                                              "(unstructured) to remove (default 0.5)")
    pn.add_argument("--method", choices=["structured", "unstructured"], default="structured",
                    help="structured: remove channels with torch-pruning (pip install torch-pruning); "
                         "unstructured: global L1 weight pruning (zeros, same shapes)")
    pn.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=0,
                    help="fine-tune the pruned model this many epochs on its training fold")
    pn.add_argument("--finetune-lr", dest="finetune_lr", type=float,
                    help="constant fine-tuning lr (default: a tenth of the run's optim.lr)")
    pn.add_argument("--out", required=True, metavar="DIR", help="folder for best.pt and summary.json")
    pn.set_defaults(fn=cmd_prune)

    ed = sub.add_parser("eda", help="a look at a dataset: class balance per fold, groups, image sizes, metadata, "
                                    "sample grids and summary.md")
    ed.add_argument("root", metavar="DATA_ROOT")
    ed.add_argument("--dataset", metavar="KIND",
                   help="isic2020 | isic2019 | ham10000 | csv | folder (default: detected)")
    ed.add_argument("--csv", help="csv kind: the CSV file")
    ed.add_argument("--samples", type=int, default=8, help="thumbnails per class in samples_<class>.png")
    ed.add_argument("--out", required=True, metavar="DIR")
    ed.set_defaults(fn=cmd_eda)

    cf = sub.add_parser("config", help="print the resolved config (or --reference: every key)")
    add_config_args(cf)
    cf.add_argument("--reference", action="store_true", help="Markdown table of every key")
    cf.set_defaults(fn=cmd_config)
    return p


def os_error_line(e: OSError) -> str:
    """One line for an OSError of the machine: ``runs/x/metrics.csv: Read-only file system`` (the path(s) and the
    reason); without a path (a write to an open file), the reason and its errno name: ``No space left on device
    (ENOSPC)``."""
    reason = e.strerror or (str(e.args[-1]) if e.args else "") or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    if paths:
        return f"{' -> '.join(paths)}: {reason}"
    name = errno.errorcode.get(e.errno) if isinstance(e.errno, int) else None
    return f"{reason} ({name})" if name and name not in reason else reason


MACHINE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EFBIG")
                           if hasattr(errno, n))
"""errnos that are the machine's failure wherever they surface (a full or read-only disk, an I/O error)."""


def _machine_failure(e: BaseException) -> OSError | None:
    """The OSError of a full or read-only disk that ``e`` was raised while handling, if any: torch.save turns a
    full disk into ``RuntimeError: ... unexpected pos``, with the OSError as its context."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in MACHINE_ERRNOS:
            return cur
        # as a traceback shows the chain: the explicit cause, else the context unless `from None` hid it
        cur = cur.__cause__ if cur.__cause__ is not None else None if cur.__suppress_context__ else cur.__context__
    return None


def run_command(fn: Callable[[], int], verbose: bool = False) -> int:
    """Run a command body as every fastlesion script does: logging set up; a user error (:class:`FastlesionError`)
    or an OSError of the machine (permission, read-only or full disk, ...: any OSError carrying an errno, or another
    exception raised while handling a full or read-only disk) as one ``error:`` line and exit status 2, no traceback
    (``verbose`` adds it for an OSError); Ctrl-C as exit status 130; anything else is a bug: its traceback, then one
    line asking to report it, exit status 1."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return fn()
    except FastlesionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno is None:  # an OSError raised by a library without an errno is no failure of the machine
            return _bug()
        if verbose:
            traceback.print_exc()
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last resort: say it is a bug and how to report it
        cause = _machine_failure(e)
        if cause is None:
            return _bug()
        if verbose:
            traceback.print_exc()
        print(f"error: {os_error_line(cause)}", file=sys.stderr)
        return 2


def _bug() -> int:
    """The traceback of the exception being handled and one line asking to report it; exit status 1."""
    traceback.print_exc()
    version = __import__("fastlesion").__version__
    print(f"fastlesion {version}: this is a bug; please report it with the traceback above", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    return run_command(lambda: args.fn(args, extra), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
