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
import torch
from PIL import Image
from torch import nn

from fastlesion.config import Config, config_from_dict, replace
from fastlesion.data.catalog import ISIC_CLASSES, detect_kind, isic2020_test_csv, load_dataset, load_isic2020_test
from fastlesion.data.loader import build_loader
from fastlesion.data.splits import split_dataset
from fastlesion.engine import checkpoint as ckpt
from fastlesion.engine.loop import evaluate
from fastlesion.engine.runtime import Runtime, resolve_runtime, wrap_model
from fastlesion.engine.tasks import get_task
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
    model = create_model(state["model_name"], num_classes=get_task(cfg.train.task).outputs(len(state["classes"])))
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
    ds = load_dataset(cfg.data, task=cfg.train.task, progress=False)
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
    out = Path(out) if out else Path(path).parent / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.task == "segmentation":
        return _eval_segmentation(path, model, loader, rt, cfg, table, ds.classes, split, tta, out)
    res = evaluate(model, loader, rt, tta=tta)
    m = classification_metrics(res.labels, res.probs, ds.classes)
    predictions_frame(table, res, ds.classes).to_csv(out / "predictions.csv", index=False)
    if len(set(res.labels)) > 1:
        report.plot_roc(res.labels, res.probs, ds.classes, out / "roc.png")
    report.plot_confusion(m["confusion"], ds.classes, out / "confusion.png")
    result = {"checkpoint": str(path), "split": split, "tta": tta, "n": len(res.labels), "loss": res.loss, **m}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    result["out"] = str(out)
    return result


def _eval_segmentation(path: str | Path, model: nn.Module, loader, rt: Runtime, cfg: Config, table: pd.DataFrame,
                       classes: list[str], split: str, tta: bool, out: Path) -> dict[str, Any]:
    """``eval`` of a segmentation checkpoint: the metrics at the model's input size (as in training), per-image
    scores in ``predictions.csv`` and the first images' outlines in ``overlays.png``."""
    task = get_task("segmentation")
    res = task.evaluate(model, loader, rt, cfg, tta=tta)
    cells, m = task.metrics(res, classes)
    task.predictions(table, res, classes).to_csv(out / "predictions.csv", index=False)
    task.on_best(out, res, plots=True)
    result = {"checkpoint": str(path), "split": split, "tta": tta, "n": len(res.idx), "loss": res.loss,
              "task": "segmentation", **cells}
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


class _PredictImages(torch.utils.data.Dataset):
    """Unlabelled images for mask prediction: ``(image tensor, (width, height) as shown, row)``; the image is
    squashed to the model's input as in segmentation evaluation (:func:`~fastlesion.data.transforms.seg_eval_transform`)
    and its EXIF orientation applied, as both loaders do."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import UnidentifiedImageError

        from fastlesion.data.torch_loader import open_rgb

        try:
            img = open_rgb(self.paths[i])
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{self.paths[i]}: cannot decode image ({e}){_LOADER_HINT}") from None
        return self.transform(img), torch.tensor(img.size), i


def _predict_masks(model: nn.Module, cfg: Config, rt: Runtime, table: pd.DataFrame, id_col: str, out: Path,
                   tta: bool) -> pd.DataFrame:
    """One ``<stem>_segmentation.png`` (0/255, the image's own size) per image into the folder ``out``; returns
    ``id, mask, width, height, lesion_fraction`` rows (also written to ``out/masks.csv``). Prediction is one
    pass over the images with the torch reference path (a DataLoader of ``loader.workers`` processes)."""
    from fastlesion.data.transforms import seg_eval_transform
    from fastlesion.segment.predict import binary_mask, mask_filename, predict_mask_logits

    ds = _PredictImages(table["path"].astype(str).tolist(), seg_eval_transform(cfg.loader, cfg.data.image_size))
    workers = min(cfg.loader.resolved_workers(), len(ds))
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.loader.eval_batch_size or 2 * cfg.loader.batch_size,
                                     num_workers=workers, pin_memory=rt.device.type == "cuda")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
    with torch.no_grad():
        for x, sizes, idx in dl:
            logits = predict_mask_logits(model, x.to(rt.device).contiguous(memory_format=fmt), rt, tta=tta).cpu()
            for lg, (w, h), i in zip(logits, sizes.tolist(), idx.tolist()):
                mask = binary_mask(lg, (w, h))
                name = mask_filename(ds.paths[i])
                Image.fromarray(mask).save(out / name)
                rows.append({id_col: table[id_col].iloc[i], "mask": name, "width": w, "height": h,
                             "lesion_fraction": float((mask > 0).mean())})
    df = pd.DataFrame(rows)
    df.to_csv(out / "masks.csv", index=False)
    df.attrs["task"], df.attrs["out"] = "segmentation", str(out)
    return df


def predict(path: str | Path, data: str | Path, out: str | Path | None = None, tta: bool = False,
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

    A segmentation checkpoint writes masks instead: ``out`` is a folder (default ``masks``) that gets one
    ``<image stem>_segmentation.png`` per image at the image's original size (the ISIC 2018 Task 1 submission form)
    and ``masks.csv`` (:func:`_predict_masks`); the skipped-images list goes beside the folder.
    """
    state = ckpt.load(path)
    cfg = replace(config_from_dict(state["config"], str(path)), overrides)
    seg = cfg.train.task == "segmentation"
    out = Path(out if out is not None else ("masks" if seg else "submission.csv"))
    rt = inference_runtime(cfg)
    model, state, _ = load_checkpoint_model(path, rt)
    classes = list(state["classes"])
    table, id_col = image_table(data)
    if seg:  # an ISIC 2018 root holds its ground-truth masks too: they are not images to segment
        from fastlesion.segment.predict import MASK_SUFFIX

        table = table[~table["path"].astype(str).str.endswith(MASK_SUFFIX)].reset_index(drop=True)
    if id_col == "image_name" and len(classes) == 2 and classes != ISIC_CLASSES and not seg:
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
    if seg:
        df = _predict_masks(model, cfg, rt, table, id_col, out, tta)
        if skip_bad:
            df.attrs["skipped"], df.attrs["skipped_file"] = skipped, str(skipped_file(out))
        return df
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
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    df.attrs["out"] = str(out)
    if skip_bad:
        df.attrs["skipped"] = skipped
        df.attrs["skipped_file"] = str(skipped_file(out))
    return df
