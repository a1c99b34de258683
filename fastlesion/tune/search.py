"""The experiment: a ``ray.tune.Tuner`` with ``ASHAScheduler`` on the validation metric of the base config's task
(:func:`~fastlesion.tune.trial.tune_metric`: AUC for classification, IoU for segmentation), started new or restored.

:func:`run_search` checks everything it can before Ray starts (settings, space, resources, data), writes
``fastlesion_tune.json`` (what :func:`resume_search` needs to rebuild the same trainable later), runs the trials
and writes the results; :func:`resume_search` continues an interrupted experiment from that file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastlesion.config import Config, to_dict
from fastlesion.errors import FastlesionError
from fastlesion.tune.base import absolute_paths, prepare_data
from fastlesion.tune.resources import concurrency, import_ray, local_resources, ray_session, resolve_resources
from fastlesion.tune.results import SearchResult, interrupted_search, make_console, write_results
from fastlesion.tune.settings import TuneSettings
from fastlesion.tune.space import Param, check_space, param_space, space_to_dict
from fastlesion.tune.trial import MODE, _trainable, score_key, trial_dirname, tune_metric

SETUP_FILE = "fastlesion_tune.json"  # what --resume needs to rebuild the trainable


def default_experiment_dir() -> Path:
    return Path("runs") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}" / "asha"


def find_experiment(path: str | Path) -> Path:
    """The experiment folder of ``path``: itself, or its single sub-folder holding one (``--out`` given)."""
    p = Path(path).expanduser().resolve()
    if (p / SETUP_FILE).is_file():
        return p
    subs = [d for d in p.iterdir() if (d / SETUP_FILE).is_file()] if p.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    raise FastlesionError(f"{p}: not a fastlesion tune experiment (no {SETUP_FILE})")


# --------------------------------------------------------------------------------------------------- the Tuner
def _tuner_parts(setup: dict[str, Any]) -> tuple[Any, Any]:
    """(trainable with resources and the setup bound, RunConfig) shared by a new and a restored experiment."""
    _, tune = import_ray()
    from fastlesion.tune.console import TrialLines  # imports Ray: only here, once Ray is known to be there

    s = TuneSettings(**setup["settings"])
    trainable = tune.with_resources(tune.with_parameters(_trainable, setup=setup),
                                    {"cpu": setup["cpus_per_trial"], "gpu": setup["gpus_per_trial"]})
    # one checkpoint per trial epoch with num_to_keep=1 is the design (ASHA pauses/resumes at epochs): Ray's
    # "snapshotting triggered multiple times" warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # every trial's run folder has TensorBoard files of its own (run/tb, with the HParams of the whole config):
    # Ray's automatic TensorBoard logger would show each trial twice and take over the HParams tab, so only its
    # CSV and JSON loggers are kept (result.json is what the results are read from)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    exp = Path(setup["experiment_dir"])
    run_config = tune.RunConfig(
        name=exp.name, storage_path=str(exp.parent), verbose=s.ray_verbose,
        callbacks=[TrialLines(s.max_t, list(setup["space"]), tune_metric(setup["base"])), CSVLoggerCallback(),
                   JsonLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return trainable, run_config


def _new_tuner(setup: dict[str, Any], space: dict[str, Param], settings: TuneSettings) -> Any:
    """The Tuner of a new experiment: random search over ``space``, ASHA stopping trials at its rungs."""
    _, tune = import_ray()
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable, run_config = _tuner_parts(setup)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=settings.max_t, grace_period=settings.grace_period,
                              reduction_factor=settings.reduction_factor)
    # reuse_actors=False: a stopped trial's process ends, and with it whatever GPU memory it held
    return tune.Tuner(
        trainable, param_space=param_space(space), run_config=run_config,
        tune_config=tune.TuneConfig(metric=score_key(tune_metric(setup["base"])), mode=MODE, scheduler=scheduler,
                                    num_samples=settings.num_samples, reuse_actors=False,
                                    search_alg=BasicVariantGenerator(random_state=settings.seed),
                                    trial_dirname_creator=trial_dirname))


def _fit(tuner: Any, setup: dict[str, Any], console: Any) -> SearchResult:
    try:
        tuner.fit()
    except KeyboardInterrupt:  # Ctrl-C: Ray has saved the experiment state; write what the trials got so far
        pass
    interrupted = interrupted_search(setup["experiment_dir"], setup["settings"]["num_samples"])
    return write_results(setup, interrupted=interrupted, console=console)


# --------------------------------------------------------------------------------------------------- a new search
def _new_experiment_dir(experiment_dir: str | Path | None) -> Path:
    exp = Path(experiment_dir or default_experiment_dir()).expanduser().resolve()
    if exp.exists() and any(exp.iterdir()):
        raise FastlesionError(f"{exp}: already holds an experiment; continue it with --resume {exp} or choose "
                              "another --out/--name")
    return exp


def _write_setup(exp: Path, cfg: Config, space: dict[str, Param], settings: TuneSettings) -> dict[str, Any]:
    """Create the experiment folder with fastlesion_tune.json: what every trial and a later --resume build on."""
    exp.mkdir(parents=True, exist_ok=True)
    setup = {"experiment_dir": str(exp), "base": to_dict(cfg), "space": space_to_dict(space),
             "settings": asdict(settings), "gpus_per_trial": settings.gpus_per_trial,
             "cpus_per_trial": settings.cpus_per_trial, "max_t": settings.max_t}
    (exp / SETUP_FILE).write_text(json.dumps(setup, indent=2))
    return setup


def run_search(cfg: Config, space: dict[str, Param], settings: TuneSettings,
               experiment_dir: str | Path | None = None, address: str | None = None,
               console: Any = None) -> SearchResult:
    """Search ``space`` around ``cfg`` with ASHA on ``tune_metric(cfg)``; write trials.csv, val_auc.png (val_iou.png
    for segmentation) and best.yaml.

    Args:
        cfg: the base config (what ``fastlesion train`` would run); ``settings.max_t`` replaces its epochs.
        space: from :func:`load_space` / :func:`parse_space`.
        settings: samples, ASHA, resources, seed, retries.
        experiment_dir: the experiment folder (Ray's ``storage_path/name``); default ``runs/tune-<time>/asha``.
        address: an existing Ray cluster (``auto``, ``ray://host:10001``); None starts a local Ray.
    """
    console = console or make_console()
    import_ray()
    settings = TuneSettings(**asdict(settings))  # a copy: the resolved resources are filled in below
    settings.check()
    cfg = absolute_paths(cfg)
    check_space(space, cfg)
    exp = _new_experiment_dir(experiment_dir)
    if not address:  # a local machine: refuse impossible resources and unreadable data before starting anything
        resolve_resources(settings, local_resources())
        cfg = prepare_data(cfg, local=True)
    with ray_session(settings, address) as (total, g, c):
        settings.gpus_per_trial, settings.cpus_per_trial = g, c
        if address:
            cfg = prepare_data(cfg, local=address == "auto")
        console.print(f"ASHA on {tune_metric(cfg)} over {len(space)} keys, {settings.num_samples} trials of up to "
                      f"{settings.max_t} epochs (rungs at {settings.rungs() or 'none'}); each trial {c:g} CPU(s) and "
                      f"{g:g} GPU(s): up to {concurrency(total, g, c)} at once on {total['CPU']:g} CPUs / "
                      f"{total['GPU']:g} GPUs -> {exp}")
        setup = _write_setup(exp, cfg, space, settings)
        return _fit(_new_tuner(setup, space, settings), setup, console)


# --------------------------------------------------------------------------------------------------- resuming
def resume_search(path: str | Path, address: str | None = None, console: Any = None) -> SearchResult:
    """Continue an interrupted experiment with ``Tuner.restore`` (errored trials retried) and write the results.

    ``Tuner.restore`` unpickles the experiment's ``tuner.pkl``, and unpickling can run any code: resume only
    experiment folders you trust (ones your own searches wrote)."""
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
    with ray_session(settings, address):
        console.print(f"resuming {exp}")
        trainable, _ = _tuner_parts(setup)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
        return _fit(tuner, setup, console)
