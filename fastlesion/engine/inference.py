"""``fastlesion eval`` and ``fastlesion predict``: a checkpoint on a split, or on unlabelled images.

A checkpoint carries its model name, class names and the config it was trained with, so evaluation needs only the
checkpoint; the dataset can be overridden (another root, another fold, the holdout test split).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from fastlesion.config import Config, config_from_dict, replace
from fastlesion.data.catalog import ISIC_CLASSES, detect_kind, isic2020_test_csv, load_dataset, load_isic2020_test
from fastlesion.data.loader import build_loader
from fastlesion.data.splits import split_dataset
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.loop import evaluate
from fastlesion.engine.runtime import Runtime, resolve_runtime, wrap_model
from fastlesion.errors import DatasetError, FastlesionError

log = logging.getLogger(__name__)


def inference_runtime(cfg: Config) -> Runtime:
    """The training runtime of ``cfg`` without torch.compile: inference is one pass whose last batch differs in
    size, so compiling (and recompiling for that batch) would cost more than it saves."""
    return dataclasses.replace(resolve_runtime(cfg.train), compile=False)


def load_checkpoint_model(path: str | Path, rt: Runtime) -> tuple[nn.Module, dict[str, Any], Config]:
    """The eager model of a checkpoint on ``rt.device``, the checkpoint dict and its config."""
    from fastlesion.models import create_model
    from fastlesion.prune import apply_checkpoint_structure

    state = ckpt.load(path)
    if "model" not in state or "classes" not in state:
        raise FastlesionError(f"{path}: not a fastlesion checkpoint (no 'model'/'classes')")
    cfg = config_from_dict(state["config"], str(path))
    model = create_model(state["model_name"], num_classes=len(state["classes"]))
    apply_checkpoint_structure(model, state)  # `fastlesion prune --method structured`: fewer channels
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise FastlesionError(f"{path}: weights do not fit {state['model_name']} "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return wrap_model(model, rt).eval_model.eval(), state, cfg


def _data_overrides(saved: Config, data: str | Path | None, dataset: str | None) -> list[str]:
    """``data.root`` / ``data.dataset`` overrides for evaluating on another root: without an explicit ``dataset``
    the layout is detected as ``fastlesion train`` does, except that a csv-kind checkpoint stays csv when the root
    has no recognised layout (its ``data.csv`` describes the images)."""
    if data is None:
        return [f"data.dataset={dataset}"] if dataset else []
    if not dataset:
        dataset = detect_kind(Path(data).expanduser())
        if dataset == "folder" and saved.data.dataset == "csv":
            dataset = "csv"
    return [f"data.root={data}", f"data.dataset={dataset}"]


def split_table(cfg: Config, split: str, classes: list[str], path: str | Path) -> tuple[Any, pd.DataFrame]:
    """``(dataset, table)`` of a checkpoint's ``split``: ``val`` (its fold), ``test`` (holdout) or ``all``; the
    dataset's classes must be the checkpoint's."""
    ds = load_dataset(cfg.data, progress=False)
    if list(ds.classes) != list(classes):
        raise FastlesionError(f"{path}: checkpoint classes {list(classes)} do not match the dataset's {ds.classes}")
    if split == "all":
        return ds, ds.table
    parts = split_dataset(ds, cfg.data)
    table = {"val": parts.val, "test": parts.test}.get(split)
    if table is None:
        raise FastlesionError(f"--split must be val, test or all, got {split!r}")
    if len(table) == 0:
        raise FastlesionError(f"the {split} split is empty (set data.holdout > 0 for a test split)")
    return ds, table


def eval_checkpoint(path: str | Path, overrides: list[str] | dict | None = None, split: str = "val",
                    tta: bool = False, out: str | Path | None = None, data: str | Path | None = None,
                    dataset: str | None = None) -> dict[str, Any]:
    """Metrics (and plots, predictions) of a checkpoint on ``split``: ``val`` (its fold), ``test`` (holdout) or
    ``all`` (every image of the dataset). Results go to ``out`` (default ``<checkpoint folder>/eval_<split>``).

    ``data`` / ``dataset`` evaluate on another root (applied after ``overrides``); without ``dataset`` its layout is
    detected (isic2020, ham10000 or folder), as ``fastlesion train`` does."""
    from fastlesion import report
    from fastlesion.engine.rundir import predictions_frame
    from fastlesion.metrics import classification_metrics

    state = ckpt.load(path)
    saved = replace(config_from_dict(state["config"], str(path)), overrides)
    keys = overrides.keys() if isinstance(overrides, dict) else [o.split("=", 1)[0].strip() for o in overrides or []]
    if dataset is None and "data.dataset" in keys:
        dataset = saved.data.dataset  # a dotted --data.dataset counts as given
    cfg = replace(saved, _data_overrides(saved, data, dataset))
    rt = inference_runtime(cfg)
    model, state, _ = load_checkpoint_model(path, rt)
    ds, table = split_table(cfg, split, state["classes"], path)
    loader = build_loader(table, cfg.loader, cfg.data.image_size, train=False, device=rt.device,
                          channels_last=rt.channels_last)
    res = evaluate(model, loader, rt, tta=tta)
    m = classification_metrics(res.labels, res.probs, ds.classes)
    out = Path(out) if out else Path(path).parent / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    predictions_frame(table, res, ds.classes).to_csv(out / "predictions.csv", index=False)
    if len(set(res.labels)) > 1:
        report.plot_roc(res.labels, res.probs, ds.classes, out / "roc.png")
    report.plot_confusion(m["confusion"], ds.classes, out / "confusion.png")
    result = {"checkpoint": str(path), "split": split, "tta": tta, "n": len(res.labels), "loss": res.loss, **m}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    result["out"] = str(out)
    return result


def image_table(data: str | Path) -> tuple[pd.DataFrame, str]:
    """Unlabelled images to predict: an ISIC root (Kaggle's ``test.csv`` or the challenge's
    ``ISIC_2020_Test_Metadata.csv``) or a folder of images."""
    from fastlesion.data.catalog import IMAGE_EXTS

    root = Path(data)
    if isic2020_test_csv(root) is not None:
        return load_isic2020_test(root), "image_name"
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if files:
            return pd.DataFrame({"path": [str(p) for p in files], "image": [p.stem for p in files]}), "image"
    raise FastlesionError(f"{root}: neither an ISIC root with test.csv nor a folder of images")


def skipped_file(out: str | Path) -> Path:
    """Where ``predict(..., skip_bad=True)`` lists the images it skipped: ``submission.csv`` ->
    ``submission.skipped.csv`` (columns ``path,reason``), next to ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.skipped.csv")


