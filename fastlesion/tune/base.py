"""The base config, made ready once before the trials start: absolute paths, and the dataset and its folds on disk.

Trials run in other working folders, on other machines and at the same time, so anything they would resolve or
write themselves (a relative path, the folds file, the synthetic set) is settled here, in the driver.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastlesion.config import Config, lookup, replace
from fastlesion.errors import FastlesionError

log = logging.getLogger(__name__)

PATH_KEYS = ("data.root", "data.folds_file", "data.exclude_file", "model.pretrained_path")


def absolute_paths(cfg: Config) -> Config:
    """Trials run in other working folders (and best.yaml anywhere): make the config's paths absolute."""
    paths = {key: lookup(cfg, key) for key in PATH_KEYS}
    return replace(cfg, {key: str(Path(v).expanduser().resolve()) for key, v in paths.items() if v})


def prepare_data(cfg: Config, local: bool = True) -> Config:
    """Load the dataset and write its folds file once, before the trials (which would race to write it).

    The built-in synthetic set is generated here and ``data.root`` pointed at it. On a remote cluster
    (``local=False``) a dataset this machine cannot read is left to the trials.
    """
    from fastlesion.data.catalog import ensure_synthetic
    from fastlesion.engine import train

    try:
        if cfg.data.dataset == "synthetic" and not cfg.data.root:
            cfg = replace(cfg, **{"data.root": str(ensure_synthetic(cfg.data, progress=True).resolve())})
        train.prepare_data(replace(cfg, **{"run.quiet": False}))  # the same loading and split a run does
    except FastlesionError as e:
        if local:
            raise
        log.warning("dataset not readable here (%s); the trials will read it on the cluster", e)
    return cfg
