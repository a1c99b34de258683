"""``fastlesion eda``: a look at a dataset before training on it.

The dataset is read the way training reads it (:func:`fastlesion.data.catalog.load_dataset`, the exclusion list
applied) and split by the same folds file (:func:`fastlesion.data.splits.load_or_make_folds`: written on first use,
reused by every later run), so the class counts per fold are the ones training will see. Written to ``out``:

* ``class_counts.csv`` (images per class: overall, per fold, holdout) and ``class_by_fold.png``;
* ``images_per_group.png``: how many images each patient / lesion (the grouping key of the folds) has;
* ``image_sizes.png`` and ``image_sizes.csv``: width and height of every image, read from the file header only
  (PIL opens lazily; nothing is decoded);
* ``age.png``, ``sex.png``, ``site.png`` and ``metadata_counts.csv`` where the table has those columns (ISIC 2020:
  ``age_approx``, ``sex``, ``anatom_site_general_challenge``; HAM10000: ``age``, ``sex``, ``localization``);
* ``samples_<class>.png``: a few thumbnails of each class (a fixed random draw);
* ``summary.md``: the numbers and the figures linked.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fastlesion.errors import FastlesionError

log = logging.getLogger(__name__)

AGE_COLUMNS = ("age_approx", "age")
SEX_COLUMNS = ("sex",)
SITE_COLUMNS = ("anatom_site_general_challenge", "anatom_site_general", "localization", "anatom_site")


def _first(table: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in table.columns and table[c].notna().any()), None)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "class"


def image_sizes(paths: list[str]) -> pd.DataFrame:
    """``path, width, height`` of every image from its header (``PIL.Image.open(...).size``, nothing decoded);
    an unreadable file has NaN sizes."""
    from PIL import Image

    rows = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - a missing or corrupt file: `fastlesion check` reports it
            w = h = np.nan
        rows.append((p, w, h))
    return pd.DataFrame(rows, columns=["path", "width", "height"])


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def _fold_column(ds, cfg) -> pd.Series:
    from fastlesion.data.splits import HOLDOUT, _keys, load_or_make_folds

    folds, _ = load_or_make_folds(ds, cfg)
    fold = _keys(ds).map(dict(zip(folds["key"], folds["fold"])))
    return fold.map(lambda f: "holdout" if f == HOLDOUT else f"fold_{int(f)}")


def class_counts(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Images per class: ``class, all, fraction, fold_0 .. fold_k[, holdout]`` (``table`` has ``label, fold``)."""
    names = pd.Categorical.from_codes(table["label"].to_numpy(), categories=classes)
    by = pd.crosstab(names, table["fold"]).reindex(classes, fill_value=0)
    order = sorted((c for c in by.columns if c != "holdout"), key=lambda c: int(c.split("_")[1]))
    by = by[order + (["holdout"] if "holdout" in by.columns else [])]
    out = pd.DataFrame({"class": classes, "all": by.sum(axis=1).to_numpy()})
    out["fraction"] = out["all"] / max(int(out["all"].sum()), 1)
    for c in by.columns:
        out[c] = by[c].to_numpy()
    return out


# ---------------------------------------------------------------------------------------------------- figures


def _plot_class_by_fold(counts: pd.DataFrame, out: Path) -> Path:
    from fastlesion.report import _pyplot, _save

    plt = _pyplot()
    parts = [c for c in counts.columns if c.startswith("fold_") or c == "holdout"]
    frac = counts[["all", *parts]].div(counts[["all", *parts]].sum(axis=0).replace(0, 1), axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(counts["class"].astype(str), counts["all"], color="tab:blue")
    axes[0].set_title("images per class (all)")
    axes[0].tick_params(axis="x", rotation=45)
    bottom = np.zeros(len(frac.columns))
    for i, cls in enumerate(counts["class"]):
        axes[1].bar(frac.columns, frac.iloc[i].to_numpy(), bottom=bottom, label=str(cls))
        bottom += frac.iloc[i].to_numpy()
    axes[1].set_title("class fraction per fold")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return _save(fig, out)


def _plot_hist(values: pd.Series, title: str, xlabel: str, out: Path, integer: bool = False) -> Path:
    from fastlesion.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    v = values.dropna()
    bins = np.arange(v.min(), v.max() + 2) - 0.5 if integer and len(v) and v.max() - v.min() < 60 else 30
    ax.hist(v, bins=bins, color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save(fig, out)


def _plot_sizes(sizes: pd.DataFrame, out: Path) -> Path:
    from fastlesion.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    s = sizes.dropna()
    counts = s.groupby(["width", "height"]).size().reset_index(name="n")
    ax.scatter(counts["width"], counts["height"], s=10 + 60 * counts["n"] / max(int(counts["n"].max()), 1),
               alpha=0.6, color="tab:blue")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"image sizes ({len(s)} images, {len(counts)} distinct)")
    return _save(fig, out)


def _plot_by_class(table: pd.DataFrame, col: str, classes: list[str], title: str, out: Path) -> Path:
    """Stacked bars of a categorical column, one colour per class."""
    from fastlesion.report import _pyplot, _save

    plt = _pyplot()
    names = pd.Categorical.from_codes(table["label"].to_numpy(), categories=classes)
    ct = pd.crosstab(table[col].fillna("missing").astype(str), names)
    ct = ct.loc[ct.sum(axis=1).sort_values(ascending=False).index]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(ct) + 3), 4))
    bottom = np.zeros(len(ct))
    for cls in ct.columns:
        ax.bar(ct.index, ct[cls].to_numpy(), bottom=bottom, label=str(cls))
        bottom += ct[cls].to_numpy()
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(fig, out)


