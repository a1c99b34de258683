"""Dataset catalog: every supported layout becomes one table.

The table is a :class:`pandas.DataFrame` with the columns

* ``path``  — absolute path of the image (str), inside the dataset root;
* ``label`` — integer class index into :attr:`Dataset.classes`;
* ``group`` — the unit that must not straddle a split (ISIC ``patient_id``, HAM10000 ``lesion_id``);
* ``mask``  — segmentation sets only (:attr:`Dataset.task` ``"segmentation"``): absolute path of the image's binary
  mask PNG (0 background, 255 lesion, or 0/1; the image's size); ``label`` is then 0 everywhere and
  :attr:`Dataset.classes` is ``["lesion"]``;
* every other column of the source CSV, kept as metadata (``image_name``, ``sex``, ``age_approx``, ...).

Missing image files (and missing masks) are found here, when the table is built, and reported with a count and the
first names, never mid-epoch. An image listed twice is kept once (the first row), with one warning; an image (or
mask) file that is a symlink to a file outside the data root is refused in every layout alike (a symlinked *folder*
inside the root, e.g. images on another disk, counts as inside). Layouts:

* ``isic2020`` — ``train.csv`` (ISIC 2020 columns) and ``train/`` or ``jpeg/train/<image_name>.jpg`` (Kaggle), or the
  ISIC challenge download: ``ISIC_2020_Training_GroundTruth[_v2].csv`` and ``ISIC_2020_Training_JPEG/[train/]``;
* ``ham10000`` — ``HAM10000_metadata.csv`` and ``HAM10000_images_part_{1,2}/<image_id>.jpg`` (any case);
* ``isic2019`` — ``ISIC_2019_Training_GroundTruth.csv`` (one-hot ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``), the optional
  ``ISIC_2019_Training_Metadata.csv`` and ``ISIC_2019_Training_Input/<image>.jpg``;
* ``isic2018-seg`` — ISIC 2018 Task 1 (lesion segmentation): ``ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg`` with
  ``ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png``, plus the ``_Validation_`` and ``_Test_`` pairs
  of folders when present (column ``official_split``: ``train``, ``validation``, ``test``; only ``train`` rows enter
  the cross-validation folds, the others are the holdout test split, see :mod:`fastlesion.data.splits`); group =
  the image id (the set has no patient or lesion ids);
* ``csv`` — any CSV with a path and a label column (names configurable), optional group column; with
  ``task="segmentation"`` a path and a mask column (``data.mask_col``) instead, no label;
* ``folder`` — one sub-folder per class;
* ``synthetic`` — a generated ISIC-like (or HAM-like, or ISIC 2018 Task 1-like with masks) set, written on first
  use into the cache (``data.synthetic_layout``).

``data.extra_train`` adds other labelled sets to the training folds (:func:`load_extra_train`), their classes mapped
onto the main dataset's (:data:`EXTRA_CLASS_MAPS`, else by name).

``data.class_map`` then groups the source classes of any kind into training classes (:func:`apply_class_map`):
``label`` and :attr:`Dataset.classes` become the mapped ones, ``source_class`` keeps the source class name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fastlesion.config import CATCH_ALL, DataConfig
from fastlesion.errors import DatasetError

log = logging.getLogger(__name__)

ISIC_COLUMNS = (
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
    "diagnosis", "benign_malignant", "target",
)
ISIC_TEST_COLUMNS = ISIC_COLUMNS[:5]
ISIC_CLASSES = ["benign", "malignant"]
ISIC_CHALLENGE_CSVS = ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv")
ISIC_CHALLENGE_TEST_CSV = "ISIC_2020_Test_Metadata.csv"
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ISIC2019_TRUTH_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_META_CSV = "ISIC_2019_Training_Metadata.csv"
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SEG_CLASSES = ["lesion"]
"""The one class of a segmentation table."""
SEG_PARTS = (("train", "Training"), ("validation", "Validation"), ("test", "Test"))
"""ISIC 2018 Task 1 parts: (``official_split`` value, the word in its folder names)."""
SEG_MASK_SUFFIX = "_segmentation.png"


def isic2018_seg_dirs(part: str) -> tuple[str, str]:
    """``(image folder, mask folder)`` names of an ISIC 2018 Task 1 part (``Training``, ``Validation``, ``Test``)."""
    return f"ISIC2018_Task1-2_{part}_Input", f"ISIC2018_Task1_{part}_GroundTruth"


@dataclass
class Dataset:
    """A loaded dataset: the table, its class names and what was dropped."""

    table: pd.DataFrame
    classes: list[str]
    root: Path
    kind: str
    missing: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    task: str = "classification"
    """``"classification"``, or ``"segmentation"`` for a table with a ``mask`` column (one class, ``lesion``)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.table)


# --------------------------------------------------------------------------------------------------- helpers
def cache_dir() -> Path:
    """``$FASTLESION_CACHE`` or ``~/.cache/fastlesion``."""
    return Path(os.environ.get("FASTLESION_CACHE") or Path.home() / ".cache" / "fastlesion")


