"""What a search leaves behind: ``trials.csv``, ``val_auc.png``, a table of the top trials and ``best.yaml``.

The metric is the one the search follows (:func:`fastlesion.tune.trial.tune_metric` of the base config): for
segmentation the column is ``best_val_iou``, the plot ``val_iou.png`` and the lines say ``val_iou``.

Everything is read back from the experiment folder (Ray's ``ExperimentAnalysis``), not from the driver's memory,
so an interrupted or resumed experiment gets the same files as one that ran straight through. ``best.yaml`` is the
best trial's config, which ``fastlesion train --config best.yaml`` runs as is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlesion.config import Config, config_from_dict, replace, save_config
from fastlesion.errors import FastlesionError
from fastlesion.tune.finish import close_stopped_trials
from fastlesion.tune.resources import import_ray
from fastlesion.tune.settings import TuneSettings
from fastlesion.tune.trial import metric_label, score_key, trial_run_dir, tune_metric

RESULT_FILES = {"csv": "trials.csv", "plot": "val_auc.png", "best": "best.yaml"}
"""The files of a classification search; :func:`result_files` gives those of any metric."""


def result_files(metric: str = "val_auc") -> dict[str, str]:
    """File names of a search following ``metric``: the plot is ``<metric>.png``."""
    return {**RESULT_FILES, "plot": f"{metric}.png"}


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
    metric: str = "val_auc"  # what the search followed (tune_metric): val_auc or val_iou


# --------------------------------------------------------------------------------------------------- reading
def _analysis(experiment_dir: str | Path) -> Any:
    """``ExperimentAnalysis`` of the folder, without its warning about trials that have no result yet."""
    _, tune = import_ray()

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return tune.ExperimentAnalysis(str(experiment_dir))
    finally:
        quiet.setLevel(level)


def interrupted_search(experiment_dir: str | Path, num_samples: int) -> bool:
    """Whether the experiment stopped with trials unfinished or not yet started (Ctrl-C, a lost driver)."""
    statuses = [t.status for t in _analysis(experiment_dir).trials]
    return any(s not in ("TERMINATED", "ERROR") for s in statuses) or len(statuses) < num_samples


def _error_line(trial_path: Path) -> str:
    p = trial_path / "error.txt"
    if not p.is_file():
        return ""
    lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _trial_row(trial: Any, hist: Any, space_keys: list[str], max_t: int, experiment_dir: str | Path,
               metric: str = "val_auc") -> dict:
    """One row of trials.csv from a trial and its per-epoch history: ``best_<metric>``, ``<metric>_finite``, ..."""
    import pandas as pd

    epochs = int(hist["epoch"].max()) if len(hist) else 0
    values = pd.to_numeric(hist.get(metric), errors="coerce") if len(hist) else pd.Series(dtype=float)
    score = pd.to_numeric(hist.get(score_key(metric)), errors="coerce") if len(hist) else pd.Series(dtype=float)
    best_i = score.idxmax() if score.notna().any() else None
    row = {"trial_id": trial.trial_id, "status": trial.status}
    row.update({k: trial.config.get(k) for k in space_keys})
    row.update({
        f"best_{metric}": float(values.max()) if values.notna().any() else math.nan,
        score_key(metric): float(score[best_i]) if best_i is not None else math.nan,
        "best_epoch": int(hist.loc[best_i, "epoch"]) if best_i is not None else 0,
        "epochs": epochs,
        "stopped_early": bool(trial.status == "TERMINATED" and 0 < epochs < max_t),
        "run_dir": str(trial_run_dir(experiment_dir, trial.trial_id)),
        "error": _error_line(Path(trial.path)) if trial.status == "ERROR" else "",
    })
    return row


def collect_trials(experiment_dir: str | Path, space_keys: list[str], max_t: int,
                   metric: str = "val_auc") -> tuple[Any, dict[str, Any]]:
    """Every trial of the experiment: status, searched values, best ``metric``, epochs run, stopped early, run dir;
    sorted best first (on ``metric``'s finite form)."""
    import pandas as pd

    analysis = _analysis(experiment_dir)
    frames = analysis.trial_dataframes
    rows, histories = [], {}
    for t in analysis.trials:
        hist = frames.get(t.trial_id)
        if hist is None or hist.empty or "epoch" not in hist.columns:
            hist = pd.DataFrame(columns=["epoch", metric, score_key(metric)])
        # a restored trial may repeat epochs it had reported before the interruption: keep the last report
        hist = hist.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
        histories[t.trial_id] = hist
        rows.append(_trial_row(t, hist, space_keys, max_t, experiment_dir, metric))
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values([score_key(metric), "trial_id"], ascending=[False, True], na_position="last")
        df = df.reset_index(drop=True)
    return df, histories


# --------------------------------------------------------------------------------------------------- showing
def plot_trials(histories: dict[str, Any], rungs: list[int], max_t: int, path: Path,
                best_id: str | None = None, stopped: set[str] | frozenset[str] = frozenset(),
                metric: str = "val_auc") -> Path:
    """The followed metric (validation AUC, or IoU for segmentation) per epoch, one line per trial; ASHA's rungs as
    dotted vertical lines, the last epoch of a trial ASHA stopped as a red cross."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    stop_label = "stopped by ASHA"
    for tid, h in sorted(histories.items()):
        if len(h) == 0 or metric not in h.columns:
            continue
        best = tid == best_id
        ax.plot(h["epoch"], h[metric], marker="o", markersize=3, linewidth=2.2 if best else 1.0,
                alpha=1.0 if best else 0.6, color="black" if best else None,
                label=f"{tid} (best)" if best else None, zorder=3 if best else 2)
        if tid in stopped:
            ax.plot(h["epoch"].iloc[-1:], h[metric].iloc[-1:], "x", color="tab:red", markersize=7,
                    label=stop_label, zorder=4)
            stop_label = None
    for r in rungs:
        ax.axvline(r, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"rung {r}", (r, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlim(0.8, max_t + 0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"ASHA: {len(histories)} trials, max {max_t} epochs")
    ax.grid(alpha=0.3)
    if best_id is not None or stop_label is None:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def print_top(df: Any, space_keys: list[str], n: int = 10, console: Any = None, metric: str = "val_auc") -> None:
    """Rich table of the top ``n`` trials by the followed metric (validation AUC, or IoU for segmentation)."""
    from rich.table import Table

    console = console or make_console()
    best_col = f"best {metric}"
    t = Table(title=f"top {min(n, len(df))} of {len(df)} trials (ASHA on {metric_label(metric)})")
    for c in ("#", "trial", "status", "epochs", best_col, "at epoch", *space_keys):
        t.add_column(c, justify="right" if c in ("#", "epochs", best_col, "at epoch") else "left",
                     no_wrap=c in ("trial", "status"))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    for i, r in enumerate(df.head(n).to_dict("records"), 1):
        status = "stopped" if r["stopped_early"] else "done" if r["status"] == "TERMINATED" else r["status"]
        best = r[f"best_{metric}"]
        t.add_row(str(i), r["trial_id"], status, str(r["epochs"]),
                  "nan" if math.isnan(best) else f"{best:.4f}", str(r["best_epoch"]),
                  *[fmt(r[k]) for k in space_keys])
    console.print(t)


# --------------------------------------------------------------------------------------------------- writing
def best_config(base: dict[str, Any], params: dict[str, Any], max_t: int) -> Config:
    """The best trial's config ready for ``fastlesion train``: base + its sampled keys, epochs = max_t, a fresh
    default run folder, progress shown."""
    return replace(config_from_dict(base, "best config"),
                   {**params, "run.out": None, "run.quiet": False, "run.overwrite": False, "train.epochs": max_t})


def _write_trials(res: SearchResult, settings: TuneSettings, best_id: str | None, space_keys: list[str],
                  console: Any) -> None:
    """trials.csv, <metric>.png, the top-10 table and the one-line count of stopped and failed trials."""
    df, exp, names = res.trials, res.experiment_dir, result_files(res.metric)
    res.files["csv"] = exp / names["csv"]
    df.to_csv(res.files["csv"], index=False)
    stopped = set(df.loc[df["stopped_early"], "trial_id"]) if len(df) else set()
    res.files["plot"] = plot_trials(res.histories, settings.rungs(), settings.max_t, exp / names["plot"],
                                    best_id, stopped, metric=res.metric)
    if len(df):
        print_top(df, space_keys, console=console, metric=res.metric)
    console.print(f"{len(df)} trials: {len(stopped)} stopped early by ASHA, "
                  f"{int((df['status'] == 'ERROR').sum()) if len(df) else 0} failed; wrote {res.files['csv']} and "
                  f"{res.files['plot']}")


def _write_best(res: SearchResult, best_id: str, base: dict[str, Any], max_t: int, console: Any) -> None:
    """best.yaml: the best trial's config, headed by where it came from and the command that trains it."""
    exp, best, metric = res.experiment_dir, res.best, res.metric
    value = best[f"best_{metric}"]
    # the sampled values as Ray has them (typed), not as trials.csv wrote them
    params = next(dict(t.config) for t in _analysis(exp).trials if t.trial_id == best_id)
    res.files["best"] = exp / result_files(metric)["best"]
    save_config(best_config(base, params, max_t), res.files["best"])
    header = (f"# best trial {best_id} of {exp}: {metric} {value:.4f} at epoch "
              f"{best['best_epoch']} of {best['epochs']}\n# train it: fastlesion train --config "
              f"{res.files['best']}\n")
    res.files["best"].write_text(header + res.files["best"].read_text())
    console.print(f"best trial {best_id}: {metric} {value:.4f} (epoch {best['best_epoch']}), "
                  f"run folder {best['run_dir']}\nwrote {res.files['best']}: "
                  f"fastlesion train --config {res.files['best']}")


def write_results(setup: dict[str, Any], interrupted: bool = False, console: Any = None) -> SearchResult:
    """trials.csv, <metric>.png (val_auc.png, or val_iou.png for segmentation), the top-10 table and best.yaml from
    the experiment folder."""
    console = console or make_console()
    exp = Path(setup["experiment_dir"])
    settings = TuneSettings(**setup["settings"])
    space_keys = list(setup["space"])
    metric = tune_metric(setup["base"])
    df, histories = collect_trials(exp, space_keys, settings.max_t, metric)
    close_stopped_trials(df, setup["base"])  # Ray ended their processes before train() could (fastlesion.tune.finish)
    res = SearchResult(exp, df, histories, interrupted=interrupted, metric=metric)
    # the best trial is the top row among those that finished an epoch (a trial that failed before has NaN values)
    done = df[df["epochs"] > 0] if len(df) else df
    best_id = None if done.empty or done[score_key(metric)].isna().all() else str(done.iloc[0]["trial_id"])
    _write_trials(res, settings, best_id, space_keys, console)
    if interrupted:
        console.print(f"[yellow]the experiment was interrupted[/]: continue it with `python tune/asha.py "
                      f"--resume {exp}`")
        return res
    if best_id is None:
        raise FastlesionError(f"{exp}: no trial finished an epoch (see the error column of {res.files['csv']})")
    res.best = done.iloc[0].to_dict()
    _write_best(res, best_id, setup["base"], settings.max_t, console)
    return res
