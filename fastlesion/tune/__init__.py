"""Hyperparameter search with Ray Tune and ASHA over :func:`fastlesion.engine.train.train`.

``tune/asha.py`` is the command line; this package holds the logic, one concern per module. Read them in this order:

* :mod:`~fastlesion.tune.settings`: :class:`TuneSettings`, how the search runs (samples, ASHA, resources, retries);
* :mod:`~fastlesion.tune.resources`: Ray itself, imported lazily (:func:`import_ray`), started or reached
  (:func:`init_ray`), and the CPUs/GPUs each trial gets (:func:`resolve_resources`);
* :mod:`~fastlesion.tune.space`: the search space, a YAML file of dotted config keys
  (``optim.lr: {loguniform: [1.0e-4, 3.0e-3]}``), parsed and checked against the base config before anything
  starts (:func:`load_space`, :func:`check_space`), and turned into Ray Tune samplers (:func:`param_space`);
* :mod:`~fastlesion.tune.base`: the base config made ready once in the driver: absolute paths, the dataset and its
  folds file written before the trials would race to write it (:func:`prepare_data`);
* :mod:`~fastlesion.tune.trial`: one trial, a ``train(cfg)`` run in its own folder that reports every epoch to Ray
  Tune with a checkpoint, so ASHA's unit is the epoch and a restored trial continues from its last one; and the
  metric a search follows, chosen once from the base config's task (:func:`tune_metric`: ``val_auc`` for
  classification, ``val_iou`` for segmentation);
* :mod:`~fastlesion.tune.console`: the compact console log, a line per trial epoch (a Ray callback: it imports Ray
  at import time, so only :mod:`~fastlesion.tune.search` imports it, lazily);
* :mod:`~fastlesion.tune.results`: ``trials.csv``, ``val_auc.png`` (``val_iou.png``), the table of the top trials
  and ``best.yaml`` that ``fastlesion train --config best.yaml`` runs as is (:func:`write_results`);
* :mod:`~fastlesion.tune.search`: the experiment, ``ray.tune.Tuner`` with ``ASHAScheduler`` on that metric, new or
  restored (:func:`run_search`, :func:`resume_search`).

The modules import each other in that order and never back. Ray is imported lazily: ``import fastlesion.tune``
works without it, and every entry then raises one :class:`FastlesionError` saying how to install it.
"""

from fastlesion.tune.base import PATH_KEYS, absolute_paths, prepare_data
from fastlesion.tune.resources import (
    INSTALL_HINT,
    cluster_resources,
    concurrency,
    import_ray,
    init_ray,
    local_resources,
    resolve_resources,
)
from fastlesion.tune.results import (
    RESULT_FILES,
    SearchResult,
    best_config,
    collect_trials,
    make_console,
    plot_trials,
    print_top,
    result_files,
    write_results,
)
from fastlesion.tune.search import (
    SETUP_FILE,
    default_experiment_dir,
    find_experiment,
    resume_search,
    run_search,
)
from fastlesion.tune.settings import TuneSettings
from fastlesion.tune.space import (
    DEFAULT_SEG_SPACE,
    DEFAULT_SPACE,
    DEFAULT_SPACES,
    RESERVED_KEYS,
    SPACE_KINDS,
    TASK_ONLY_KEYS,
    Param,
    check_space,
    default_space,
    load_space,
    param_space,
    parse_param,
    parse_space,
    space_to_dict,
)
from fastlesion.tune.trial import (
    CHECKPOINT_FILES,
    METRIC_LABELS,
    MODE,
    TUNE_METRIC,
    TUNE_METRICS,
    finite_auc,
    finite_metric,
    metric_label,
    release_gpu_memory,
    score_key,
    trial_config,
    trial_dirname,
    trial_run_dir,
    tune_metric,
)

__all__ = [
    # settings and resources
    "TuneSettings", "INSTALL_HINT", "cluster_resources", "concurrency", "import_ray", "init_ray", "local_resources",
    "resolve_resources",
    # space
    "DEFAULT_SPACE", "DEFAULT_SEG_SPACE", "DEFAULT_SPACES", "RESERVED_KEYS", "SPACE_KINDS", "TASK_ONLY_KEYS",
    "Param", "check_space", "default_space", "load_space", "param_space", "parse_param", "parse_space",
    "space_to_dict",
    # base config
    "PATH_KEYS", "absolute_paths", "prepare_data",
    # trial
    "CHECKPOINT_FILES", "METRIC_LABELS", "MODE", "TUNE_METRIC", "TUNE_METRICS", "finite_auc", "finite_metric",
    "metric_label", "release_gpu_memory", "score_key", "trial_config", "trial_dirname", "trial_run_dir",
    "tune_metric",
    # results
    "RESULT_FILES", "SearchResult", "best_config", "collect_trials", "make_console", "plot_trials", "print_top",
    "result_files", "write_results",
    # search
    "SETUP_FILE", "default_experiment_dir", "find_experiment", "resume_search", "run_search",
]
