"""End the TensorBoard session and the MLflow run of every trial ASHA stopped early.

ASHA stops a trial at one of its epoch reports, and Ray then ends the trial's process: ``train()`` never returns,
so the run's trackers are never closed. Every epoch is on disk already (TensorBoard is flushed, MLflow logged, at
each epoch before the report), but TensorBoard's HParams view would show the session as still running and MLflow
the run as ``RUNNING`` forever. The driver knows which trials were stopped (``trials.csv``'s ``stopped_early``) and
ends them once the search is over: the TensorBoard session as ``SUCCESS`` (a stopped trial ended normally; its last
epoch is where ASHA stopped it) and the MLflow run as ``FINISHED`` with the tag ``fastlesion.stopped_early``
(``asha after epoch N``). Both are done once: a results pass over the same experiment again (a resumed search)
changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastlesion.config import config_from_dict

STOPPED_TAG = "fastlesion.stopped_early"
"""MLflow tag of a run whose trial ASHA stopped: ``asha after epoch N``."""
TB_SUFFIX = ".asha-stopped"
"""Suffix of the event file that ends a stopped trial's TensorBoard session (also how a second pass knows)."""


def close_stopped_trials(trials: Any, base: dict[str, Any]) -> int:
    """End the trackers of the stopped trials in ``trials`` (the frame of ``trials.csv``: ``stopped_early``,
    ``run_dir``, ``epochs``) that the search's base config ``base`` turned on; returns how many runs it ended.

    A tracker that cannot be reached (MLflow server down, package gone) is left as it is: the search's results do
    not depend on it, so this never fails a search."""
    if trials is None or not len(trials) or "stopped_early" not in trials:
        return 0
    run_cfg = config_from_dict(base, "search base config").run
    ended = 0
    for row in trials[trials["stopped_early"].astype(bool)].itertuples():
        run_dir, epochs = Path(row.run_dir), int(row.epochs)
        if run_cfg.tensorboard and (run_dir / "tb").is_dir():
            ended += _end_tensorboard(run_dir / "tb")
        if run_cfg.mlflow_uri:
            ended += _end_mlflow(run_cfg.mlflow_uri, run_dir, epochs)
    return ended


def _end_tensorboard(log_dir: Path) -> int:
    """Write the HParams session end (``SUCCESS``) into ``log_dir`` in an event file of its own, unless there is one."""
    if any(log_dir.glob(f"*{TB_SUFFIX}")):
        return 0
    try:
        from torch.utils.tensorboard import SummaryWriter

        from fastlesion.engine.tracking import hparams_summaries
    except ImportError:
        return 0
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=TB_SUFFIX)
    try:
        writer._get_file_writer().add_summary(hparams_summaries({}, "SUCCESS"))
    finally:
        writer.close()
    return 1


def _end_mlflow(uri: str, run_dir: Path, epochs: int) -> int:
    """Tag and finish the ``RUNNING`` MLflow run of ``run_dir`` (found by its run-folder tag, as a resume finds it)."""
    from fastlesion.engine.tracking import mlflow_client, mlflow_experiment_name, mlflow_uri, run_dir_filter

    try:
        client = mlflow_client(mlflow_uri(uri))
        exp = client.get_experiment_by_name(mlflow_experiment_name())
        if exp is None:
            return 0
        runs = client.search_runs([exp.experiment_id], f"{run_dir_filter(run_dir)} and attributes.status = 'RUNNING'")
        for run in runs:
            client.set_tag(run.info.run_id, STOPPED_TAG, f"asha after epoch {epochs}")
            client.set_terminated(run.info.run_id, "FINISHED")
        return len(runs)
    except Exception:  # noqa: BLE001 - a tracking store out of reach (or MLflow gone) must not fail the results
        return 0
