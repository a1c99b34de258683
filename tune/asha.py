#!/usr/bin/env python
"""Hyperparameter search with Ray Tune and ASHA: ``python tune/asha.py --data ROOT --num-samples 32``.

Takes the same config file, shortcut flags and dotted overrides as ``fastlesion train`` (the base config), a search
space file and the ASHA/resource settings; the logic is in :mod:`fastlesion.tune`. The search follows the base
config's task: classification ranks trials on ``val_auc`` (default space ``tune/space.yaml``), segmentation
(``--task segmentation``, or an ``isic2018-seg`` root) on ``val_iou`` (default space ``tune/space_seg.yaml``).
Examples::

    python tune/asha.py --data /data/isic2020 --dataset isic2020 --num-samples 32 --epochs 12 --gpus-per-trial 1
    python tune/asha.py --task segmentation --data /data/isic2018 --num-samples 16 --epochs 20
    python tune/asha.py --address auto ...          # an existing Ray cluster (ray start --head on the head node)
    python tune/asha.py --resume runs/tune-20250101-120000/asha

User errors print one line (``error: ...``) and exit with status 2; an interrupted search exits with 130 and
tells how to resume it. ``--resume`` unpickles Ray Tune's experiment state (``tuner.pkl``), which can run any code:
resume only experiment folders you trust (your own). A local Ray left running by a search killed with ``kill -9`` is
stopped by the next search's start (:func:`fastlesion.tune.resources.stop_leftover_rays`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fastlesion.cli import add_config_args, build_config, run_command

HERE = Path(__file__).resolve().parent
SPACE_FILES = {"classification": HERE / "space.yaml", "segmentation": HERE / "space_seg.yaml"}
"""``train.task`` -> the default ``--space`` (each the commented form of :data:`fastlesion.tune.DEFAULT_SPACES`)."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tune/asha.py",
        description="Search learning rate, optimizer, model and regularisation with Ray Tune's ASHA scheduler on "
                    "validation AUC (val_iou with --task segmentation). The base config is built like `fastlesion "
                    "train` (config file, flags, --section.key VALUE overrides); --epochs is ASHA's max_t.")
    add_config_args(p)
    p.add_argument("--fold", type=int, help="validation fold (data.fold)")
    s = p.add_argument_group("search")
    s.add_argument("--space", metavar="FILE", default=None,
                   help="search space YAML (default: tune/space.yaml; tune/space_seg.yaml for a segmentation base)")
    s.add_argument("--num-samples", type=int, default=16, help="number of trials (default 16)")
    s.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped (1)")
    s.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA: keep the top 1/N of trials at each rung (2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random search (0)")
    r = p.add_argument_group("resources")
    r.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractions allowed (default: 1 if there are GPUs, else 0 = CPU trials)")
    r.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs per trial (default: the CPUs shared among the GPU slots; 1 without GPUs)")
    r.add_argument("--address", help="existing Ray cluster: auto, or ray://HOST:10001 (default: a local Ray)")
    r.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial from its last checkpoint (2; -1 = forever)")
    o = p.add_argument_group("output")
    o.add_argument("--out", dest="tune_out", metavar="DIR",
                   help="experiment storage folder (default: runs/tune-<time>)")
    o.add_argument("--name", default="asha", help="experiment name: results go to <out>/<name> (asha)")
    o.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted experiment (<out>/<name>). This unpickles Ray Tune's tuner.pkl, "
                        "which can run arbitrary code: resume only experiment folders you trust")
    o.add_argument("--ray-verbose", type=int, choices=(0, 1, 2), default=0,
                   help="Ray's own console output: 0 = a line per trial epoch (default), 1 = Ray's status tables, "
                        "2 = everything Ray prints")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)

    def search() -> int:
        from fastlesion import tune as ft

        ft.import_ray()
        if args.resume:
            res = ft.resume_search(args.resume, address=args.address)
        else:
            cfg = build_config(args, extra)
            space = ft.load_space(args.space or SPACE_FILES[cfg.train.task])
            settings = ft.TuneSettings(
                num_samples=args.num_samples, max_t=cfg.train.epochs, grace_period=args.grace_period,
                reduction_factor=args.reduction_factor, gpus_per_trial=args.gpus_per_trial,
                cpus_per_trial=args.cpus_per_trial, seed=args.seed, max_failures=args.max_failures,
                ray_verbose=args.ray_verbose)
            out = Path(args.tune_out) if args.tune_out else Path("runs") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
            res = ft.run_search(cfg, space, settings, experiment_dir=out / args.name, address=args.address)
        return 130 if res.interrupted else 0

    return run_command(search, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
