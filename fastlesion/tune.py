"""Hyperparameter search with Ray Tune and ASHA over :func:`fastlesion.engine.train.train`.

``tune/asha.py`` is the command line; this module holds the logic:

* the search space: a YAML file of dotted config keys (``optim.lr: {loguniform: [1.0e-4, 3.0e-3]}``), checked
  against the config before anything starts (:func:`load_space`, :func:`check_space`);
* the trainable: one trial is one ``train(cfg)`` run in its own folder that reports once per epoch to Ray Tune
  with a checkpoint (``last.pt``, ``config.yaml``, ``metrics.csv``, ...), so ASHA's unit is the epoch and a trial
  restored after a failure or an interrupted experiment continues from its last epoch (:func:`_trainable`);
* the experiment: ``ray.tune.Tuner`` with ``ASHAScheduler`` on validation AUC (:func:`run_search`,
  :func:`resume_search`);
* the results: ``trials.csv``, ``val_auc.png``, a rich table of the top trials and ``best.yaml`` that
  ``fastlesion train --config best.yaml`` runs as is (:func:`write_results`).

Ray is imported lazily: without it every entry raises one :class:`FastlesionError` saying how to install it.

The metric ASHA ranks trials on is :data:`TUNE_METRIC` (``val_auc_finite``): the epoch's ``val_auc`` where it is
a number and 0.0 where the AUC is undefined (NaN: a diverged model or a validation fold with a single class), so
that such trials are the first ones stopped instead of breaking the scheduler's comparisons. ``val_auc`` itself is
reported unchanged next to it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastlesion.config import SECTIONS, Config, ConfigError, check_key, config_from_dict, replace, to_dict
from fastlesion.errors import FastlesionError

log = logging.getLogger(__name__)

TUNE_METRIC = "val_auc_finite"  # val_auc, with an undefined (NaN) AUC counted as 0.0
MODE = "max"
SPACE_KINDS = ("loguniform", "uniform", "quniform", "randint", "choice")
SETUP_FILE = "fastlesion_tune.json"  # what --resume needs to rebuild the trainable
RESULT_FILES = {"csv": "trials.csv", "plot": "val_auc.png", "best": "best.yaml"}
# the files of a run folder that a checkpoint carries (enough for train(resume=...) plus the best model)
CHECKPOINT_FILES = ("last.pt", "config.yaml", "metrics.csv", "best.pt", "predictions_val.csv")
# keys the search may not set: the tuner owns them
RESERVED_KEYS = {"train.epochs": "the epoch budget is --epochs (ASHA's max_t)",
                 "train.ddp": "a trial is one process; give it more GPUs with --gpus-per-trial",
                 "run.out": "every trial gets its own folder in the experiment"}
INSTALL_HINT = "Ray Tune is not installed: pip install 'ray[tune]'"
# the default search space; tune/space.yaml (what `python tune/asha.py` reads by default) is this, commented
DEFAULT_SPACE: dict[str, Any] = {
    "optim.lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "optim.weight_decay": {"loguniform": [1.0e-6, 1.0e-1]},
    "loader.batch_size": {"choice": [32, 64, 128]},
    "optim.name": {"choice": ["adamw", "sgd"]},
    "model.name": {"choice": ["resnet18", "efficientnet_b0", "mobilenetv2_100", "densenet121"]},
    "model.drop_rate": {"uniform": [0.0, 0.4]},
    "loader.aug_strength": {"uniform": [0.5, 1.5]},
    "optim.loss": {"choice": ["ce", "weighted_ce", "focal"]},
    "data.image_size": {"choice": [224, 256]},
}


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.tune)``, or a :class:`FastlesionError` saying how to install Ray Tune."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise FastlesionError(INSTALL_HINT) from e
    return ray, tune


# --------------------------------------------------------------------------------------------------- space
@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` is a :data:`SPACE_KINDS` entry or ``constant``; ``args`` its arguments."""

    key: str
    kind: str
    args: tuple

    def describe(self) -> str:
        if self.kind == "constant":
            return repr(self.args[0])
        return f"{self.kind}{list(self.args)}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(key: Any, value: Any, source: str = "search space") -> Param:
    """One entry of a space file: ``{loguniform: [lo, hi]}``, ``{choice: [...]}``, ... or a plain constant."""
    if not isinstance(key, str):
        raise ConfigError(f"{source}: keys are dotted config keys (section.key), got {key!r}")
    where = f"{source}: {key}"
    if not isinstance(value, dict):
        return Param(key, "constant", (value,))
    if len(value) != 1 or next(iter(value)) not in SPACE_KINDS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{k}: [...]' for k in SPACE_KINDS)}}} or a "
                          f"plain value, got {value!r}")
    kind, args = next(iter(value.items()))
    if kind == "choice":
        if not isinstance(args, (list, tuple)):
            raise ConfigError(f"{where}: choice needs a list of values, got {args!r}")
        if not args:
            raise ConfigError(f"{where}: empty choice list")
        return Param(key, kind, tuple(args))
    n = 3 if kind == "quniform" else 2
    shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
    if not isinstance(args, (list, tuple)) or len(args) != n or not all(_number(a) for a in args):
        raise ConfigError(f"{where}: {kind} needs {shape} numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {list(args)}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"{where}: quniform needs q > 0, got {args[2]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint needs integer bounds (high excluded), got {list(args)}")
    return Param(key, kind, tuple(args))


def parse_space(d: Any, source: str = "search space") -> dict[str, Param]:
    """A space mapping (dotted key -> distribution or constant) -> :class:`Param` per key (config not checked)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of dotted config keys, got {type(d).__name__}")
    return {p.key: p for p in (parse_param(k, v, source) for k, v in d.items())}


def load_space(path: str | Path | None = None) -> dict[str, Param]:
    """Read a space YAML file (None: :data:`DEFAULT_SPACE`)."""
    if path is None:
        return parse_space(DEFAULT_SPACE, "default search space")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: search space file not found")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(d, str(p))


def space_to_dict(space: dict[str, Param]) -> dict[str, Any]:
    """The YAML/JSON form of a space (what :func:`parse_space` reads)."""
    return {k: p.args[0] if p.kind == "constant" else {p.kind: list(p.args)} for k, p in space.items()}


def _field_type(key: str) -> Any:
    section, name = key.split(".")
    tp = typing.get_type_hints(SECTIONS[section])[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _check_model(name: Any) -> None:
    """An unknown model name fails now, with create_model's own message (close names suggested)."""
    from fastlesion.models import create_model, list_models

    if name in list_models():
        return
    import timm

    if isinstance(name, str) and name and timm.is_model(name):
        return
    create_model(str(name), num_classes=2)  # raises ModelError("unknown model ...; did you mean ...?")


def _probe_values(p: Param) -> list[Any]:
    """Values that stand for everything ``p`` can sample: every choice, or the ends of a range."""
    if p.kind in ("constant",):
        return [p.args[0]]
    if p.kind == "choice":
        return list(p.args)
    if p.kind == "randint":
        return [p.args[0], p.args[1] - 1]
    if p.kind == "quniform":
        lo, hi, q = p.args
        return [round(lo / q) * q, round(hi / q) * q]
    return [p.args[0], p.args[1]]


def check_space(space: dict[str, Param], base: Config) -> None:
    """Every key is a config field the search may set, and every value it can take makes a valid config."""
    for key, p in space.items():
        try:
            check_key(key)
        except ConfigError as e:
            raise ConfigError(f"search space: {e}") from None
        if key in RESERVED_KEYS:
            raise ConfigError(f"search space: {key} cannot be searched ({RESERVED_KEYS[key]})")
        tp = _field_type(key)
        if tp is int and p.kind in ("uniform", "loguniform"):
            raise ConfigError(f"search space: {key} is an integer; use randint, quniform or choice, not {p.kind}")
        for v in _probe_values(p):
            try:
                replace(base, **{key: v})
                if key == "model.name":
                    _check_model(v)
            except FastlesionError as e:
                raise ConfigError(f"search space: {key} = {v!r}: {e}") from None
    if "model.name" not in space:
        try:
            _check_model(base.model.name)
        except FastlesionError as e:
            raise ConfigError(f"model.name: {e}") from None


def param_space(space: dict[str, Param]) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one sampler (or constant) per dotted key."""
    _, tune = import_ray()
    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "quniform": tune.quniform,
              "randint": tune.randint}
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.kind == "constant":
            out[key] = p.args[0]
        elif p.kind == "choice":
            out[key] = tune.choice(list(p.args))
        else:
            out[key] = makers[p.kind](*p.args)
    return out


# --------------------------------------------------------------------------------------------------- settings
@dataclass
class TuneSettings:
    """How the search runs (what ``tune/asha.py`` takes besides the config and the space)."""

    num_samples: int = 16
    max_t: int = 10  # epochs: ASHA's max_t and every trial's train.epochs
    grace_period: int = 1
    reduction_factor: float = 2.0
    gpus_per_trial: float | None = None  # None: 1 where the machine / cluster has GPUs, else 0
    cpus_per_trial: float | None = None  # None: the CPUs divided evenly among the GPU slots (1 without GPUs)
    seed: int = 0  # seed of the random search (the trials' own train.seed comes from the config)
    max_failures: int = 2  # retries of a failed trial (from its last checkpoint); -1 = forever
    ray_verbose: int = 0  # Ray's console output: 0 = fastlesion's line per trial epoch, 1 = status tables, 2 = all

    def check(self) -> None:
        if self.num_samples < 1:
            raise FastlesionError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_t < 1:
            raise FastlesionError(f"--epochs (ASHA max_t) must be >= 1, got {self.max_t}")
        if not 1 <= self.grace_period <= self.max_t:
            raise FastlesionError(f"--grace-period must be in 1..{self.max_t} (--epochs), got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise FastlesionError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.gpus_per_trial is not None:
            g = self.gpus_per_trial
            if g < 0 or (g > 1 and not float(g).is_integer()):
                raise FastlesionError(f"--gpus-per-trial must be 0, a fraction below 1 or a whole number, got {g}")
        if self.cpus_per_trial is not None and not self.cpus_per_trial > 0:
            raise FastlesionError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.max_failures < -1:
            raise FastlesionError(f"--max-failures must be >= -1, got {self.max_failures}")

    def rungs(self) -> list[int]:
        """Epochs at which ASHA compares trials (grace_period * reduction_factor**k below max_t)."""
        out, k = [], 0
        while True:
            r = int(self.grace_period * self.reduction_factor ** k)
            if r >= self.max_t:
                return out
            out.append(r)
            k += 1


# --------------------------------------------------------------------------------------------------- resources
def local_resources() -> dict[str, float]:
    """What ``ray.init()`` gets on this machine: every core and every visible GPU."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def cluster_resources(ray: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(total, largest node) CPUs and GPUs of the connected Ray cluster."""
    total = {k: float(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU")}
    largest = {"CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", True)):
            res = node.get("Resources", {})
            for k in largest:
                largest[k] = max(largest[k], float(res.get(k, 0)))
    return total, largest


def resolve_resources(settings: TuneSettings, total: dict[str, float], largest: dict[str, float] | None = None,
                      where: str = "this machine") -> tuple[float, float]:
    """(gpus_per_trial, cpus_per_trial) with the defaults filled in; an error when no node can run a trial.

    A trial that asks for more than the largest node has would stay PENDING forever, so that is refused here.
    """
    largest = largest or total
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    g = settings.gpus_per_trial if settings.gpus_per_trial is not None else (1.0 if gpus >= 1 else 0.0)
    if g > largest.get("GPU", 0.0):
        have = f"{largest.get('GPU', 0.0):g} GPU(s)" + (" on its largest node" if largest != total else "")
        raise FastlesionError(f"--gpus-per-trial {g:g} but {where} has {have}; "
                              + ("use --gpus-per-trial 0 to run the trials on CPUs" if gpus == 0 else
                                 "ask for fewer GPUs per trial"))
    if settings.cpus_per_trial is not None:
        c = float(settings.cpus_per_trial)
    elif g > 0:
        c = float(max(1, int(cpus // max(1, int(gpus // g)))))
    else:
        c = 1.0
    if c > largest.get("CPU", 0.0):
        have = f"{largest.get('CPU', 0.0):g} CPU(s)" + (" on its largest node" if largest != total else "")
        raise FastlesionError(f"--cpus-per-trial {c:g} but {where} has {have}; ask for fewer CPUs per trial")
    return g, c


def concurrency(total: dict[str, float], gpus_per_trial: float, cpus_per_trial: float) -> int:
    """How many trials the resources let run at once."""
    n = int(total.get("CPU", 0) // cpus_per_trial)
    if gpus_per_trial > 0:
        n = min(n, int(total.get("GPU", 0) // gpus_per_trial + 1e-9))
    return max(n, 0)


def init_ray(address: str | None) -> tuple[Any, bool]:
    """Connect to ``address`` (``auto``, ``ray://host:10001``) or start a local Ray sized to this machine.

    Returns ``(ray, started)``: ``started`` when this call started Ray (the caller shuts it down).
    """
    ray, _ = import_ray()
    if ray.is_initialized():
        return ray, False
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            res = local_resources()
            ray.init(num_cpus=int(res["CPU"]), num_gpus=int(res["GPU"]), include_dashboard=False,
                     logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastlesionError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {first}") from e
    return ray, True


# --------------------------------------------------------------------------------------------------- base config
PATH_KEYS = ("data.root", "data.folds_file", "data.exclude_file", "model.pretrained_path")


def absolute_paths(cfg: Config) -> Config:
    """Trials run in other working folders (and best.yaml anywhere): make the config's paths absolute."""
    paths = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in PATH_KEYS}
    return replace(cfg, {key: str(Path(v).expanduser().resolve()) for key, v in paths.items() if v})


def prepare_data(cfg: Config, local: bool = True) -> Config:
    """Load the dataset and write its folds file once, before the trials (which would race to write it).

    The built-in synthetic set is generated here and ``data.root`` pointed at it. On a remote cluster
    (``local=False``) a dataset this machine cannot read is left to the trials.
    """
    from fastlesion.data.catalog import ensure_synthetic, load_dataset
    from fastlesion.data.splits import split_dataset

    try:
        if cfg.data.dataset == "synthetic" and not cfg.data.root:
            cfg = replace(cfg, **{"data.root": str(ensure_synthetic(cfg.data, progress=True).resolve())})
        split_dataset(load_dataset(cfg.data, progress=True), cfg.data)
    except FastlesionError as e:
        if local:
            raise
        log.warning("dataset not readable here (%s); the trials will read it on the cluster", e)
    return cfg


# --------------------------------------------------------------------------------------------------- trials
def trial_dirname(trial: Any) -> str:
    """Ray trial folder name: ``trial_<id>`` (short; the run folder is ``<experiment>/trial_<id>/run``)."""
    return f"trial_{trial.trial_id}"


def trial_run_dir(experiment_dir: str | Path, trial_id: str) -> Path:
    return Path(experiment_dir) / f"trial_{trial_id}" / "run"


def trial_config(base: dict[str, Any], params: dict[str, Any], run_dir: str | Path, gpus_per_trial: float,
                 cpus_per_trial: float, max_t: int, overwrite: bool = True) -> Config:
    """The config one trial trains: base + sampled keys, in its own quiet single-process run folder.

    ``train.patience`` is 0 (ASHA does the early stopping), ``loader.workers`` at most the trial's CPUs, and a
    trial without GPUs trains and decodes on the CPU.
    """
    forced: dict[str, Any] = {"run.out": str(run_dir), "run.quiet": True, "run.overwrite": overwrite,
                              "train.ddp": 0, "train.epochs": max_t, "train.patience": 0}
    if gpus_per_trial <= 0:
        forced.update({"train.device": "cpu", "loader.device": "cpu"})
    cfg = replace(config_from_dict(base, "trial config"), {**params, **forced})
    workers = min(cfg.loader.workers, max(int(cpus_per_trial), 0))
    return replace(cfg, **{"loader.workers": workers}) if workers != cfg.loader.workers else cfg


def finite_auc(value: Any) -> float:
    """:data:`TUNE_METRIC`: the AUC where it is a number, 0.0 where it is undefined."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _put(src: Path, dst: Path) -> None:
    """Hard link (cheap; train replaces its files atomically, so the link keeps this epoch's bytes) or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def release_gpu_memory() -> None:
    """Give cached CUDA memory back (the trial's process ends too when ASHA stops it: actors are not reused)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - cleanup must never mask the trial's own outcome
        pass


def _trainable(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: ``train(cfg)`` reporting every epoch to Ray Tune with a checkpoint of its run folder."""
    from ray import tune

    from fastlesion.engine.train import train

    trial_id = tune.get_context().get_trial_id()
    run_dir = trial_run_dir(setup["experiment_dir"], trial_id)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a restored experiment: continue from the last epoch
        run_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.as_directory() as d:
            for name in CHECKPOINT_FILES:
                if (Path(d) / name).is_file():
                    shutil.copy2(Path(d) / name, run_dir / name)
        resume = run_dir
    cfg = trial_config(setup["base"], config, run_dir, setup["gpus_per_trial"], setup["cpus_per_trial"],
                       setup["max_t"])

    def send(row: dict[str, Any], out: Path) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics[TUNE_METRIC] = finite_auc(row.get("val_auc"))
        with tempfile.TemporaryDirectory(prefix=".checkpoint-", dir=out.parent) as tmp:
            for name in CHECKPOINT_FILES:
                if (out / name).is_file():
                    _put(out / name, Path(tmp) / name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    last: list[tuple[dict[str, Any], Path]] = []

    def report(row: dict[str, Any], out: Path) -> None:
        # ASHA stops a trial at the report of its last epoch (max_t), which would end the process before train()
        # writes summary.json and the plots: that report is sent once train() has returned.
        if int(row["epoch"]) >= cfg.train.epochs:
            last.append((row, out))
        else:
            send(row, out)

    try:
        train(cfg, resume=resume, report=report)
        if last:
            send(*last[-1])
    finally:
        release_gpu_memory()


# --------------------------------------------------------------------------------------------------- results
def make_console() -> Any:
    """A rich console; wide when the output is a file or a pipe (logs), so the trial table keeps its columns."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


@dataclass
class SearchResult:
    """What a finished (or interrupted) search left in ``experiment_dir``."""

    experiment_dir: Path
    trials: Any  # pandas DataFrame: one row per trial (trials.csv)
    histories: dict[str, Any] = field(default_factory=dict)  # trial_id -> DataFrame(epoch, val_auc, ...)
    best: dict[str, Any] | None = None  # the best trial's row
    files: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False


def _error_line(trial_path: Path) -> str:
    p = trial_path / "error.txt"
    if not p.is_file():
        return ""
    lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _analysis(experiment_dir: str | Path) -> Any:
    """``ExperimentAnalysis`` of the folder, without its warning about trials that have no result yet."""
    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return ExperimentAnalysis(str(experiment_dir))
    finally:
        quiet.setLevel(level)


def collect_trials(experiment_dir: str | Path, space_keys: list[str], max_t: int) -> tuple[Any, dict[str, Any]]:
    """Every trial of the experiment: status, searched values, best val_auc, epochs run, stopped early, run dir."""
    import pandas as pd

    analysis = _analysis(experiment_dir)
    frames = analysis.trial_dataframes
    rows, histories = [], {}
    for t in analysis.trials:
        hist = frames.get(t.trial_id)
        if hist is None or hist.empty or "epoch" not in hist.columns:
            hist = pd.DataFrame(columns=["epoch", "val_auc", TUNE_METRIC])
        # a restored trial may repeat epochs it had reported before the interruption: keep the last report
        hist = hist.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
        histories[t.trial_id] = hist
        epochs = int(hist["epoch"].max()) if len(hist) else 0
        auc = pd.to_numeric(hist.get("val_auc"), errors="coerce") if len(hist) else pd.Series(dtype=float)
        score = pd.to_numeric(hist.get(TUNE_METRIC), errors="coerce") if len(hist) else pd.Series(dtype=float)
        best_i = score.idxmax() if score.notna().any() else None
        row = {"trial_id": t.trial_id, "status": t.status}
        row.update({k: t.config.get(k) for k in space_keys})
        row.update({
            "best_val_auc": float(auc.max()) if auc.notna().any() else math.nan,
            TUNE_METRIC: float(score[best_i]) if best_i is not None else math.nan,
            "best_epoch": int(hist.loc[best_i, "epoch"]) if best_i is not None else 0,
            "epochs": epochs,
            "stopped_early": bool(t.status == "TERMINATED" and 0 < epochs < max_t),
            "run_dir": str(trial_run_dir(experiment_dir, t.trial_id)),
            "error": _error_line(Path(t.path)) if t.status == "ERROR" else "",
        })
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values([TUNE_METRIC, "trial_id"], ascending=[False, True], na_position="last")
        df = df.reset_index(drop=True)
    return df, histories


def plot_trials(histories: dict[str, Any], rungs: list[int], max_t: int, path: Path,
                best_id: str | None = None, stopped: set[str] | frozenset[str] = frozenset()) -> Path:
    """Validation AUC per epoch, one line per trial; ASHA's rungs as dotted vertical lines, the last epoch of a
    trial ASHA stopped as a red cross."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    stop_label = "stopped by ASHA"
    for tid, h in sorted(histories.items()):
        if len(h) == 0 or "val_auc" not in h.columns:
            continue
        best = tid == best_id
        ax.plot(h["epoch"], h["val_auc"], marker="o", markersize=3, linewidth=2.2 if best else 1.0,
                alpha=1.0 if best else 0.6, color="black" if best else None,
                label=f"{tid} (best)" if best else None, zorder=3 if best else 2)
        if tid in stopped:
            ax.plot(h["epoch"].iloc[-1:], h["val_auc"].iloc[-1:], "x", color="tab:red", markersize=7,
                    label=stop_label, zorder=4)
            stop_label = None
    for r in rungs:
        ax.axvline(r, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"rung {r}", (r, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlim(0.8, max_t + 0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    ax.set_title(f"ASHA: {len(histories)} trials, max {max_t} epochs")
    ax.grid(alpha=0.3)
    if best_id is not None or stop_label is None:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def print_top(df: Any, space_keys: list[str], n: int = 10, console: Any = None) -> None:
    """Rich table of the top ``n`` trials by validation AUC."""
    from rich.table import Table

    console = console or make_console()
    t = Table(title=f"top {min(n, len(df))} of {len(df)} trials (ASHA on validation AUC)")
    for c in ("#", "trial", "status", "epochs", "best val_auc", "at epoch", *space_keys):
        t.add_column(c, justify="right" if c in ("#", "epochs", "best val_auc", "at epoch") else "left",
                     no_wrap=c in ("trial", "status"))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    for i, r in enumerate(df.head(n).to_dict("records"), 1):
        status = "stopped" if r["stopped_early"] else "done" if r["status"] == "TERMINATED" else r["status"]
        t.add_row(str(i), r["trial_id"], status, str(r["epochs"]),
                  "nan" if math.isnan(r["best_val_auc"]) else f"{r['best_val_auc']:.4f}", str(r["best_epoch"]),
                  *[fmt(r[k]) for k in space_keys])
    console.print(t)


def best_config(base: dict[str, Any], params: dict[str, Any], max_t: int) -> Config:
    """The best trial's config ready for ``fastlesion train``: base + its sampled keys, epochs = max_t, a fresh
    default run folder, progress shown."""
    return replace(config_from_dict(base, "best config"),
                   {**params, "run.out": None, "run.quiet": False, "run.overwrite": False, "train.epochs": max_t})


def write_results(setup: dict[str, Any], interrupted: bool = False, console: Any = None) -> SearchResult:
    """trials.csv, val_auc.png, the top-10 table and best.yaml from the experiment folder."""
    from fastlesion.config import save_config

    console = console or make_console()
    exp = Path(setup["experiment_dir"])
    settings = TuneSettings(**setup["settings"])
    space_keys = list(setup["space"])
    df, histories = collect_trials(exp, space_keys, settings.max_t)
    res = SearchResult(exp, df, histories, interrupted=interrupted)
    res.files["csv"] = exp / RESULT_FILES["csv"]
    df.to_csv(res.files["csv"], index=False)
    done = df[df["epochs"] > 0] if len(df) else df
    best_id = None if done.empty or done[TUNE_METRIC].isna().all() else str(done.iloc[0]["trial_id"])
    stopped = set(df.loc[df["stopped_early"], "trial_id"]) if len(df) else set()
    res.files["plot"] = plot_trials(histories, settings.rungs(), settings.max_t, exp / RESULT_FILES["plot"],
                                    best_id, stopped)
    if len(df):
        print_top(df, space_keys, console=console)
    console.print(f"{len(df)} trials: {len(stopped)} stopped early by ASHA, "
                  f"{int((df['status'] == 'ERROR').sum()) if len(df) else 0} failed; wrote {res.files['csv']} and "
                  f"{res.files['plot']}")
    if interrupted:
        console.print(f"[yellow]the experiment was interrupted[/]: continue it with `python tune/asha.py "
                      f"--resume {exp}`")
        return res
    if best_id is None:
        raise FastlesionError(f"{exp}: no trial finished an epoch (see the error column of {res.files['csv']})")
    trial = next(t for t in _trial_configs(exp) if t[0] == best_id)
    cfg = best_config(setup["base"], trial[1], settings.max_t)
    res.files["best"] = exp / RESULT_FILES["best"]
    save_config(cfg, res.files["best"])
    res.best = done.iloc[0].to_dict()
    header = (f"# best trial {best_id} of {exp}: val_auc {res.best['best_val_auc']:.4f} at epoch "
              f"{res.best['best_epoch']} of {res.best['epochs']}\n# train it: fastlesion train --config "
              f"{res.files['best']}\n")
    res.files["best"].write_text(header + res.files["best"].read_text())
    console.print(f"best trial {best_id}: val_auc {res.best['best_val_auc']:.4f} (epoch {res.best['best_epoch']}), "
                  f"run folder {res.best['run_dir']}\nwrote {res.files['best']}: "
                  f"fastlesion train --config {res.files['best']}")
    return res


def _trial_configs(experiment_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(t.trial_id, dict(t.config)) for t in _analysis(experiment_dir).trials]


# --------------------------------------------------------------------------------------------------- the search
def _tuner_parts(setup: dict[str, Any]) -> tuple[Any, Any]:
    """(trainable with resources and the setup bound, RunConfig) shared by a new and a restored experiment."""
    _, tune = import_ray()
    s = TuneSettings(**setup["settings"])
    trainable = tune.with_resources(tune.with_parameters(_trainable, setup=setup),
                                    {"cpu": setup["cpus_per_trial"], "gpu": setup["gpus_per_trial"]})
    from fastlesion.tune_progress import TrialLines

    # one checkpoint per trial epoch with num_to_keep=1 is the design (ASHA pauses/resumes at epochs): Ray's
    # "snapshotting triggered multiple times" warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    exp = Path(setup["experiment_dir"])
    run_config = tune.RunConfig(
        name=exp.name, storage_path=str(exp.parent), verbose=s.ray_verbose,
        callbacks=[TrialLines(s.max_t, list(setup["space"]))],
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return trainable, run_config


def _statuses(experiment_dir: Path) -> list[str]:
    return [t.status for t in _analysis(experiment_dir).trials]


def _fit(tuner: Any, setup: dict[str, Any], console: Any) -> SearchResult:
    exp = Path(setup["experiment_dir"])
    try:
        tuner.fit()
    except KeyboardInterrupt:
        pass
    statuses = _statuses(exp)
    interrupted = any(s not in ("TERMINATED", "ERROR") for s in statuses) or \
        len(statuses) < setup["settings"]["num_samples"]
    return write_results(setup, interrupted=interrupted, console=console)


def default_experiment_dir() -> Path:
    return Path("runs") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}" / "asha"


def run_search(cfg: Config, space: dict[str, Param], settings: TuneSettings,
               experiment_dir: str | Path | None = None, address: str | None = None,
               console: Any = None) -> SearchResult:
    """Search ``space`` around ``cfg`` with ASHA; write trials.csv, val_auc.png and best.yaml.

    Args:
        cfg: the base config (what ``fastlesion train`` would run); ``settings.max_t`` replaces its epochs.
        space: from :func:`load_space` / :func:`parse_space`.
        settings: samples, ASHA, resources, seed, retries.
        experiment_dir: the experiment folder (Ray's ``storage_path/name``); default ``runs/tune-<time>/asha``.
        address: an existing Ray cluster (``auto``, ``ray://host:10001``); None starts a local Ray.
    """
    console = console or make_console()
    _, tune = import_ray()
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    settings = TuneSettings(**asdict(settings))
    settings.check()
    cfg = absolute_paths(cfg)
    check_space(space, cfg)
    exp = Path(experiment_dir or default_experiment_dir()).expanduser().resolve()
    if exp.exists() and any(exp.iterdir()):
        raise FastlesionError(f"{exp}: already holds an experiment; continue it with --resume {exp} or choose "
                              "another --out/--name")
    if not address:  # a local machine: refuse impossible resources and unreadable data before starting anything
        resolve_resources(settings, local_resources())
        cfg = prepare_data(cfg, local=True)
    ray, started = init_ray(address)
    try:
        total, largest = cluster_resources(ray)
        g, c = resolve_resources(settings, total, largest,
                                 where=f"the Ray cluster at {address}" if address else "the local Ray")
        settings.gpus_per_trial, settings.cpus_per_trial = g, c
        if address:
            cfg = prepare_data(cfg, local=address == "auto")
        n = concurrency(total, g, c)
        console.print(f"ASHA over {len(space)} keys, {settings.num_samples} trials of up to {settings.max_t} epochs "
                      f"(rungs at {settings.rungs() or 'none'}); each trial {c:g} CPU(s) and {g:g} GPU(s): up to "
                      f"{n} at once on {total['CPU']:g} CPUs / {total['GPU']:g} GPUs -> {exp}")
        exp.mkdir(parents=True, exist_ok=True)
        setup = {"experiment_dir": str(exp), "base": to_dict(cfg), "space": space_to_dict(space),
                 "settings": asdict(settings), "gpus_per_trial": g, "cpus_per_trial": c,
                 "max_t": settings.max_t}
        (exp / SETUP_FILE).write_text(json.dumps(setup, indent=2))
        trainable, run_config = _tuner_parts(setup)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=settings.max_t, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=param_space(space), run_config=run_config,
            tune_config=tune.TuneConfig(metric=TUNE_METRIC, mode=MODE, scheduler=scheduler,
                                        num_samples=settings.num_samples, reuse_actors=False,
                                        search_alg=BasicVariantGenerator(random_state=settings.seed),
                                        trial_dirname_creator=trial_dirname))
        return _fit(tuner, setup, console)
    finally:
        if started:
            ray.shutdown()


def find_experiment(path: str | Path) -> Path:
    """The experiment folder of ``path``: itself, or its single sub-folder holding one (``--out`` given)."""
    p = Path(path).expanduser().resolve()
    if (p / SETUP_FILE).is_file():
        return p
    subs = [d for d in p.iterdir() if (d / SETUP_FILE).is_file()] if p.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    raise FastlesionError(f"{p}: not a fastlesion tune experiment (no {SETUP_FILE})")


def resume_search(path: str | Path, address: str | None = None, console: Any = None) -> SearchResult:
    """Continue an interrupted experiment with ``Tuner.restore`` (errored trials retried) and write the results."""
    console = console or make_console()
    _, tune = import_ray()
    exp = find_experiment(path)
    if not tune.Tuner.can_restore(str(exp)):
        raise FastlesionError(f"{exp}: cannot be restored (no Ray Tune experiment state in it)")
    setup = json.loads((exp / SETUP_FILE).read_text())
    setup["experiment_dir"] = str(exp)  # the folder may have moved
    settings = TuneSettings(**setup["settings"])
    if not address:
        resolve_resources(settings, local_resources())
    ray, started = init_ray(address)
    try:
        total, largest = cluster_resources(ray)
        resolve_resources(settings, total, largest,
                          where=f"the Ray cluster at {address}" if address else "the local Ray")
        console.print(f"resuming {exp}")
        trainable, _ = _tuner_parts(setup)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
        return _fit(tuner, setup, console)
    finally:
        if started:
            ray.shutdown()