def _read_csv(path: Path, required: tuple[str, ...] | list[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} CSV not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {', '.join(map(repr, missing))} "
                           f"(found: {', '.join(map(str, df.columns))})")
    return df


def _inside_name(root: Path, path: str) -> bool:
    """Whether the normalised ``path`` names something under ``root`` (no symlink is followed)."""
    base = os.path.normpath(root)
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _child(folder: Path, name: str) -> Path | None:
    """Sub-folder of ``folder`` called ``name``, matched case-insensitively."""
    for c in folder.iterdir():
        if c.is_dir() and c.name.lower() == name.lower():
            return c
    return None


def _first_dir(root: Path, candidates: list[str]) -> Path | None:
    """First existing candidate sub-folder (``a/b`` paths allowed), matched case-insensitively."""
    for cand in candidates:
        cur: Path | None = root
        for part in Path(cand).parts:
            cur = _child(cur, part) if cur is not None else None
        if cur is not None:
            return cur
    return None


def _image_paths(folder: Path, names: pd.Series, csv: Path, col: str, root: Path) -> list[str]:
    """``folder/<name>.jpg`` for each name of column ``col``; a name that leads out of ``folder`` is an error.

    An absolute name or one with a ``..`` part could reach any file on the machine (and ``check`` would call it
    fine), so it is refused like an escaping path of the ``csv`` kind. The test is on the names, not on resolved
    paths, so an image folder that is a symlink to another disk still works.
    """
    values = [str(n) for n in names]
    bad = [v for v in values if Path(v).is_absolute() or ".." in Path(v).parts]
    if bad:
        first = ", ".join(repr(v) for v in bad[:3])
        raise DatasetError(f"{csv}: column {col!r} has {len(bad)} value(s) that escape the data root {root} "
                           f"(first: {first})")
    return [str(folder / f"{v}.jpg") for v in values]