def unreadable_images(paths: list[str], workers: int = 0, progress: bool = False) -> pd.DataFrame:
    """The images of ``paths`` that cannot be read, with why: columns ``path, reason`` (``problem: detail``).

    The decoding check is ``fastlesion check``'s (:func:`fastlesion.data.validate.check_files`): a file is
    unreadable when it is missing, empty, truncated or corrupt, or when it is not a JPEG and PIL cannot open it
    either (PNG, BMP, TIFF and WebP files that open are kept). Grayscale / CMYK images and duplicates are read
    fine by both loaders and kept.
    """
    from fastlesion.data.validate import FATAL, check_files

    report = check_files(paths, workers=workers, progress=progress)
    opened_other_format = (report["problem"] == "not_jpeg") & report["format"].notna()
    bad = report[report["problem"].isin(FATAL) & ~opened_other_format]
    bad = bad.drop_duplicates("path")
    return pd.DataFrame({"path": bad["path"].astype(str).tolist(),
                         "reason": (bad["problem"] + ": " + bad["detail"].fillna("")).tolist()})


_LOADER_HINT = "; run `fastlesion check` and set data.exclude_file"


def predict(path: str | Path, data: str | Path, out: str | Path, tta: bool = False,
            overrides: list[str] | dict | None = None, skip_bad: bool = False,
            progress: bool = False) -> pd.DataFrame:
    """Predict ``data`` with a checkpoint and write ``out``.

    Binary models write the ISIC submission format ``image_name,target`` (target = malignant probability) for an
    ISIC root, which needs a checkpoint with the ISIC classes (benign, malignant), and ``image,target`` (target =
    probability of the second class) for a folder of images; multiclass models write one probability column per class
    (on an ISIC root that is no submission file: a warning says so).

    Without ``skip_bad`` an unreadable image stops the prediction with one error naming it. With ``skip_bad`` every
    image is checked first (:func:`unreadable_images`, the decoding check of ``fastlesion check``), the unreadable
    ones are left out and listed with the reason in :func:`skipped_file` (``<out stem>.skipped.csv``, columns
    ``path,reason``; written even when empty, so an old list never lingers). The returned frame's
    ``attrs["skipped"]`` holds the skipped paths and ``attrs["skipped_file"]`` that file (with ``skip_bad``).
    """
    state = ckpt.load(path)
    cfg = replace(config_from_dict(state["config"], str(path)), overrides)
    rt = inference_runtime(cfg)
    model, state, _ = load_checkpoint_model(path, rt)
    classes = list(state["classes"])
    table, id_col = image_table(data)
    if id_col == "image_name" and len(classes) == 2 and classes != ISIC_CLASSES:
        raise FastlesionError(f"{path}: checkpoint classes {classes} are not the ISIC 2020 classes {ISIC_CLASSES}, "
                              f"so it cannot write the ISIC submission (image_name,target) for {data}")
    skipped: list[str] = []
    if skip_bad:
        bad = unreadable_images(table["path"].tolist(), progress=progress)
        side = skipped_file(out)
        side.parent.mkdir(parents=True, exist_ok=True)
        bad.to_csv(side, index=False)
        skipped = bad["path"].tolist()
        table = table[~table["path"].astype(str).isin(set(skipped))].reset_index(drop=True)
        if len(table) == 0:
            raise DatasetError(f"{data}: none of the {len(bad)} images can be read (listed in {side})")
    table = table.assign(label=0)
    loader = build_loader(table, cfg.loader, cfg.data.image_size, train=False, device=rt.device,
                          channels_last=rt.channels_last)
    try:
        res = evaluate(model, loader, rt, tta=tta)
    except DatasetError as e:  # an unreadable image: one line naming it, and the way to go on without it
        if _LOADER_HINT not in str(e):
            raise
        how = ("it passed the --skip-bad check: convert or remove it" if skip_bad else
               "predict with --skip-bad to leave unreadable images out")
        raise DatasetError(f"{str(e).replace(_LOADER_HINT, '')}; {how}") from None
    ids = table[id_col].to_numpy()[res.idx]
    if len(classes) == 2:
        df = pd.DataFrame({id_col: ids, "target": res.probs[:, 1]})
    else:
        df = pd.DataFrame({id_col: ids, **{c: res.probs[:, i] for i, c in enumerate(classes)}})
        if id_col == "image_name":
            log.warning("%s holds one probability column per class (%s) of a %d-class checkpoint, not the ISIC 2020 "
                        "submission format (image_name,target)", out, ",".join(df.columns), len(classes))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    if skip_bad:
        df.attrs["skipped"] = skipped
        df.attrs["skipped_file"] = str(skipped_file(out))
    return df