def _plot_age(table: pd.DataFrame, col: str, classes: list[str], out: Path) -> Path:
    from fastlesion.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ages = pd.to_numeric(table[col], errors="coerce")
    bins = np.arange(0, max(float(ages.max()) if ages.notna().any() else 90, 90) + 10, 5)
    for i, cls in enumerate(classes):
        v = ages[table["label"] == i].dropna()
        if len(v):
            ax.hist(v, bins=bins, alpha=0.5, density=True, label=f"{cls} ({len(v)})")
    ax.set_xlabel(col)
    ax.set_ylabel("density")
    ax.set_title("age per class")
    ax.legend(fontsize=8)
    return _save(fig, out)


def _plot_samples(paths: list[str], cls: str, out: Path, thumb: int = 128) -> Path:
    from PIL import Image

    from fastlesion.report import _pyplot, _save

    plt = _pyplot()
    n = max(len(paths), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), paths):
        try:
            with Image.open(p) as im:
                im.draft("RGB", (thumb, thumb))  # JPEG: decode at a reduced scale
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                ax.imshow(np.asarray(im))
        except Exception as e:  # noqa: BLE001 - an unreadable image is shown as such, not fatal
            ax.text(0.5, 0.5, f"unreadable\n{type(e).__name__}", ha="center", va="center", fontsize=7)
        ax.set_title(Path(p).stem[:18], fontsize=7)
    fig.suptitle(f"{cls} ({len(paths)} samples)")
    return _save(fig, out)


# -------------------------------------------------------------------------------------------------- the command