def _split_missing(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    # bool dtype even for an empty table: an empty object-dtype mask would select columns, not rows
    exists = df["path"].map(os.path.isfile).astype(bool)
    return df.loc[exists].reset_index(drop=True), df.loc[~exists, "path"].tolist()


def _symlinks(paths: pd.Series) -> dict[str, str]:
    """``{path: the file it resolves to}`` for each path that is itself a symlink."""
    return {p: os.path.realpath(p) for p in paths if os.path.islink(p)}


def _check_links(links: dict[str, str], root: Path, source: Path) -> None:
    """Refuse image files that are symlinks to a file outside the data root, in every dataset kind alike.

    The data root is where the dataset is, and a folder inside it that is a symlink (images kept on another disk)
    counts as inside: a linked file may point anywhere under the root or under such a linked folder, not elsewhere.
    """
    base = os.path.realpath(root)
    inside_of: dict[str, list[str]] = {}  # parent folder -> where its images may point

    def allowed(parent: str) -> list[str]:
        if parent not in inside_of:
            bases, cur = [base], str(root)
            for part in Path(os.path.relpath(parent, root)).parts:
                cur = os.path.join(cur, part)
                if os.path.islink(cur):
                    bases.append(os.path.realpath(cur))
            inside_of[parent] = bases
        return inside_of[parent]

    bad = [(p, t) for p, t in links.items()
           if not any(t == b or t.startswith(b.rstrip(os.sep) + os.sep) for b in allowed(os.path.dirname(p)))]
    if bad:
        p, t = bad[0]
        raise DatasetError(f"{source}: {len(bad)} image(s) are symlinks to files outside the data root {root} "
                           f"(first: {p} -> {t}); copy the files into the root, or link their whole folder")


def _drop_duplicates(df: pd.DataFrame, links: dict[str, str], root: Path, source: Path) -> pd.DataFrame:
    """Keep the first row of each image listed more than once (by path, or a symlink to a listed image), warning
    once: an image counted twice would weigh twice in training and in every validation metric."""
    key = df["path"].map(lambda p: links.get(p, p))
    dup = key.duplicated(keep="first")
    if not dup.any():
        return df
    other = int((dup & (df["label"] != df.groupby(key)["label"].transform("first"))).sum())
    example = os.path.relpath(df.loc[dup, "path"].iloc[0], root)
    log.warning("%s: %d duplicate row(s) of the same image dropped, the first row of each kept (e.g. %s)%s", source,
                int(dup.sum()), example, f"; {other} of them had another label than the kept row" if other else "")
    return df[~dup].reset_index(drop=True)


def _excluded_rows(df: pd.DataFrame, exclude: set[str]) -> pd.Series:
    """Rows whose image (or mask) is in the exclusion set (resolved paths, see ``validate.exclusion_key``)."""
    cols = ["path"] + (["mask"] if "mask" in df.columns else [])
    hit = pd.Series(False, index=df.index)
    for c in cols:
        hit |= df[c].isin(exclude)
    if hit.sum() < len(exclude):  # the exclusion file's paths are resolved: images in a symlinked folder
        for c in cols:
            hit |= df[c].map(os.path.realpath).isin(exclude)
    return hit


def _finish(df: pd.DataFrame, classes: list[str], root: Path, kind: str, source: Path,
            strict: bool, exclude: set[str] | None, task: str = "classification") -> Dataset:
    """Drop duplicate and excluded rows, refuse symlinks out of the root, find missing files, check the result.

    A segmentation table (``task="segmentation"``, with a ``mask`` column) is checked for missing masks as well: with
    ``strict`` an image without its mask is an error (count and first names), else the row is kept for
    ``fastlesion check`` to report. A row is excluded when its image or its mask is in ``exclude``.
    """
    links = _symlinks(df["path"])
    df = _drop_duplicates(df, links, root, source)
    excluded: list[str] = []
    if exclude:
        mask = _excluded_rows(df, exclude)
        excluded = df.loc[mask, "path"].tolist()
        if excluded:
            log.warning("skipping %d image(s) listed in the exclusion file", len(excluded))
        df = df[~mask].reset_index(drop=True)
    _check_links({p: links[p] for p in df["path"] if p in links}, root, source)
    if "mask" in df.columns:
        _check_links(_symlinks(df["mask"]), root, source)
    df, missing = _split_missing(df)
    if missing and strict:
        names = ", ".join(Path(m).name for m in missing[:5])
        raise DatasetError(f"{source}: {len(missing)} of {len(df) + len(missing)} listed images are missing "
                           f"under {root} (first: {names}); run `fastlesion check {root}` for a full report")
    if len(df) == 0 and (strict or not missing):
        # an empty list is an error even for `fastlesion check` (strict=False): there is nothing to check
        why = f"all {len(excluded)} listed images are excluded" if excluded else "no images listed"
        raise DatasetError(f"{source}: the dataset is empty ({why})")
    if task == "segmentation":
        no_mask = ~df["mask"].map(os.path.isfile).astype(bool)
        if strict and no_mask.any():
            names = ", ".join(Path(m).name for m in df.loc[no_mask, "mask"][:5])
            raise DatasetError(f"{source}: {int(no_mask.sum())} of {len(df)} images have no mask under {root} "
                               f"(first: {names}); run `fastlesion check {root}` for a full report")
    elif strict and df["label"].nunique() < 2:
        only = classes[int(df["label"].iloc[0])] if len(df) else "?"
        raise DatasetError(f"{source}: the label column has a single class ({only!r}); a classifier needs two or more")
    df["group"] = df["group"].astype(str)
    return Dataset(table=df, classes=classes, root=root, kind=kind, missing=missing, excluded=excluded, task=task)


# --------------------------------------------------------------------------------------------------- layouts
def _isic_image_dir(root: Path, split: str) -> Path:
    challenge = {"train": ["ISIC_2020_Training_JPEG/train", "ISIC_2020_Training_JPEG"],
                 "test": ["ISIC_2020_Test_Input/ISIC_2020_Test_Input", "ISIC_2020_Test_Input",
                          "ISIC_2020_Test_JPEG/test", "ISIC_2020_Test_JPEG"]}[split]
    found = _first_dir(root, [split, f"jpeg/{split}", f"{split}_jpeg", f"jpeg_{split}", *challenge])
    if found is None:
        raise DatasetError(f"{root}: no ISIC image folder found (looked for {split}/, jpeg/{split}/ and "
                           f"{challenge[-1]}/)")
    return found


def _isic_csv(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` present in ``root`` (matched case-insensitively), or None."""
    if not root.is_dir():
        return None
    present = {p.name.lower(): p for p in root.iterdir() if p.is_file()}
    for name in names:
        if name.lower() in present:
            return present[name.lower()]
    return None


def isic2020_train_csv(root: Path) -> Path | None:
    """The ISIC 2020 training CSV of ``root``: Kaggle's ``train.csv`` or the challenge's ground truth CSV."""
    return _isic_csv(root, ("train.csv", *ISIC_CHALLENGE_CSVS))


def isic2020_test_csv(root: Path) -> Path | None:
    """The ISIC 2020 test CSV of ``root``: Kaggle's ``test.csv`` or the challenge's ``ISIC_2020_Test_Metadata.csv``."""
    return _isic_csv(root, ("test.csv", ISIC_CHALLENGE_TEST_CSV))


def load_isic2020(root: Path, strict: bool = True, exclude: set[str] | None = None) -> Dataset:
    """ISIC 2020 training set: label = ``target``, group = ``patient_id``, the rest kept as metadata.

    Read from Kaggle's ``train.csv`` or, failing that, the ISIC challenge's ``ISIC_2020_Training_GroundTruth_v2.csv``
    (with a ``lesion_id`` column, kept as metadata) or ``ISIC_2020_Training_GroundTruth.csv``.
    """
    csv = isic2020_train_csv(root) or root / "train.csv"
    df = _read_csv(csv, ISIC_COLUMNS, "ISIC 2020 train")
    img_dir = _isic_image_dir(root, "train")
    df = df.copy()
    bad = ~df["target"].isin([0, 1])
    if bad.any():
        raise DatasetError(f"{csv}: column 'target' must be 0 or 1 (row {int(bad.idxmax()) + 2}: "
                           f"{df['target'][bad].iloc[0]!r})")
    df.insert(0, "path", _image_paths(img_dir, df["image_name"], csv, "image_name", root))
    df.insert(1, "label", df["target"].astype(int))
    df.insert(2, "group", df["patient_id"].fillna(df["image_name"]).astype(str))
    return _finish(df, list(ISIC_CLASSES), root, "isic2020", csv, strict, exclude)


# the challenge's test metadata names its columns image, patient, sex, age_approx, anatom_site
_CHALLENGE_TEST_NAMES = {"image": "image_name", "patient": "patient_id",
                         "anatom_site": "anatom_site_general_challenge"}


def load_isic2020_test(root: Path, strict: bool = True) -> pd.DataFrame:
    """ISIC 2020 ``test.csv`` (first five columns) with a ``path`` column, for ``fastlesion predict``.

    Missing test images are an error, unless ``strict`` is False: then the rows of the present ones are returned and
    ``df.attrs["missing"]`` lists the others (``fastlesion prepare``).

    The challenge download's ``ISIC_2020_Test_Metadata.csv`` (columns ``image``/``image_name``, ``patient``, ...)
    with images in ``ISIC_2020_Test_Input/`` is read too, its columns renamed to the Kaggle names.
    """
    csv = isic2020_test_csv(root) or root / "test.csv"
    if csv.is_file() and csv.name.lower() == ISIC_CHALLENGE_TEST_CSV.lower():
        df = _read_csv(csv, (), "ISIC 2020 test")
        df = df.rename(columns={k: v for k, v in _CHALLENGE_TEST_NAMES.items()
                                if k in df.columns and v not in df.columns})
        if "image_name" not in df.columns:
            raise DatasetError(f"{csv}: missing required column 'image' (or 'image_name') "
                               f"(found: {', '.join(map(str, df.columns))})")
    else:
        df = _read_csv(csv, ISIC_TEST_COLUMNS, "ISIC 2020 test")
    img_dir = _isic_image_dir(root, "test")
    df = df.copy()
    df.insert(0, "path", _image_paths(img_dir, df["image_name"], csv, "image_name", root))
    _check_links(_symlinks(df["path"]), root, csv)
    df, missing = _split_missing(df)
    if missing and strict:
        raise DatasetError(f"{csv}: {len(missing)} test images are missing (first: {Path(missing[0]).name})")
    df.attrs["missing"] = list(missing)
    return df


def load_ham10000(root: Path, strict: bool = True, exclude: set[str] | None = None) -> Dataset:
    """HAM10000: label = ``dx`` in the fixed order akiec, bcc, bkl, df, mel, nv, vasc; group = ``lesion_id``."""
    csv = root / "HAM10000_metadata.csv"
    if not csv.is_file():
        alt = [p for p in root.glob("*.csv") if p.name.lower() == "ham10000_metadata.csv"]
        csv = alt[0] if alt else csv
    df = _read_csv(csv, HAM_COLUMNS, "HAM10000 metadata")
    unknown = sorted(set(df["dx"]) - set(HAM_CLASSES))
    if unknown:
        raise DatasetError(f"{csv}: column 'dx' has unknown class(es) {unknown} (expected {HAM_CLASSES})")
    dirs = [d for d in (_first_dir(root, [f"HAM10000_images_part_{i}"]) for i in (1, 2)) if d is not None]
    if not dirs:
        raise DatasetError(f"{root}: no HAM10000_images_part_1/ or _part_2/ folder found")
    where: dict[str, Path] = {}
    for d in dirs:
        for p in d.iterdir():
            where.setdefault(p.stem, p)
    df = df.copy()
    default = _image_paths(dirs[0], df["image_id"], csv, "image_id", root)
    df.insert(0, "path", [str(where.get(str(i), d)) for i, d in zip(df["image_id"], default, strict=True)])
    df.insert(1, "label", df["dx"].map(HAM_CLASSES.index).astype(int))
    df.insert(2, "group", df["lesion_id"].astype(str))
    return _finish(df, list(HAM_CLASSES), root, "ham10000", csv, strict, exclude)


def load_isic2019(root: Path, strict: bool = True, exclude: set[str] | None = None) -> Dataset:
    """ISIC 2019: label = the one-hot column set to 1, classes in the CSV's column order (``UNK`` dropped when no
    image has it); group = ``lesion_id`` of the metadata CSV (when present and filled), else the image."""
    csv = _isic_csv(root, (ISIC2019_TRUTH_CSV,)) or root / ISIC2019_TRUTH_CSV
    df = _read_csv(csv, ["image", *ISIC2019_CLASSES[:-1]], "ISIC 2019 ground truth").copy()
    classes = [c for c in df.columns if c in ISIC2019_CLASSES]
    onehot = df[classes].apply(pd.to_numeric, errors="coerce")
    bad = ~(onehot.isin([0, 1]).all(axis=1) & (onehot.sum(axis=1) == 1))
    if bad.any():
        row = int(bad.idxmax())
        raise DatasetError(f"{csv}: each row needs exactly one 1 among {', '.join(classes)} (row {row + 2}: "
                           f"{df.loc[row, 'image']!r})")
    if "UNK" in classes and not onehot["UNK"].any():
        classes.remove("UNK")
    label = onehot[classes].to_numpy().argmax(axis=1)
    meta_csv = _isic_csv(root, (ISIC2019_META_CSV,))
    if meta_csv is not None:
        meta = _read_csv(meta_csv, ["image"], "ISIC 2019 metadata").drop_duplicates("image")
        meta = meta.drop(columns=[c for c in meta.columns if c != "image" and c in df.columns])
        df = df.merge(meta, on="image", how="left")
    img_dir = _first_dir(root, ["ISIC_2019_Training_Input/ISIC_2019_Training_Input", "ISIC_2019_Training_Input"])
    if img_dir is None:
        raise DatasetError(f"{root}: no ISIC_2019_Training_Input/ image folder found")
    group = df["lesion_id"] if "lesion_id" in df.columns else pd.Series(pd.NA, index=df.index)
    df.insert(0, "path", _image_paths(img_dir, df["image"], csv, "image", root))
    df.insert(1, "label", label.astype(int))
    df.insert(2, "group", group.fillna(df["image"]).astype(str))
    return _finish(df, classes, root, "isic2019", csv, strict, exclude)


def _seg_part(root: Path, part: str) -> tuple[Path | None, Path | None]:
    """The image and mask folders of ISIC 2018 Task 1 ``part`` (None where absent; ``X/X`` from unzipping is fine)."""
    return tuple(_first_dir(root, [f"{name}/{name}", name]) for name in isic2018_seg_dirs(part))  # type: ignore


def load_isic2018_seg(root: Path, strict: bool = True, exclude: set[str] | None = None) -> Dataset:
    """ISIC 2018 Task 1 (lesion segmentation): every image of the Input folders with its ground-truth mask.

    The Training pair of folders is required; the Validation and Test pairs join when present, marked in the column
    ``official_split`` (``train``, ``validation``, ``test``): the folds are made of the ``train`` rows only, the others
    form the holdout test split. An Input folder without its GroundTruth folder is left out with a warning (nothing
    to score it against). Images are the files with an image extension (the download's ``LICENSE.txt`` and
    ``ATTRIBUTION.txt`` are not); each one's mask is ``<image stem>_segmentation.png`` in the GroundTruth folder
    (matched case-insensitively). An image without its mask is an error with ``strict`` (count and first names).

    Columns: ``path``, ``label`` (0), ``group`` (the image id), ``mask``, ``image_name``, ``official_split``.
    """
    rows = []
    for split, part in SEG_PARTS:
        img_dir, mask_dir = _seg_part(root, part) if root.is_dir() else (None, None)
        img_name, mask_name = isic2018_seg_dirs(part)
        if split == "train" and (img_dir is None or mask_dir is None):
            missing = img_name if img_dir is None else mask_name
            raise DatasetError(f"{root}: no {missing}/ folder found (an ISIC 2018 Task 1 root holds {img_name}/ "
                               f"with ISIC_<id>.jpg and {mask_name}/ with ISIC_<id>{SEG_MASK_SUFFIX})")
        if img_dir is None:
            continue
        if mask_dir is None:
            log.warning("%s: %s/ has no %s/ beside it: its images are left out (no masks to score them)", root,
                        img_dir.name, mask_name)
            continue
        masks = {p.name.lower(): p for p in mask_dir.iterdir() if p.name.lower().endswith(SEG_MASK_SUFFIX)}
        images = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS
                         and not p.name.startswith(".") and not p.is_dir()), key=lambda p: p.name)
        for p in images:
            m = masks.pop(f"{p.stem}{SEG_MASK_SUFFIX}".lower(), mask_dir / f"{p.stem}{SEG_MASK_SUFFIX}")
            rows.append((str(p), 0, p.stem, str(m), p.stem, split))
        if masks:
            log.warning("%s: %d mask(s) without an image in %s/ ignored (first: %s)", root, len(masks),
                        img_dir.name, sorted(m.name for m in masks.values())[0])
    df = pd.DataFrame(rows, columns=["path", "label", "group", "mask", "image_name", "official_split"])
    df["label"] = df["label"].astype(int)
    return _finish(df, list(SEG_CLASSES), root, "isic2018-seg", root, strict, exclude, task="segmentation")


def _labels_to_index(values: pd.Series, source: Path, col: str) -> tuple[pd.Series, list[str]]:
    if values.isna().any():
        raise DatasetError(f"{source}: column {col!r} has {int(values.isna().sum())} empty label(s)")
    if pd.api.types.is_integer_dtype(values):
        classes = [str(c) for c in sorted(values.unique())]
        return values.map(lambda v: classes.index(str(v))).astype(int), classes
    names = values.astype(str)
    classes = sorted(names.unique())
    return names.map(classes.index).astype(int), classes


def _csv_paths(values: pd.Series, root: Path, csv: Path, what: str) -> list[str]:
    """Absolute paths of a CSV column (relative to ``root``, or absolute inside it); one leading out is an error."""
    paths = []
    for p in values.astype(str):
        # judged on the name, as the other kinds: a folder inside the root may be a symlink to another disk, and a
        # symlinked file is checked (like theirs) by where it points
        full = os.path.normpath(p if Path(p).is_absolute() else root / p)
        if not _inside_name(root, full):
            # an absolute path may spell the root another way (through a symlink to it): its folder decides
            real = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
            if not Path(p).is_absolute() or not _inside_name(Path(os.path.realpath(root)), real):
                raise DatasetError(f"{csv}: {what} path {p!r} escapes the data root {root}")
            full = real
        paths.append(full)
    return paths


def load_csv(root: Path, cfg: DataConfig, strict: bool = True, exclude: set[str] | None = None,
             task: str = "classification") -> Dataset:
    """Any CSV with a path and a label column; paths relative to ``root`` (or absolute inside it).

    With ``task="segmentation"`` the CSV needs a path and a mask column (``data.mask_col``, the mask PNG's path, same
    rules as the image path) and no label: every row is class ``lesion`` (label 0). Without ``data.group_col`` each
    image is its own group.
    """
    if not cfg.csv:
        raise DatasetError("data.csv: the csv dataset kind needs data.csv (the CSV file)")
    seg = task == "segmentation"
    csv = Path(cfg.csv) if Path(cfg.csv).is_absolute() else root / cfg.csv
    required = [cfg.path_col, cfg.mask_col if seg else cfg.label_col] + ([cfg.group_col] if cfg.group_col else [])
    df = _read_csv(csv, required, "dataset").copy()
    paths = _csv_paths(df[cfg.path_col], root, csv, "image")
    if seg:
        empty = df[cfg.mask_col].isna() | (df[cfg.mask_col].astype(str).str.strip() == "")
        if empty.any():
            raise DatasetError(f"{csv}: column {cfg.mask_col!r} (data.mask_col) has {int(empty.sum())} empty "
                               f"value(s) (first: row {int(empty.to_numpy().argmax()) + 2}); every image needs "
                               "its mask")
        masks = _csv_paths(df[cfg.mask_col], root, csv, "mask")
        labels, classes = pd.Series(0, index=df.index), list(SEG_CLASSES)
    else:
        labels, classes = _labels_to_index(df[cfg.label_col], csv, cfg.label_col)
    group = df[cfg.group_col].astype(str) if cfg.group_col else pd.Series(paths, index=df.index)
    # the source columns stay as metadata, except those named like the table's own columns (replaced)
    df = df.drop(columns=[c for c in ("path", "label", "group", "mask") if c in df.columns])
    df.insert(0, "path", paths)
    df.insert(1, "label", labels.values)
    df.insert(2, "group", group.values)
    if seg:
        df.insert(3, "mask", masks)
    return _finish(df, classes, root, "csv", csv, strict, exclude, task=task)


def load_folder(root: Path, strict: bool = True, exclude: set[str] | None = None) -> Dataset:
    """One sub-folder per class (sorted names are the classes); each image is its own group."""
    if not root.is_dir():
        raise DatasetError(f"{root}: data root is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = []
    for i, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                rows.append((str(p), i, str(p.relative_to(root))))
    if not rows:
        raise DatasetError(f"{root}: the dataset is empty (no images in class sub-folders)")
    df = pd.DataFrame(rows, columns=["path", "label", "group"])
    present = sorted(df["label"].unique())
    classes = [classes[i] for i in present]
    df["label"] = df["label"].map(present.index)
    return _finish(df, classes, root, "folder", root, strict, exclude)


def apply_class_map(ds: Dataset, mapping: dict[str, str], strict: bool = True) -> Dataset:
    """Group the source classes into training classes (``data.class_map``), in place.

    The training classes are the mapping's values in order of first appearance (``{mel: mel, nv: nv, '*': other}``
    gives mel, nv, other; the ``'*'`` entry counts where it stands, and only when a source class falls to it), so the
    mapping also fixes which class is "positive" (index 1) in a two-class grouping. ``label`` becomes the index of
    the mapped class and a ``source_class`` column keeps the source class name.

    Raises:
        DatasetError: A key names no class of the dataset, a source class is not mapped (and there is no ``'*'``
            entry), or (``strict``) the mapping leaves fewer than two classes with images.
    """
    source = list(ds.classes)
    unknown = [k for k in mapping if k != CATCH_ALL and k not in source]
    if unknown:
        raise DatasetError(f"data.class_map: {unknown[0]!r} is not a class of this {ds.kind} dataset (its classes: "
                           f"{', '.join(source)})")
    catch_all = mapping.get(CATCH_ALL)
    unmapped = [c for c in source if c not in mapping]
    if unmapped and catch_all is None:
        raise DatasetError(f"data.class_map: source class {unmapped[0]!r} is not mapped ({len(unmapped)} unmapped: "
                           f"{', '.join(unmapped)}); map it, or add '{CATCH_ALL}': <class> for every class not named")
    target = {c: mapping.get(c, catch_all) for c in source}
    used = set(target.values())
    classes = list(dict.fromkeys(v for v in mapping.values() if v in used))
    index = [classes.index(target[c]) for c in source]
    table = ds.table
    table["source_class"] = [source[i] for i in table["label"]]
    table["label"] = [index[i] for i in table["label"]]
    table["label"] = table["label"].astype(int)
    if strict and table["label"].nunique() < 2:
        only = classes[int(table["label"].iloc[0])] if len(table) else "?"
        raise DatasetError(f"data.class_map: every image maps to the one class {only!r}; a classifier needs two or "
                           "more")
    ds.classes = classes
    return ds


EXTRA_CLASS_MAPS: dict[tuple[str, str], dict[str, str]] = {
    ("isic2019", "isic2020"): {"MEL": "malignant", CATCH_ALL: "benign"},  # as the ISIC 2020 winners did
    ("ham10000", "isic2020"): {"mel": "malignant", CATCH_ALL: "benign"},
    ("isic2019", "ham10000"): {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "BKL": "bkl", "DF": "df",
                               "VASC": "vasc"},
}
"""Built-in ``data.extra_train`` class maps: (extra kind, main kind) -> {extra class: main source class}."""


def _source_kind(ds: Dataset, cfg: DataConfig) -> str:
    return cfg.synthetic_layout if ds.kind == "synthetic" else ds.kind


def map_extra_classes(extra: Dataset, main: Dataset, cfg: DataConfig) -> list[int]:
    """The main dataset's label index of each class of ``extra`` (for ``data.extra_train``).

    An extra class goes to a source class of the main dataset through the built-in map of the pair of kinds
    (:data:`EXTRA_CLASS_MAPS`), else by name (case-insensitive); then through ``data.class_map`` when the main
    dataset has one, as the main dataset's own source classes do.

    Raises:
        DatasetError: an extra class that cannot be mapped, naming it.
    """
    builtin = EXTRA_CLASS_MAPS.get((extra.kind, _source_kind(main, cfg)))
    sources = (sorted(set(main.table["source_class"])) if "source_class" in main.table.columns
               else list(main.classes))
    by_name = {c.lower(): c for c in sources}
    if cfg.class_map:
        by_name.update({k.lower(): k for k in cfg.class_map if k != CATCH_ALL})
    out = []
    for c in extra.classes:
        if builtin is not None:
            src = builtin.get(c, builtin.get(CATCH_ALL))
        else:
            src = by_name.get(c.lower())
        target = src
        if cfg.class_map:  # an unnamed class falls to the main map's catch-all, as the main source classes do
            target = cfg.class_map.get(src, cfg.class_map.get(CATCH_ALL)) if src is not None else \
                cfg.class_map.get(CATCH_ALL)
        if target not in main.classes:
            raise DatasetError(f"data.extra_train: class {c!r} of {extra.root} ({extra.kind}) cannot be mapped onto "
                               f"the classes of the {_source_kind(main, cfg)} dataset ({', '.join(main.classes)}); "
                               "drop those images from that set or train without it")
        out.append(main.classes.index(target))
    return out


def load_extra_train(main: Dataset, cfg: DataConfig) -> pd.DataFrame:
    """The rows of every ``data.extra_train`` root, labelled with the main dataset's classes.

    Each root is detected like ``--data``; a ``source_class`` column keeps the extra class name, ``extra_root`` the
    root, and groups are prefixed with the root (they never meet the main dataset's groups). Empty without roots.
    """
    frames = []
    for item in cfg.extra_train or []:
        root = Path(item).expanduser()
        if not root.is_dir():
            raise DatasetError(f"data.extra_train: {root}: data root not found")
        root = root.resolve()
        if root == main.root:
            raise DatasetError(f"data.extra_train: {root} is the main dataset's root")
        kind = detect_kind(root)
        extra = LOADERS[kind](root, DataConfig(dataset=kind, root=str(root)), strict=True, exclude=None)
        index = map_extra_classes(extra, main, cfg)
        t = extra.table.copy()
        t["source_class"] = [extra.classes[i] for i in t["label"]]
        t["label"] = [index[i] for i in t["label"]]
        t["label"] = t["label"].astype(int)
        t["group"] = f"{root}:" + t["group"].astype(str)
        t["extra_root"] = str(root)
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else main.table.iloc[:0].copy()


def synthetic_root(cfg: DataConfig) -> Path:
    """The cache folder of the built-in synthetic set (generated on first use)."""
    name = (f"{cfg.synthetic_layout}-n{cfg.synthetic_n}-w{cfg.synthetic_size}-p{cfg.synthetic_positive_rate:g}"
            f"-s{cfg.synthetic_seed}")
    return cache_dir() / "synthetic" / name


def ensure_synthetic(cfg: DataConfig, progress: bool = True) -> Path:
    """Generate the synthetic set for ``cfg`` into the cache (or ``cfg.root``) unless it is already there."""
    from fastlesion.data.synthetic import generate

    root = Path(cfg.root) if cfg.root else synthetic_root(cfg)
    return generate(cfg.synthetic_layout, root, n=cfg.synthetic_n, seed=cfg.synthetic_seed,
                    size=cfg.synthetic_size, positive_rate=cfg.synthetic_positive_rate,
                    workers=min(4, os.cpu_count() or 1), progress=progress)


def detect_kind(root: Path) -> str:
    """Guess the layout of a data root: isic2020 (Kaggle or ISIC challenge download), isic2019, ham10000,
    isic2018-seg (an ``ISIC2018_Task1-2_Training_Input`` or ``ISIC2018_Task1_Training_GroundTruth`` folder) or
    folder."""
    if isic2020_train_csv(root) is not None:
        return "isic2020"
    if _isic_csv(root, (ISIC2019_TRUTH_CSV,)) is not None:
        return "isic2019"
    if any(p.name.lower() == "ham10000_metadata.csv" for p in root.glob("*.csv")):
        return "ham10000"
    if root.is_dir() and any(d is not None for d in _seg_part(root, "Training")):
        return "isic2018-seg"
    return "folder"


LOADERS: dict[str, Callable[..., Dataset]] = {
    "isic2020": lambda root, cfg, task="classification", **kw: load_isic2020(root, **kw),
    "ham10000": lambda root, cfg, task="classification", **kw: load_ham10000(root, **kw),
    "isic2019": lambda root, cfg, task="classification", **kw: load_isic2019(root, **kw),
    "isic2018-seg": lambda root, cfg, task="segmentation", **kw: load_isic2018_seg(root, **kw),
    "csv": load_csv,
    "folder": lambda root, cfg, task="classification", **kw: load_folder(root, **kw),
}
"""``kind -> loader(root, data_cfg, strict=..., exclude=..., task=...)``; only the csv kind reads ``task`` (the
others are of one task: isic2018-seg segmentation, the rest classification)."""


def load_dataset(cfg: DataConfig, strict: bool = True, use_exclude: bool = True, progress: bool = True,
                 task: str = "classification") -> Dataset:
    """Build the table for ``cfg``.

    Args:
        cfg: the data section of the config.
        strict: raise :class:`DatasetError` on missing files (images, or masks), an empty set or (classification) a
            single class; with False the missing images are only listed in :attr:`Dataset.missing` and rows whose
            mask is missing are kept (the checker uses that).
        use_exclude: drop the files listed in ``cfg.exclude_file``.
        progress: show a progress bar if the synthetic set has to be generated.
        task: ``train.task``. It decides how the csv kind is read (segmentation: ``data.mask_col`` instead of a
            label); the isic2018-seg kind (and the synthetic kind with ``data.synthetic_layout=isic2018-seg``) is
            a segmentation set whatever it says, and :attr:`Dataset.task` tells which one was loaded.

    Raises:
        DatasetError: besides the above, ``task="segmentation"`` with a dataset kind that has no masks.
    """
    kind = cfg.dataset
    if kind == "synthetic":
        root = ensure_synthetic(cfg, progress=progress)
        kind = cfg.synthetic_layout
    else:
        if not cfg.root:
            raise DatasetError(f"data.root: the {kind} dataset needs a data root (--data DIR)")
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"{root}: data root not found")
    root = root.resolve()
    exclude = None
    if use_exclude and cfg.exclude_file:
        from fastlesion.data.validate import read_exclude_file

        exclude = read_exclude_file(cfg.exclude_file, root)
    if task == "segmentation" and kind not in ("isic2018-seg", "csv"):
        raise DatasetError(f"train.task=segmentation: the {cfg.dataset} dataset ({kind}) has no masks; use "
                           "data.dataset=isic2018-seg, csv with data.mask_col, or synthetic with "
                           "data.synthetic_layout=isic2018-seg")
    if kind == "csv":
        ds = load_csv(root, cfg, strict=strict, exclude=exclude, task=task)
    else:
        ds = LOADERS[kind](root, cfg, strict=strict, exclude=exclude)
    if cfg.dataset == "synthetic":
        ds.kind = "synthetic"
    if cfg.class_map:
        apply_class_map(ds, cfg.class_map, strict=strict)
    if cfg.limit:
        ds.table = ds.table.iloc[: cfg.limit].reset_index(drop=True)
    return ds