def run_eda(root: str | Path, out: str | Path, dataset: str | None = None, csv: str | None = None,
            overrides: list[str] | None = None, samples: int = 8, seed: int = 0) -> dict[str, Any]:
    """Write the EDA files of the dataset at ``root`` (layout ``dataset``, detected when None) to ``out``.

    ``overrides`` are dotted config keys (``data.num_folds=3``, ``data.folds_file=...``) applied as for training.

    Returns:
        ``{"n_images", "classes", "summary": path of summary.md, "files": [every file written]}``.
    """
    from fastlesion.config import load_config
    from fastlesion.data.catalog import detect_kind, load_dataset

    root = Path(root).expanduser()
    if not root.exists():
        raise FastlesionError(f"{root}: dataset root not found")
    kind = dataset or detect_kind(root)
    task = ["train.task=segmentation"] if kind == "isic2018-seg" else []  # a mask set: sizes, folds, samples
    cfg = load_config(None, [f"data.root={root}", f"data.dataset={kind}", *task] + ([f"data.csv={csv}"] if csv else [])
                      + list(overrides or [])).data
    ds = load_dataset(cfg, progress=False)
    if len(ds.table) == 0:
        raise FastlesionError(f"{root}: the dataset has no images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = ds.table.assign(fold=_fold_column(ds, cfg).to_numpy())
    files: list[Path] = []
    md: list[str] = [f"# EDA: {root}", "",
                     f"Layout `{ds.kind}`, {len(table)} images, {ds.num_classes} classes"
                     + (f", {len(ds.excluded)} excluded" if ds.excluded else "")
                     + (f", {len(ds.missing)} listed but missing" if ds.missing else "")
                     + f"; {cfg.num_folds} folds (split seed {cfg.split_seed}"
                     + (f", holdout {cfg.holdout:g}" if cfg.holdout else "") + ").", ""]

    counts = class_counts(table, ds.classes)
    counts.to_csv(out / "class_counts.csv", index=False)
    files += [out / "class_counts.csv", _plot_class_by_fold(counts, out / "class_by_fold.png")]
    ratio = counts["all"].max() / max(int(counts["all"][counts["all"] > 0].min()), 1) if len(counts) else 0
    md += ["## Classes", "", _md_table(counts), "",
           f"Imbalance: the largest class has {ratio:.1f}x the images of the smallest.", "",
           "![class by fold](class_by_fold.png)", ""]

    per_group = table.groupby("group").size()
    files.append(_plot_hist(per_group, "images per group", "images", out / "images_per_group.png", integer=True))
    classes_per_group = table.groupby("group")["label"].nunique()
    md += ["## Groups (patients / lesions)", "",
           f"{len(per_group)} groups; images per group: median {per_group.median():g}, mean {per_group.mean():.2f}, "
           f"max {per_group.max()}; {int((per_group == 1).sum())} groups with a single image; "
           f"{int((classes_per_group > 1).sum())} groups with images of more than one class. Folds keep every "
           "group in one fold.", "", "![images per group](images_per_group.png)", ""]

    sizes = image_sizes(table["path"].astype(str).tolist())
    sizes.to_csv(out / "image_sizes.csv", index=False)
    files += [out / "image_sizes.csv", _plot_sizes(sizes, out / "image_sizes.png")]
    ok = sizes.dropna()
    common = ok.groupby(["width", "height"]).size().sort_values(ascending=False).head(5)
    md += ["## Image sizes", "", f"Read from the file headers: {len(ok)} images"
           + (f" ({len(sizes) - len(ok)} unreadable: run `fastlesion check`)" if len(ok) < len(sizes) else "")
           + (f"; width {int(ok['width'].min())}-{int(ok['width'].max())}, height {int(ok['height'].min())}-"
              f"{int(ok['height'].max())}; most common: "
              + ", ".join(f"{int(w)}x{int(h)} ({n})" for (w, h), n in common.items()) if len(ok) else "")
           + ".", "", "![image sizes](image_sizes.png)", ""]

    meta_rows = []
    md += ["## Metadata", ""]
    age = _first(table, AGE_COLUMNS)
    if age:
        files.append(_plot_age(table, age, ds.classes, out / "age.png"))
        a = pd.to_numeric(table[age], errors="coerce")
        per = pd.DataFrame({"class": ds.classes,
                            "median age": [a[table["label"] == i].median() for i in range(ds.num_classes)],
                            "missing": [int(a[table["label"] == i].isna().sum()) for i in range(ds.num_classes)]})
        md += [f"Age (`{age}`): median {a.median():g}, range {a.min():g}-{a.max():g}, {int(a.isna().sum())} "
               "missing.", "", _md_table(per), "", "![age](age.png)", ""]
    for what, names, png in (("sex", SEX_COLUMNS, "sex.png"), ("anatomical site", SITE_COLUMNS, "site.png")):
        col = _first(table, names)
        if not col:
            continue
        files.append(_plot_by_class(table, col, ds.classes, f"{what} (`{col}`) by class", out / png))
        values = table[col].fillna("missing").astype(str)
        ct = pd.crosstab(values, pd.Categorical.from_codes(table["label"].to_numpy(), categories=ds.classes))
        ct = ct.loc[ct.sum(axis=1).sort_values(ascending=False).index]
        for value, row in ct.iterrows():
            meta_rows.append({"variable": col, "value": value, "all": int(row.sum()),
                              **{str(c): int(row[c]) for c in ct.columns}})
        view = ct.reset_index().rename(columns={col: what, "row_0": what})
        view.columns = [str(c) for c in view.columns]
        md += [f"{what.capitalize()} (`{col}`):", "", _md_table(view), "", f"![{what}]({png})", ""]
    if meta_rows:
        pd.DataFrame(meta_rows).to_csv(out / "metadata_counts.csv", index=False)
        files.append(out / "metadata_counts.csv")
    if not (age or meta_rows):
        md += ["The table has no age, sex or anatomical-site columns.", ""]

    rng = np.random.default_rng(seed)
    md += ["## Samples", ""]
    for i, cls in enumerate(ds.classes):
        paths = table.loc[table["label"] == i, "path"].astype(str).to_numpy()
        if len(paths) == 0:
            md.append(f"- {cls}: no images")
            continue
        pick = sorted(rng.choice(len(paths), size=min(samples, len(paths)), replace=False))
        name = f"samples_{_safe(cls)}.png"
        files.append(_plot_samples([paths[j] for j in pick], cls, out / name))
        md.append(f"- {cls}: ![{cls}]({name})")
    md.append("")
    summary = out / "summary.md"
    summary.write_text("\n".join(md))
    files.append(summary)
    return {"n_images": len(table), "classes": list(ds.classes), "summary": str(summary),
            "files": [str(f) for f in files]}
