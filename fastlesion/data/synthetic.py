"""Synthetic dermoscopy-like datasets written in the exact on-disk layouts of ISIC 2020, HAM10000, ISIC 2019 and
ISIC 2018 Task 1 (segmentation: each image with the binary mask of its lesion's true outline).

They let anyone try the library without the 23 GB ISIC download, and are the built-in default dataset of the
quickstart. Every image is drawn with numpy + PIL: a skin-toned background (light to dark, per patient), dermoscopy
illumination (gradient, vignetting, sometimes the dark circular field of a contact dermatoscope), hairs, rare
ruler/bubble artifacts and a lesion whose class shows through the dermoscopy ABCD cues:

* Asymmetry: the outline comes from a radius function with random Fourier harmonics; malignant lesions get larger
  low-order harmonics, benign ones are nearly elliptical;
* Border: malignant borders are jagged (more high-order harmonics and pixel-level roughness) and sharp in places,
  benign borders are smooth and fade out;
* Colour: malignant lesions mix several colours (dark brown, black, blue-grey veil, red, white regression) and an
  irregular network with black dots at the periphery, benign ones one or two browns and a regular network;
* Diameter: malignant lesions are larger on average.

Each cue is drawn from its own class-dependent distribution around a latent "malignancy look" score, the
distributions overlap, and about 10% of the images are atypical (their score is drawn from the other class), so
the task is learnable but not trivial: a small CNN reaches a ROC-AUC around 0.8-0.9, not 1.0. HAM10000 classes also get
their own tendencies (vasc red/purple lobules, df a small brown lesion with a central white patch, bcc pink with
branching red vessels, akiec red and scaly, bkl waxy light-brown with milia-like dots).

Generation is deterministic for a seed (whatever the number of worker processes). The CSV is written last and a
marker ``.fastlesion_synth.json`` records the parameters, so a half-written tree is never taken as complete and a
second call with the same parameters returns at once. ``.fastlesion_synth.files`` lists every file it writes (made
before any of them): a regeneration deletes only those, and refuses, naming one, when the root holds any other file
where the generator writes (a user's own image is never deleted). Concurrent callers wait on one lock file.

Example:
    >>> root = generate("isic2020", "/tmp/synth", n=200, size=160, workers=2)
    >>> sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    ['test', 'test.csv', 'train', 'train.csv']
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastlesion.errors import DatasetError

LAYOUTS = ("isic2020", "ham10000")
"""The classification layouts of the built-in ``synthetic`` dataset kind (``data.synthetic_layout``); its
segmentation layout is :data:`SEG_LAYOUT`."""
SEG_LAYOUT = "isic2018-seg"
"""The segmentation layout (ISIC 2018 Task 1: images and their binary lesion masks), also a built-in synthetic
layout (``train.task=segmentation``)."""
ALL_LAYOUTS = LAYOUTS + ("isic2020-challenge", "isic2019", SEG_LAYOUT)
"""Layouts :func:`generate` (and ``fastlesion synth --layout``) can write."""

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
"""HAM10000 diagnoses in their fixed, documented (alphabetical) order."""

HAM_PRIORS = {"akiec": 0.033, "bcc": 0.051, "bkl": 0.110, "df": 0.011, "mel": 0.111, "nv": 0.670, "vasc": 0.014}
"""Class frequencies of the real HAM10000 (10015 images)."""

ISIC_TRAIN_COLUMNS = (
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
    "benign_malignant", "target",
)  # fmt: skip
ISIC_TEST_COLUMNS = ISIC_TRAIN_COLUMNS[:5]
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
CHALLENGE_TRAIN_CSV = "ISIC_2020_Training_GroundTruth_v2.csv"
CHALLENGE_TEST_CSV = "ISIC_2020_Test_Metadata.csv"
CHALLENGE_TRAIN_DIR = "ISIC_2020_Training_JPEG"
CHALLENGE_TEST_DIR = "ISIC_2020_Test_Input"
CHALLENGE_TRAIN_COLUMNS = ISIC_TRAIN_COLUMNS[:2] + ("lesion_id",) + ISIC_TRAIN_COLUMNS[2:]
CHALLENGE_TEST_COLUMNS = ("image", "patient", "sex", "age_approx", "anatom_site")
ISIC2019_TRUTH_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_META_CSV = "ISIC_2019_Training_Metadata.csv"
ISIC2019_DIR = "ISIC_2019_Training_Input"
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC2019_META_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
SEG_INPUT_DIR = "ISIC2018_Task1-2_Training_Input"
SEG_TRUTH_DIR = "ISIC2018_Task1_Training_GroundTruth"
SEG_MASK_SUFFIX = "_segmentation.png"
_CSV_NAMES = ("train.csv", "test.csv", "HAM10000_metadata.csv", CHALLENGE_TRAIN_CSV, CHALLENGE_TEST_CSV,
              ISIC2019_TRUTH_CSV, ISIC2019_META_CSV)

MARKER = ".fastlesion_synth.json"
"""File in the dataset root recording the generation parameters (written after the CSV files)."""
LOCK = ".fastlesion_synth.lock"
FILES = ".fastlesion_synth.files"
"""The files the generator writes into the root, one a line (written before any of them)."""

_VERSION = 1  # bump when the generated content changes, so cached datasets are regenerated
_ATYPICAL = 0.10  # fraction of images whose cues are drawn from the other class
_MIX_SIZES = (512, 576, 600, 640, 704, 768)
_MIX_ASPECTS = (0.75, 0.75, 0.75, 2 / 3)
_LARGE_SIZES = ((6000, 4000), (5184, 3456), (4288, 2848), (3264, 2448), (3024, 2016), (2592, 1944), (2048, 1536))
_RENDER_MAX = 1024  # large images are drawn at most this wide, then upscaled and given fine grain

_ISIC_SITES = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital")
_ISIC_SITE_P = (0.51, 0.26, 0.15, 0.056, 0.015, 0.009)
_ISIC_BENIGN_DX = (
    ("unknown", 0.80), ("nevus", 0.16), ("seborrheic keratosis", 0.013), ("lentigo NOS", 0.013),
    ("lichenoid keratosis", 0.008), ("solar lentigo", 0.004), ("atypical melanocytic proliferation", 0.001),
    ("cafe-au-lait macule", 0.001),
)  # fmt: skip
_HAM_LOCALIZATIONS = {
    "nv": ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "chest", "foot", "face", "unknown"),
    "mel": ("back", "upper extremity", "lower extremity", "face", "chest", "trunk", "abdomen", "neck", "scalp"),
    "bkl": ("face", "back", "lower extremity", "trunk", "upper extremity", "chest", "abdomen", "scalp", "neck"),
    "bcc": ("face", "back", "chest", "upper extremity", "lower extremity", "neck", "scalp", "ear", "abdomen"),
    "akiec": ("face", "upper extremity", "hand", "scalp", "ear", "neck", "lower extremity", "back", "chest"),
    "vasc": ("lower extremity", "trunk", "abdomen", "back", "face", "upper extremity", "genital", "acral"),
    "df": ("lower extremity", "upper extremity", "trunk", "back", "acral"),
}
_HAM_DX_TYPE = {
    "nv": (("follow_up", 0.55), ("histo", 0.30), ("consensus", 0.10), ("confocal", 0.05)),
    "mel": (("histo", 0.98), ("consensus", 0.02)),
    "bkl": (("histo", 0.50), ("consensus", 0.30), ("confocal", 0.20)),
    "bcc": (("histo", 1.0),),
    "akiec": (("histo", 1.0),),
    "vasc": (("histo", 0.50), ("consensus", 0.50)),
    "df": (("histo", 0.50), ("consensus", 0.50)),
}
_HAM_AGE = {"nv": (42, 15), "mel": (61, 15), "bkl": (61, 13), "bcc": (66, 12), "akiec": (68, 11), "vasc": (50, 20),
            "df": (50, 14)}  # fmt: skip
_CONFUSABLE = {"nv": "mel", "mel": "nv", "bkl": "mel", "bcc": "akiec", "akiec": "bcc", "vasc": "bcc", "df": "nv"}

# Colours (linear-ish RGB in 0..1) of dermoscopic structures.
_LIGHT_BROWN = (0.66, 0.47, 0.33)
_MID_BROWN = (0.50, 0.32, 0.21)
_DARK_BROWN = (0.32, 0.19, 0.12)
_BLACK = (0.11, 0.08, 0.08)
_BLUE_GREY = (0.40, 0.44, 0.53)
_RED = (0.74, 0.30, 0.30)
_WHITE = (0.92, 0.88, 0.86)
_TAN = (0.78, 0.62, 0.47)
_PINK = (0.93, 0.64, 0.62)
_VASC_RED = (0.68, 0.10, 0.16)
_PURPLE = (0.42, 0.16, 0.34)
_SKIN_STOPS = ((0.0, (0.97, 0.83, 0.76)), (0.35, (0.89, 0.69, 0.58)), (0.65, (0.70, 0.48, 0.35)),
               (1.0, (0.38, 0.25, 0.18)))  # fmt: skip


@dataclass(frozen=True)
class _Spec:
    """Everything needed to draw and write one image (picklable, so worker processes can render it)."""

    path: str  # relative to the dataset root
    width: int
    height: int
    style: str  # renderer: nv | mel | bkl | bcc | akiec | vasc | df
    malig: float  # latent "malignancy look" score in [0, 1] driving the ABCD cues
    skin: float  # skin tone 0 (very light) .. 1 (dark)
    hair: float  # hair density 0 .. 1
    tint: float  # patient-level shift of the nevus browns (-1 .. 1)
    lesion_seed: int  # shape and colours of the lesion (shared by the images of one HAM lesion)
    image_seed: int  # acquisition: position, zoom, rotation, illumination, hairs, noise
    quality: int  # JPEG quality
    mask_path: str | None = None  # segmentation layout: where the lesion's binary mask PNG goes (relative)


# ----------------------------------------------------------------------------------------------------------------------
# public API


def generate(
    layout: str,
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    large: bool = False,
    positive_rate: float | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset of `n` images in `layout` under `out`; return `out` as a Path (deterministic).

    Layouts (identical to the real datasets, so the catalog reads them like the real thing):

    * ``isic2020``: ``train.csv`` (``image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,
      benign_malignant,target``) with images ``train/<image_name>.jpg``; plus ``test.csv`` (the first five columns)
      with about ``n / 10`` extra images (at least 4) in ``test/``, whose labels are written nowhere. Patients
      (``IP_1234567``) have 1-8 images, and a patient-level tendency (age, risk, skin, hair, nevus colour).
    * ``ham10000``: ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,dx_type,age,sex,localization``) with images
      split half/half over ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``. Lesions (``HAM_0001234``)
      have 1-3 images with the same diagnosis.
    * ``isic2020-challenge``: the same set as ISIC 2020 in the layout of the ISIC challenge download:
      ``ISIC_2020_Training_GroundTruth_v2.csv`` (the ``isic2020`` columns plus ``lesion_id`` after ``patient_id``)
      with images ``ISIC_2020_Training_JPEG/<image_name>.jpg``, and ``ISIC_2020_Test_Metadata.csv``
      (``image,patient,sex,age_approx,anatom_site``) with images in ``ISIC_2020_Test_Input/``.
    * ``isic2019``: ``ISIC_2019_Training_GroundTruth.csv`` (``image`` and the one-hot columns
      ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``; UNK all zero, SCC taken from about half the HAM-like ``akiec`` lesions)
      and ``ISIC_2019_Training_Metadata.csv`` (``image,age_approx,anatom_site_general,lesion_id,sex``), images in
      ``ISIC_2019_Training_Input/``; drawn like ``ham10000`` (``positive_rate`` = fraction of MEL).
    * ``isic2018-seg``: ISIC 2018 Task 1 (lesion segmentation): images ``ISIC2018_Task1-2_Training_Input/
      ISIC_<7 digits>.jpg`` and their masks ``ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png``
      (8-bit greyscale, 0 = background, 255 = lesion, the image's size), no CSV. The mask is the true outline of the
      drawn lesion (where its opacity reaches half its maximum; hairs, rulers and bubbles are not in it). One image
      per lesion, lesion styles in HAM10000 proportions (``positive_rate`` = fraction of melanoma-like lesions).

    Args:
        layout: ``"isic2020"``, ``"ham10000"``, ``"isic2020-challenge"``, ``"isic2019"`` or ``"isic2018-seg"``.
        out: dataset root (created). If it already holds a complete dataset generated with the same parameters,
            nothing is written.
        n: number of (training) images.
        seed: generator seed; the same parameters give byte-identical files.
        size: image width in px (height = 0.75 x width), or ``(width, height)``; None = a mix of sizes with widths
            of 512-768 px and aspect 4:3 or 3:2.
        large: with ``size=None``, widths of 2000-6000 px like the ISIC originals (JPEG quality 90); ignored when
            `size` is given. Large images are drawn at 1024 px wide, upscaled and given a fine grain.
        positive_rate: isic2020: fraction of malignant training images (default 0.05; at least 2 positives, spread
            over distinct patients). ham10000: fraction of ``mel`` images (default: the real 11.1%; the other classes
            keep their real proportions). For ``n >= 7`` every HAM class gets at least one lesion, and for
            ``n >= 100`` at least ``min(10, n // 20)`` lesions, so grouped 5-fold splits can put each class in
            every fold.
        workers: processes rendering images (1 = in this process).
        progress: show a rich progress bar.

    Returns:
        ``Path(out)``.

    Raises:
        DatasetError: on an unknown layout, bad parameters, or an ``out`` holding files not written by this
            generator where it writes (a CSV of its names, anything in its image folders): they are never
            overwritten or deleted.
    """
    if layout not in ALL_LAYOUTS:
        raise DatasetError(f"synthetic layout {layout!r} unknown; choose one of {ALL_LAYOUTS}")
    if n < 1:
        raise DatasetError(f"synthetic n must be >= 1, got {n}")
    if positive_rate is not None and not 0.0 < positive_rate < 1.0:
        raise DatasetError(f"synthetic positive_rate must be in (0, 1), got {positive_rate}")
    wh = _norm_size(size)
    root = Path(out)
    params = {
        "layout": layout, "n": int(n), "seed": int(seed), "size": None if wh is None else list(wh),
        "large": bool(large) and wh is None, "positive_rate": None if positive_rate is None else float(positive_rate),
    }  # fmt: skip
    marker = {"generator": "fastlesion.data.synthetic", "version": _VERSION, "params": params}
    if _is_complete(root, marker):
        return root
    with _locked(root):  # concurrent callers (e.g. DDP ranks) wait here, then find the dataset complete
        if _is_complete(root, marker):
            return root
        tables, specs = _plan(params)
        _prepare(root, layout)
        # the names it is about to write, then the claim: an interrupted run is cleaned up (only these) later
        _write_list(root, sorted(tables) + _spec_files(specs))
        _write_marker(root, {**marker, "complete": False})

        for d in sorted({str(Path(f).parent) for f in _spec_files(specs)}):
            (root / d).mkdir(parents=True, exist_ok=True)
        _write_images(root, specs, workers, progress, f"synthetic {layout}")
        for name in sorted(tables, key=lambda t: t == _main_csv(layout)):  # the main CSV last
            columns, rows = tables[name]
            _write_csv(root / name, columns, rows)
        _write_marker(root, {**marker, "complete": True, "files": len(_spec_files(specs))})
    return root


# ----------------------------------------------------------------------------------------------------------------------
# bookkeeping: completeness, clean-up, writing


def _main_csv(layout: str) -> str | None:
    """The CSV written last (None: the segmentation layout has no CSV)."""
    return {"isic2020": "train.csv", "isic2020-challenge": CHALLENGE_TRAIN_CSV, "isic2019": ISIC2019_TRUTH_CSV,
            SEG_LAYOUT: None}.get(layout, "HAM10000_metadata.csv")


def _image_dirs(layout: str) -> tuple[str, ...]:
    """The folders the generator writes images (and masks) into."""
    return {"isic2020": ("train", "test"), "isic2020-challenge": (CHALLENGE_TRAIN_DIR, CHALLENGE_TEST_DIR),
            "isic2019": (ISIC2019_DIR,), SEG_LAYOUT: (SEG_INPUT_DIR, SEG_TRUTH_DIR)}.get(
        layout, ("HAM10000_images_part_1", "HAM10000_images_part_2"))


def _spec_files(specs: Sequence[_Spec]) -> list[str]:
    """Every file the specs write: each image, then each mask."""
    return [s.path for s in specs] + [s.mask_path for s in specs if s.mask_path]


def _norm_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``(width, height)`` from an int width (height = 0.75 x width) or a pair; None stays None."""
    if size is None:
        return None
    if isinstance(size, (str, bytes)):
        raise DatasetError(f"synthetic size must be an int or (width, height), got {size!r}")
    if isinstance(size, Sequence):
        if len(size) != 2:
            raise DatasetError(f"synthetic size must be an int or (width, height), got {size!r}")
        wh = (int(size[0]), int(size[1]))
    else:
        wh = (int(size), max(1, round(int(size) * 0.75)))
    if min(wh) < 16:
        raise DatasetError(f"synthetic images must be at least 16 x 16 px, got {wh[0]} x {wh[1]}")
    return wh


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.fastlesion_synth.lock`` (no locking where fcntl is missing)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_marker(root: Path, marker: dict) -> None:
    tmp = root / f"{MARKER}.{os.getpid()}.tmp"  # this process's own, even where no lock is held (no fcntl)
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MARKER)


def _is_complete(root: Path, marker: dict) -> bool:
    """Whether `root` holds a complete dataset generated with the parameters in `marker`."""
    try:
        old = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or not old.get("complete") or {k: old.get(k) for k in marker} != marker:
        return False
    layout = marker["params"]["layout"]
    main_csv = _main_csv(layout)
    if main_csv is not None and not (root / main_csv).is_file():
        return False
    count = 0
    for d in _image_dirs(layout):
        if (root / d).is_dir():
            count += sum(1 for e in os.scandir(root / d) if e.name.endswith((".jpg", SEG_MASK_SUFFIX)))
    return count == old.get("files")


def _plan(params: dict) -> tuple[dict[str, tuple[Sequence[str], list[dict]]], list[_Spec]]:
    """The tables and image specs of a dataset (a pure function of the marker's ``params``)."""
    layout, n, rate = params["layout"], int(params["n"]), params["positive_rate"]
    rng = np.random.default_rng([int(params["seed"]), _VERSION, _seed_index(layout)])
    sizer = _Sizer(None if params["size"] is None else (int(params["size"][0]), int(params["size"][1])),
                   bool(params["large"]))
    if layout == "isic2020":
        return _plan_isic(rng, n, 0.05 if rate is None else float(rate), sizer)
    if layout == "isic2020-challenge":
        return _as_challenge(*_plan_isic(rng, n, 0.05 if rate is None else float(rate), sizer))
    if layout == "isic2019":
        return _as_isic2019(*_plan_ham(rng, n, rate, sizer))
    if layout == SEG_LAYOUT:
        return _plan_seg(rng, n, rate, sizer)
    return _plan_ham(rng, n, rate, sizer)


_ISIC2019_OF_HAM = {"akiec": "AK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC"}
_SITE_OF_HAM = {"back": "posterior torso", "trunk": "anterior torso", "abdomen": "anterior torso",
                "chest": "anterior torso", "lower extremity": "lower extremity", "upper extremity": "upper extremity",
                "face": "head/neck", "scalp": "head/neck", "neck": "head/neck", "ear": "head/neck",
                "hand": "upper extremity", "foot": "lower extremity", "acral": "palms/soles",
                "genital": "oral/genital"}


def _as_isic2019(
    tables: dict[str, tuple[Sequence[str], list[dict]]], specs: list[_Spec]
) -> tuple[dict[str, tuple[Sequence[str], list[dict]]], list[_Spec]]:
    """A HAM-like plan written as ISIC 2019: one-hot ground truth + metadata, images in one folder."""
    specs = [dataclasses.replace(s, path=f"{ISIC2019_DIR}/{s.path.split('/', 1)[1]}") for s in specs]
    truth, meta = [], []
    akiec = sorted({r["lesion_id"] for r in tables["HAM10000_metadata.csv"][1] if r["dx"] == "akiec"})
    scc = set(akiec[1::2])  # every other akiec lesion (in id order) becomes SCC, so both classes have images
    for r in sorted(tables["HAM10000_metadata.csv"][1], key=lambda r: r["image_id"]):
        cls = "SCC" if r["lesion_id"] in scc else _ISIC2019_OF_HAM[r["dx"]]
        truth.append({"image": r["image_id"], **{c: f"{float(c == cls):.1f}" for c in ISIC2019_CLASSES}})
        meta.append({"image": r["image_id"], "age_approx": r["age"],
                     "anatom_site_general": _SITE_OF_HAM.get(r["localization"], ""),
                     "lesion_id": r["lesion_id"], "sex": r["sex"] if r["sex"] != "unknown" else ""})
    return {ISIC2019_TRUTH_CSV: (("image",) + ISIC2019_CLASSES, truth),
            ISIC2019_META_CSV: (ISIC2019_META_COLUMNS, meta)}, specs


def _as_challenge(
    tables: dict[str, tuple[Sequence[str], list[dict]]], specs: list[_Spec]
) -> tuple[dict[str, tuple[Sequence[str], list[dict]]], list[_Spec]]:
    """An ISIC 2020 plan moved into the ISIC challenge download's file names (and its v2 ``lesion_id`` column)."""
    dirs = {"train": CHALLENGE_TRAIN_DIR, "test": CHALLENGE_TEST_DIR}
    specs = [dataclasses.replace(s, path=f"{dirs[s.path.split('/', 1)[0]]}/{s.path.split('/', 1)[1]}")
             for s in specs]
    train = [{**r, "lesion_id": f"IL_{7_000_000 + i:07d}"} for i, r in enumerate(tables["train.csv"][1])]
    test = [{"image": r["image_name"], "patient": r["patient_id"], "sex": r["sex"], "age_approx": r["age_approx"],
             "anatom_site": r["anatom_site_general_challenge"]} for r in tables["test.csv"][1]]
    return {CHALLENGE_TRAIN_CSV: (CHALLENGE_TRAIN_COLUMNS, train),
            CHALLENGE_TEST_CSV: (CHALLENGE_TEST_COLUMNS, test)}, specs


def _seed_index(layout: str) -> int:
    """The layout's part of the seed: the challenge layout draws the very set of ``isic2020`` (same seed, same n)."""
    return ALL_LAYOUTS.index("isic2020" if layout == "isic2020-challenge" else layout)


def _write_list(root: Path, names: list[str]) -> None:
    """``.fastlesion_synth.files``: every file the generator writes into `root` (what a regeneration may delete)."""
    tmp = root / f"{FILES}.{os.getpid()}.tmp"
    tmp.write_text("".join(f"{name}\n" for name in names))
    os.replace(tmp, root / FILES)


def _written(root: Path) -> set[str]:
    """The files a previous generation wrote into `root` (its list; for a set made before the list was kept, its
    plan again from the marker's parameters); only the fixed CSV names when neither can be read."""
    names = set(_CSV_NAMES)
    try:
        return names | set((root / FILES).read_text().splitlines())
    except OSError:
        pass
    try:
        old = json.loads((root / MARKER).read_text())
        if old.get("version") == _VERSION:
            tables, specs = _plan(old["params"])
            names |= set(tables) | set(_spec_files(specs))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DatasetError):
        pass
    return names


def _prepare(root: Path, layout: str) -> None:
    """Make `root` ready for a fresh dataset: remove the files a previous synthetic set wrote, and refuse (naming
    one) when the root holds any other file where the generator writes (the user's own are never deleted)."""
    ours = _written(root) if (root / MARKER).exists() else set()
    candidates = [root / name for name in _CSV_NAMES]
    for lay in ALL_LAYOUTS:
        for d in _image_dirs(lay):
            if (root / d).is_dir():
                candidates += sorted(p for p in (root / d).rglob("*") if not p.is_dir())
    present = [p for p in candidates if p.is_file() or p.is_symlink()]
    foreign = [p for p in present if p.relative_to(root).as_posix() not in ours]
    if foreign:
        what = "was not written by the synthetic generator" + (
            f" (nor {len(foreign) - 1} other file(s))" if len(foreign) > 1 else "")
        raise DatasetError(f"{foreign[0]} {what}; refusing to overwrite or delete it: move it out, or choose another "
                           "folder")
    for p in present:
        p.unlink()
    for lay in ALL_LAYOUTS:  # the image folders, when that left them empty
        for d in _image_dirs(lay):
            with contextlib.suppress(OSError):
                (root / d).rmdir()
    root.mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    """Write `rows` with exactly `columns` (atomically: a temporary file renamed into place)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] for c in columns])
    os.replace(tmp, path)


def _write_one(root: str, spec: _Spec) -> None:
    """Render `spec` and write it as a baseline JPEG (and its mask as a PNG) under `root` (runs in worker
    processes)."""
    data, mask = _encode(spec)
    with open(os.path.join(root, spec.path), "wb") as f:
        f.write(data)
    if spec.mask_path is not None:
        with open(os.path.join(root, spec.mask_path), "wb") as f:
            f.write(mask)


def _write_images(root: Path, specs: list[_Spec], workers: int, progress: bool, title: str) -> None:
    """Render and write all images, with `workers` processes and an optional rich progress bar."""

    def run() -> Iterator[None]:
        if workers > 1 and len(specs) > 1:
            chunk = max(1, min(32, len(specs) // (workers * 8)))
            with ProcessPoolExecutor(max_workers=workers) as ex:
                yield from ex.map(_write_one, [str(root)] * len(specs), specs, chunksize=chunk)
        else:
            for s in specs:
                yield _write_one(str(root), s)

    if not progress:
        for _ in run():
            pass
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(title, total=len(specs))
        for _ in run():
            bar.advance(task)


# ----------------------------------------------------------------------------------------------------------------------
# planning: metadata tables and one spec per image


class _Sizer:
    """Draws image sizes: fixed, a mix around 600 px, or large originals."""

    def __init__(self, size: tuple[int, int] | None, large: bool) -> None:
        self.size = size
        self.large = large

    def __call__(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """Return ``(width, height, jpeg_quality)``."""
        if self.large:
            w, h = _LARGE_SIZES[int(rng.integers(len(_LARGE_SIZES)))]
            return w, h, 90
        q = int(rng.integers(85, 96))
        if self.size is not None:
            return self.size[0], self.size[1], q
        w = int(_MIX_SIZES[int(rng.integers(len(_MIX_SIZES)))])
        return w, round(w * _MIX_ASPECTS[int(rng.integers(len(_MIX_ASPECTS)))]), q


def _unique_ids(rng: np.random.Generator, k: int, lo: int, span: int) -> list[int]:
    """`k` distinct random integers in ``[lo, lo + span)`` (span grown when too small)."""
    span = max(span, 2 * k)
    return [lo + int(x) for x in rng.choice(span, size=k, replace=False)]


def _pick(rng: np.random.Generator, pairs: Sequence[tuple[str, float]]) -> str:
    p = np.array([w for _, w in pairs], dtype=float)
    return pairs[int(rng.choice(len(pairs), p=p / p.sum()))][0]


def _malig_score(rng: np.random.Generator, malignant: bool) -> float:
    """Latent "malignancy look": Beta(6, 2.5) for malignant, Beta(2, 6) for benign, swapped for atypical images."""
    if rng.random() < _ATYPICAL:
        malignant = not malignant
    return float(rng.beta(6.0, 2.5) if malignant else rng.beta(2.0, 6.0))


def _age5(x: float, hi: int = 90) -> float:
    return float(min(hi, max(0, 5 * round(x / 5))))


def _plan_isic(
    rng: np.random.Generator, n: int, rate: float, sizer: _Sizer
) -> tuple[dict[str, tuple[Sequence[str], list[dict]]], list[_Spec]]:
    """Patients, images, labels and metadata of an ISIC 2020 style dataset (train + unlabeled test)."""
    n_test = max(4, round(0.1 * n))
    names = iter(_unique_ids(rng, n + n_test, 15_000, 9_985_000))
    pids = iter(_unique_ids(rng, 2 * (n + n_test), 1_000, 9_999_000))
    sizes_p = np.array([0.18, 0.17, 0.15, 0.14, 0.12, 0.10, 0.08, 0.06])

    def patients(total: int) -> list[dict]:
        out, left = [], total
        while left > 0:
            k = min(left, 1 + int(rng.choice(8, p=sizes_p)))
            age = float(np.clip(rng.normal(50, 15), 10, 90))
            out.append({
                "patient_id": f"IP_{next(pids):07d}", "sex": "male" if rng.random() < 0.52 else "female",
                "age": age, "risk": math.exp(0.03 * (age - 50)) * float(rng.lognormal(0.0, 0.5)),
                "skin": float(rng.beta(1.6, 3.5)), "hair": float(rng.beta(1.2, 2.5)) * rng.choice([0.6, 1.4]),
                "tint": float(rng.uniform(-1, 1)), "dysplastic": rng.random() < 0.1, "k": k,
            })  # fmt: skip
            left -= k
        return out

    def split_rows(pats: list[dict], n_pos: int) -> list[tuple[dict, bool]]:
        """One (patient, positive) pair per image; positives spread over distinct patients, weighted by risk."""
        order = np.argsort(-(np.log([p["risk"] for p in pats]) + rng.gumbel(size=len(pats))))
        pos = [0] * len(pats)
        left = n_pos
        while left > 0:
            for i in order:
                if left and pos[i] < pats[i]["k"]:
                    pos[i] += 1
                    left -= 1
        rows = []
        for i, p in enumerate(pats):
            labels = [True] * pos[i] + [False] * (p["k"] - pos[i])
            rng.shuffle(labels)
            rows.extend((p, lab) for lab in labels)
        return rows

    n_pos = min(max(2, round(rate * n)), max(1, n - 2))
    train = split_rows(patients(n), n_pos)
    test_pats = patients(n_test)
    test = split_rows(test_pats, int(rng.binomial(n_test, rate)))

    tables: dict[str, tuple[Sequence[str], list[dict]]] = {}
    specs: list[_Spec] = []
    for split, items in (("train", train), ("test", test)):
        rows = []
        for p, positive in items:
            name = f"ISIC_{next(names):07d}"
            age = p["age"] + (5 if rng.random() < 0.1 else 0)
            if positive:
                diagnosis, style = "melanoma", "mel"
            else:
                diagnosis = _pick(rng, _ISIC_BENIGN_DX)
                style = "bkl" if "keratosis" in diagnosis else "nv"
            malig = _malig_score(rng, positive)
            if not positive and p["dysplastic"]:
                malig = min(1.0, malig + 0.12)
            w, h, q = sizer(rng)
            specs.append(_Spec(
                f"{split}/{name}.jpg", w, h, style, malig, p["skin"], min(1.0, p["hair"]), p["tint"],
                int(rng.integers(2**62)), int(rng.integers(2**62)), q,
            ))  # fmt: skip
            rows.append({
                "image_name": name, "patient_id": p["patient_id"], "sex": p["sex"], "age_approx": _age5(age),
                "anatom_site_general_challenge": _ISIC_SITES[int(rng.choice(6, p=_ISIC_SITE_P))],
                "diagnosis": diagnosis, "benign_malignant": "malignant" if positive else "benign",
                "target": int(positive),
            })  # fmt: skip
        rows.sort(key=lambda r: r["image_name"])
        tables[f"{split}.csv"] = (ISIC_TRAIN_COLUMNS if split == "train" else ISIC_TEST_COLUMNS, rows)
    return tables, specs


def _ham_counts(n: int, mel_rate: float | None) -> dict[str, int]:
    """Images per class: real proportions (largest remainder), minimum lesions per class, nv absorbing the rest."""
    priors = dict(HAM_PRIORS)
    if mel_rate is not None:
        rest = 1.0 - priors["mel"]
        priors = {c: (mel_rate if c == "mel" else p * (1.0 - mel_rate) / rest) for c, p in priors.items()}
    raw = {c: priors[c] * n for c in HAM_CLASSES}
    counts = {c: int(raw[c]) for c in HAM_CLASSES}
    for c in sorted(HAM_CLASSES, key=lambda c: counts[c] - raw[c])[: n - sum(counts.values())]:
        counts[c] += 1
    floor = _ham_min_lesions(n)
    for c in HAM_CLASSES:
        counts[c] = max(counts[c], floor)
    excess = sum(counts.values()) - n
    for c in sorted(HAM_CLASSES, key=lambda c: -counts[c]):  # nv first, then mel/bkl ...
        take = min(excess, counts[c] - floor)
        counts[c] -= take
        excess -= take
    return counts


def _ham_min_lesions(n: int) -> int:
    return 0 if n < 7 else (1 if n < 100 else min(10, n // 20))


def _plan_ham(
    rng: np.random.Generator, n: int, mel_rate: float | None, sizer: _Sizer
) -> tuple[dict[str, tuple[Sequence[str], list[dict]]], list[_Spec]]:
    """Lesions, images and metadata of a HAM10000 style dataset."""
    counts = _ham_counts(n, mel_rate)
    floor = _ham_min_lesions(n)
    lesions: list[tuple[str, int]] = []  # (dx, number of images)
    for c in HAM_CLASSES:
        left, made = counts[c], 0
        while left > 0:
            k = 1 + int(rng.choice(3, p=[0.72, 0.2, 0.08]))
            k = min(k, left - max(0, floor - made - 1))
            lesions.append((c, max(1, k)))
            left -= max(1, k)
            made += 1
    order = rng.permutation(len(lesions))
    lesion_ids = _unique_ids(rng, len(lesions), 0, 7_470)
    image_ids = sorted(_unique_ids(rng, n, 24_306, 10_015))
    image_ids = [image_ids[i] for i in rng.permutation(n)]
    part_cut = sorted(image_ids)[(n + 1) // 2 - 1] if n > 1 else image_ids[0]  # part 1 = lower half of the ids

    rows, specs, it = [], [], iter(image_ids)
    for li in order:
        dx, k = lesions[li]
        lesion_id = f"HAM_{lesion_ids[li]:07d}"
        mu, sd = _HAM_AGE[dx]
        r = rng.random()
        sex = "unknown" if r < 0.006 else ("male" if r < 0.546 else "female")
        age = _age5(rng.normal(mu, sd), 85)
        loc = _pick(rng, [(x, 1.0 / (i + 1)) for i, x in enumerate(_HAM_LOCALIZATIONS[dx])])
        dx_type = _pick(rng, _HAM_DX_TYPE[dx])
        if dx in ("nv", "mel"):  # one renderer; the latent score (atypical 10%) makes the difference
            style, malig = dx, _malig_score(rng, dx == "mel")
        else:  # atypical 10%: drawn in the style of a confusable class
            style = _CONFUSABLE[dx] if rng.random() < _ATYPICAL else dx
            a, b = {"mel": (6.0, 2.5), "nv": (2.0, 6.0)}.get(style, (3.0, 4.0))
            malig = float(rng.beta(a, b))
        skin, hair, tint = float(rng.beta(1.4, 5.0)), float(rng.beta(1.2, 3.0)), float(rng.uniform(-1, 1))
        lesion_seed = int(rng.integers(2**62))
        for _ in range(k):
            image_id = next(it)
            part = 1 if image_id <= part_cut else 2
            name = f"ISIC_{image_id:07d}"
            w, h, q = sizer(rng)
            specs.append(_Spec(f"HAM10000_images_part_{part}/{name}.jpg", w, h, style, malig, skin, hair, tint,
                               lesion_seed, int(rng.integers(2**62)), q))
            rows.append({"lesion_id": lesion_id, "image_id": name, "dx": dx, "dx_type": dx_type, "age": age,
                         "sex": sex, "localization": loc})
    rows.sort(key=lambda r: (r["lesion_id"], r["image_id"]))
    return {"HAM10000_metadata.csv": (HAM_COLUMNS, rows)}, specs


def _plan_seg(
    rng: np.random.Generator, n: int, mel_rate: float | None, sizer: _Sizer
) -> tuple[dict[str, tuple[Sequence[str], list[dict]]], list[_Spec]]:
    """Images and masks of an ISIC 2018 Task 1 style set: one image per lesion (the set has no lesion or patient
    ids, so no two images may show the same lesion), lesion styles in HAM10000 proportions."""
    counts = _ham_counts(n, mel_rate)
    styles = [c for c in HAM_CLASSES for _ in range(counts[c])]
    styles = [styles[i] for i in rng.permutation(n)]
    specs = []
    for image_id, dx in zip(sorted(_unique_ids(rng, n, 0, 16_072)), styles, strict=True):
        if dx in ("nv", "mel"):
            style, malig = dx, _malig_score(rng, dx == "mel")
        else:
            style = _CONFUSABLE[dx] if rng.random() < _ATYPICAL else dx
            a, b = {"mel": (6.0, 2.5), "nv": (2.0, 6.0)}.get(style, (3.0, 4.0))
            malig = float(rng.beta(a, b))
        skin, hair, tint = float(rng.beta(1.4, 5.0)), float(rng.beta(1.2, 3.0)), float(rng.uniform(-1, 1))
        w, h, q = sizer(rng)
        name = f"ISIC_{image_id:07d}"
        specs.append(_Spec(f"{SEG_INPUT_DIR}/{name}.jpg", w, h, style, malig, skin, hair, tint,
                           int(rng.integers(2**62)), int(rng.integers(2**62)), q,
                           mask_path=f"{SEG_TRUTH_DIR}/{name}{SEG_MASK_SUFFIX}"))
    return {}, specs


# ----------------------------------------------------------------------------------------------------------------------
# rendering


def _encode(spec: _Spec) -> tuple[bytes, bytes | None]:
    """Render `spec` to baseline RGB JPEG bytes (large images drawn small, upscaled, then given fine grain), and,
    when `spec` has a ``mask_path``, the lesion's mask as 8-bit greyscale PNG bytes (0 / 255, the image's size)."""
    rw = min(spec.width, _RENDER_MAX)
    rh = max(1, round(spec.height * rw / spec.width))
    arr, inside = _render(spec, rw, rh)
    mask = None
    if spec.mask_path is not None:
        field = Image.fromarray(np.ascontiguousarray(inside, np.float32), "F")
        if (rw, rh) != (spec.width, spec.height):  # the outline field upscaled smoothly, then thresholded
            field = field.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        png = io.BytesIO()
        Image.fromarray(np.where(np.asarray(field) > 0, 255, 0).astype(np.uint8), "L").save(png, "PNG")
        mask = png.getvalue()
    img = Image.fromarray(arr, "RGB")
    if (rw, rh) != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BICUBIC)
        grain_rng = np.random.default_rng([spec.image_seed, 1])
        tile = grain_rng.normal(0.0, 3.0, size=(256, 256, 1)).astype(np.int16)
        reps = (math.ceil(spec.height / 256), math.ceil(spec.width / 256), 1)
        big = np.asarray(img, dtype=np.int16) + np.tile(tile, reps)[: spec.height, : spec.width]
        img = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=spec.quality, optimize=False, progressive=False)
    return buf.getvalue(), mask


def _lerp(a: Sequence[float], b: Sequence[float], t: float) -> np.ndarray:
    return np.asarray(a, np.float32) * (1.0 - t) + np.asarray(b, np.float32) * t


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _skin_colour(t: float) -> np.ndarray:
    for (t0, c0), (t1, c1) in zip(_SKIN_STOPS, _SKIN_STOPS[1:], strict=False):
        if t <= t1:
            return _lerp(c0, c1, (t - t0) / (t1 - t0))
    return np.asarray(_SKIN_STOPS[-1][1], np.float32)


def _blend(img: np.ndarray, colour: np.ndarray | Sequence[float], alpha: np.ndarray) -> np.ndarray:
    a = np.asarray(alpha, np.float32)[..., None]
    out = np.asarray(colour, np.float32) - img
    out *= a
    out += img
    return out


class _Grid:
    """An ``h x w`` pixel grid with an affine map ``(u, v) = m @ (x, y, 1)`` to drawing coordinates."""

    def __init__(self, h: int, w: int, m: np.ndarray) -> None:
        self.h, self.w, self.m = h, w, np.asarray(m, np.float64)
        self.xs = np.arange(w, dtype=np.float32)
        self.ys = np.arange(h, dtype=np.float32)
        self.u = (m[0, 0] * self.xs[None, :] + m[0, 1] * self.ys[:, None] + m[0, 2]).astype(np.float32)
        self.v = (m[1, 0] * self.xs[None, :] + m[1, 1] * self.ys[:, None] + m[1, 2]).astype(np.float32)
        self.inv = np.linalg.inv(np.vstack([self.m, [0.0, 0.0, 1.0]]))[:2]
        self.px_per_unit = 1.0 / max(1e-9, math.sqrt(abs(np.linalg.det(self.m[:, :2]))))

    def to_px(self, u: float, v: float) -> tuple[float, float]:
        x, y = self.inv @ np.array([u, v, 1.0])
        return float(x), float(y)


class _Field:
    """A smooth random field: a sum of random plane waves (unit variance), evaluated on a :class:`_Grid`.

    Coordinates are affine in the pixels, so each wave is separable and the whole field is one small matrix
    product, ``(h x 2W) @ (2W x w)``: no per-pixel transcendental functions.
    """

    def __init__(self, rng: np.random.Generator, waves: int, f_lo: float, f_hi: float, slope: float = -0.5) -> None:
        ang = rng.uniform(0, 2 * np.pi, waves)
        freq = f_lo * (f_hi / f_lo) ** rng.random(waves)  # log-uniform frequencies
        amp = freq**slope
        self.kx, self.ky = freq * np.cos(ang), freq * np.sin(ang)
        self.phase = rng.uniform(0, 2 * np.pi, waves)
        self.amp = amp * math.sqrt(2.0) / np.sqrt(np.sum(amp**2))

    def __call__(self, g: _Grid) -> np.ndarray:
        m = g.m
        ax = (self.kx * m[0, 0] + self.ky * m[1, 0])[:, None] * g.xs[None, :]
        by = (self.kx * m[0, 1] + self.ky * m[1, 1])[:, None] * g.ys[None, :] + (
            self.kx * m[0, 2] + self.ky * m[1, 2] + self.phase
        )[:, None]
        left = np.concatenate([self.amp[:, None] * np.cos(by), -self.amp[:, None] * np.sin(by)]).T
        right = np.concatenate([np.cos(ax), np.sin(ax)])
        return (left.astype(np.float32) @ right.astype(np.float32)).astype(np.float32)


def _render(spec: _Spec, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one dermoscopy-like image of `w` x `h` pixels as uint8 RGB; with it, the lesion's outline field
    (float32 ``h x w``, > 0 inside the lesion: see :func:`_draw_lesion`)."""
    irng = np.random.default_rng([spec.image_seed, 0])  # acquisition
    lrng = np.random.default_rng([spec.lesion_seed, 2])  # lesion
    scale = float(min(w, h))
    bg = _Grid(h, w, np.array([[1 / scale, 0, -w / 2 / scale], [0, 1 / scale, -h / 2 / scale]]))  # unit: short side
    xs, ys = bg.u, bg.v

    # skin: tone, redness (polarised dermoscopy looks pinkish), mottling and fine texture
    skin = _skin_colour(float(np.clip(spec.skin + irng.normal(0, 0.03), 0, 1)))
    skin = skin * np.asarray([1.0, 1.0 - irng.uniform(0, 0.06), 1.0 - irng.uniform(0, 0.08)], np.float32)
    mott = _Field(irng, 8, 2.0, 9.0)(bg)
    tex = _Field(irng, 16, 25.0, 70.0)(bg)
    img = skin[None, None, :] * (1.0 + 0.035 * mott[..., None] + 0.02 * tex[..., None])
    red = _sigmoid((_Field(irng, 6, 3.0, 8.0)(bg) - 1.0) * 3.0) * irng.uniform(0.0, 0.25)
    img = _blend(img, skin * np.asarray([1.02, 0.82, 0.82], np.float32), red)

    # this image's view of the lesion: position, zoom, rotation, mirror (lesion unit = its mean radius)
    m = spec.malig
    diam = float(np.clip(lrng.normal(0.19 + 0.14 * m, 0.045), 0.07, 0.42))
    diam *= {"df": 0.65, "vasc": 0.8}.get(spec.style, 1.0)
    radius = diam * float(irng.uniform(0.9, 1.1)) * scale
    cx = w / 2 + irng.normal(0, 0.07) * scale
    cy = h / 2 + irng.normal(0, 0.07) * scale
    rot = irng.uniform(0, 2 * np.pi)
    mir = -1.0 if irng.random() < 0.5 else 1.0
    c, s = math.cos(rot) / radius, math.sin(rot) / radius
    lm = np.array([[mir * c, mir * s, -mir * (c * cx + s * cy)], [-s, c, s * cx - c * cy]])
    lesion = _Grid(h, w, lm)

    img, inside = _draw_lesion(img, spec, lrng, lesion)
    img = _draw_hairs(img, spec, irng, w, h, scale)
    img = _draw_artifacts(img, irng, w, h, scale)

    # illumination: gradient, vignetting, sometimes the dark round field of a contact dermatoscope
    ang = irng.uniform(0, 2 * np.pi)
    img = img * (1.0 + irng.uniform(0, 0.12) * (np.cos(ang) * xs + np.sin(ang) * ys))[..., None]
    r2 = xs**2 + ys**2
    img = img * (1.0 - irng.uniform(0.05, 0.3) * r2)[..., None]
    if irng.random() < 0.25:
        rad = irng.uniform(0.55, 0.8)
        field = _sigmoid((rad - np.sqrt(r2)) * scale / irng.uniform(2.0, 8.0))
        img = _blend(img, (0.03, 0.025, 0.025), 1.0 - field)
    img = img * np.asarray(irng.uniform(0.95, 1.05, 3), np.float32)  # white balance
    noise = irng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(irng.uniform(0.006, 0.02))
    return np.clip((img + noise) * 255.0 + 0.5, 0, 255).astype(np.uint8), inside


def _outline(lrng: np.random.Generator, g: _Grid, asym: float, border: float) -> np.ndarray:
    """Normalised distance to the lesion outline (< 1 inside) from a radius function with random harmonics."""
    n_tab = 2048
    t = np.linspace(-np.pi, np.pi, n_tab, endpoint=False)
    rfun = 1.0 + lrng.uniform(0.0, 0.2) * np.cos(2 * t + lrng.uniform(0, 2 * np.pi))  # elongation (symmetric)
    for k in (1, 2, 3, 4, 5):  # asymmetry: low harmonics
        rfun += asym * lrng.uniform(0.02, 0.15) / math.sqrt(k) * np.cos(k * t + lrng.uniform(0, 2 * np.pi))
    for k in range(6, 24):  # border irregularity: notches and bumps
        rfun += border * lrng.uniform(0.0, 0.04) * (6 / k) * np.cos(k * t + lrng.uniform(0, 2 * np.pi))
    theta = np.arctan2(g.v, g.u)
    idx = ((theta + np.pi) * (n_tab / (2 * np.pi))).astype(np.int32) % n_tab
    rho = np.sqrt(g.u**2 + g.v**2)
    rough = _Field(lrng, 14, 8.0, 25.0)(g)
    return rho / np.maximum(rfun, 0.3).astype(np.float32)[idx] + (0.01 + border * 0.05) * rough


def _dots(
    col: np.ndarray, g: _Grid, lrng: np.random.Generator, k: int, size: float, colour: Sequence[float],
    r_lo: float, r_hi: float, strength: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """Blend `k` soft round dots of radius ~`size` (lesion units) at `r_lo`..`r_hi` from the lesion centre."""
    if k <= 0:
        return col
    ang = lrng.uniform(0, 2 * np.pi, k)
    rad = lrng.uniform(r_lo, r_hi, k)
    sizes = size * lrng.uniform(0.6, 1.4, k)
    mask = np.zeros((g.h, g.w), np.float32)
    for a, r, sz in zip(ang, rad, sizes, strict=True):
        uc, vc = r * math.cos(a), r * math.sin(a)
        x, y = g.to_px(uc, vc)
        reach = 3.0 * sz * g.px_per_unit + 1
        x0, x1 = max(0, int(x - reach)), min(g.w, int(x + reach) + 1)
        y0, y1 = max(0, int(y - reach)), min(g.h, int(y + reach) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        d2 = (g.u[y0:y1, x0:x1] - uc) ** 2 + (g.v[y0:y1, x0:x1] - vc) ** 2
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], np.exp(-d2 / (2 * sz * sz)))
    return _blend(col, colour, np.clip(mask * 1.4, 0, 1) * strength)


def _network(lrng: np.random.Generator, g: _Grid, freq: float, width: float) -> np.ndarray:
    """A pigment-network-like mesh in 0..1: the zero set of isotropic band-limited noise."""
    band = _Field(lrng, 24, freq * 0.8, freq * 1.25, slope=0.0)(g)
    return np.exp(-((band / width) ** 2))


def _draw_lesion(
    img: np.ndarray, spec: _Spec, lrng: np.random.Generator, g: _Grid
) -> tuple[np.ndarray, np.ndarray]:
    """Blend the lesion of `spec.style` into `img` (`g`: lesion coordinates, outline radius ~1).

    Returns:
        The image, and the lesion's true shape as a field ``1 - d`` (``d``: the normalised distance to the outline,
        ``d < 1`` inside), positive exactly where the lesion's opacity is above half its maximum: the ground-truth
        mask of the segmentation layout (``> 0``).
    """
    m = spec.malig
    asym, border, varieg = (float(x) for x in np.clip(m + lrng.normal(0, 0.15, 3), 0, 1))  # noisy ABC cues
    rho = np.sqrt(g.u**2 + g.v**2)
    darkness = 1.0 - 0.45 * spec.skin  # lesions on dark skin are darker
    style = spec.style

    if style in ("nv", "mel"):
        d = _outline(lrng, g, asym, border)
        edge = float(np.interp(border, [0, 1], [0.17, 0.04])) * lrng.uniform(0.8, 1.25)
        edge = edge * np.exp(0.4 * _Field(lrng, 6, 1.0, 3.0)(g))  # sharp in places, fading in others
        alpha = _sigmoid((1.0 - d) / edge) * lrng.uniform(0.82, 0.97)
        shade = float(np.clip(0.4 + 0.18 * spec.tint + lrng.normal(0, 0.15) + 0.25 * m, 0, 1))
        col = np.broadcast_to(_lerp(_LIGHT_BROWN, _DARK_BROWN, shade), img.shape).astype(np.float32)
        # a second, close brown: darker centre, or lighter periphery, or a soft patch
        second = _lerp(_LIGHT_BROWN, _DARK_BROWN, float(np.clip(shade + lrng.choice([-0.3, 0.3]), 0, 1)))
        t = np.clip(0.4 * _Field(lrng, 6, 1.0, 3.0)(g) + lrng.uniform(-0.2, 0.8) * (1 - rho), 0, 1)
        col = _blend(col, second, t * lrng.uniform(0.3, 0.9))
        col = col * (1.0 + 0.06 * _Field(lrng, 12, 6.0, 20.0)(g))[..., None]  # mottled pigment
        # pigment network: regular and fading out at the periphery (benign), patchy and thick (malignant)
        net = _network(lrng, g, lrng.uniform(14.0, 24.0), lrng.uniform(0.25, 0.4) * (1 + 0.6 * m))
        patchy = _sigmoid(_Field(lrng, 6, 1.5, 4.0)(g) * (1 + 4 * m) + 1.5 - 2.5 * m)
        net_strength = lrng.uniform(0.1, 0.35) * patchy * _sigmoid((1.05 - rho) * 8)
        col = col * (1.0 - net_strength * net)[..., None]
        # colour variegation: extra colours in soft, textured patches
        n_extra = int(np.clip(round(varieg * 6.0 + lrng.normal(0, 0.5) - 1.6), 0, 5))
        palette = [_DARK_BROWN, _BLACK, _BLUE_GREY, _RED, _WHITE, _LIGHT_BROWN]
        weights = np.array([0.3, 0.2, 0.2, 0.12, 0.1, 0.15]) * [1.0, m + 0.2, m + 0.2, m + 0.2, m + 0.2, 1.0]
        for i in lrng.choice(len(palette), size=n_extra, replace=False, p=weights / weights.sum()):
            fld = _Field(lrng, 8, 1.5, 5.0)(g) + 0.3 * _Field(lrng, 10, 8.0, 20.0)(g)
            if i == 2:
                fld = fld + 1.2 * (1.0 - rho)  # blue-white veil: central
            thr = lrng.uniform(0.4, 1.2)
            patch = _sigmoid((fld - thr) / lrng.uniform(0.12, 0.3)) * lrng.uniform(0.45, 0.9)
            col = _blend(col, palette[i], patch)
        # dark dots / globules: regular and central (benign), scattered black at the border (malignant)
        if lrng.random() < 0.8 * m:
            col = _dots(col, g, lrng, int(5 + 20 * m), 0.035, _BLACK, 0.5, 1.0, lrng.uniform(0.5, 0.9))
        elif lrng.random() < 0.25:
            col = _dots(col, g, lrng, int(lrng.integers(4, 12)), 0.05, _DARK_BROWN, 0.0, 0.6, 0.6)
        return _blend(img, col * darkness, alpha), 1.0 - d

    if style == "bkl":
        d = _outline(lrng, g, 0.4 * asym + 0.2, 0.3 * border + 0.15)
        alpha = _sigmoid((1.0 - d) / lrng.uniform(0.03, 0.06)) * lrng.uniform(0.75, 0.95)  # stuck-on: sharp
        base = _lerp(_TAN, _MID_BROWN, lrng.uniform(0.0, 0.7))
        ridge = np.sin(lrng.uniform(4, 7) * _Field(lrng, 8, 1.0, 4.0)(g) + 0.8 * _Field(lrng, 10, 5.0, 12.0)(g))
        col = base[None, None, :] * (0.97 + 0.1 * ridge[..., None] + 0.06 * _Field(lrng, 8, 1.0, 3.0)(g)[..., None])
        fissures = _network(lrng, g, lrng.uniform(5.0, 9.0), 0.15)  # cerebriform furrows
        col = _blend(col, _DARK_BROWN, fissures * lrng.uniform(0.15, 0.4))
        col = _dots(col, g, lrng, int(lrng.integers(3, 14)), 0.05, _WHITE, 0.0, 0.8, 0.8)  # milia-like cysts
        col = _dots(col, g, lrng, int(lrng.integers(2, 10)), 0.04, _DARK_BROWN, 0.0, 0.85)  # comedo-like
        return _blend(img, col * darkness, alpha), 1.0 - d

    if style == "bcc":
        d = _outline(lrng, g, 0.5 * asym + 0.2, 0.4 * border + 0.1)
        alpha = _sigmoid((1.0 - d) / lrng.uniform(0.06, 0.14)) * lrng.uniform(0.45, 0.75)  # translucent, pearly
        col = np.broadcast_to(_lerp(_PINK, _WHITE, lrng.uniform(0.0, 0.4)), img.shape).astype(np.float32)
        if lrng.random() < 0.5:  # blue-grey ovoid nests
            col = _dots(col, g, lrng, int(lrng.integers(2, 7)), 0.12, _BLUE_GREY, 0.1, 0.8, 0.8)
        if lrng.random() < 0.25:  # ulceration
            cu, cv, rr = lrng.normal(0, 0.2), lrng.normal(0, 0.2), lrng.uniform(0.15, 0.35)
            col = _blend(col, (0.45, 0.14, 0.12), _sigmoid((rr - np.hypot(g.u - cu, g.v - cv)) * 30))
        img = _blend(img, col, alpha)
        return _vessels(img, lrng, g, spec), 1.0 - d

    if style == "akiec":
        d = _outline(lrng, g, 0.5 * asym + 0.3, 0.6 * border + 0.3)
        alpha = _sigmoid((1.0 - d) / lrng.uniform(0.12, 0.25)) * lrng.uniform(0.55, 0.85)  # ill-defined
        col = np.broadcast_to(_lerp(_RED, _PINK, lrng.uniform(0.0, 0.5)), img.shape).astype(np.float32)
        col = _blend(col, _LIGHT_BROWN, np.clip(0.4 * _Field(lrng, 6, 1.0, 3.0)(g), 0, 1))
        flakes = _Field(lrng, 24, 18.0, 45.0)(g) + 0.7 * _Field(lrng, 6, 1.0, 3.0)(g)  # scaly surface: white flakes
        col = _blend(col, (0.95, 0.92, 0.80), _sigmoid((flakes - lrng.uniform(0.8, 1.4)) * 5) * lrng.uniform(0.4, 0.7))
        if lrng.random() < 0.5:  # strawberry pattern: white follicular openings
            col = _dots(col, g, lrng, int(lrng.integers(6, 20)), 0.035, _WHITE, 0.0, 0.9, 0.8)
        return _blend(img, col, alpha), 1.0 - d

    if style == "vasc":
        k = int(lrng.integers(3, 9))
        centres = lrng.uniform(-0.55, 0.55, size=(k, 2))
        radii = lrng.uniform(0.25, 0.5, size=k)
        dist = np.stack([np.hypot(g.u - cu, g.v - cv) / r for (cu, cv), r in zip(centres, radii, strict=True)])
        order = np.sort(dist, axis=0)
        tone = lrng.uniform(0, 1, size=k)
        cols = np.stack([_lerp(_VASC_RED, _PURPLE, t) for t in tone])
        col = cols[np.argmin(dist, axis=0)] * (0.85 + 0.15 * np.clip(order[0], 0, 1))[..., None]
        alpha = _sigmoid((1.0 - order[0]) / 0.05) * lrng.uniform(0.8, 0.97)
        septa = _sigmoid((0.12 - (order[1] - order[0])) / 0.03) * (order[1] < 1.0) * 0.6  # whitish septa
        col = _blend(col, (0.85, 0.70, 0.72), septa)
        return _blend(img, col * (1.0 - 0.25 * spec.skin), alpha), 1.0 - order[0]  # the union of the lobules

    # df: small brown lesion, faint peripheral network, central white scar-like patch
    d = _outline(lrng, g, 0.3 * asym + 0.1, 0.2 * border + 0.1)
    alpha = _sigmoid((1.0 - d) / lrng.uniform(0.10, 0.2)) * lrng.uniform(0.6, 0.85)
    col = np.broadcast_to(_lerp(_LIGHT_BROWN, _MID_BROWN, lrng.uniform(0, 0.6)), img.shape).astype(np.float32)
    col = col * (1.0 - 0.2 * _network(lrng, g, lrng.uniform(12.0, 18.0), 0.35))[..., None]
    cu, cv, rr = lrng.normal(0, 0.1), lrng.normal(0, 0.1), lrng.uniform(0.3, 0.55)
    scar = _sigmoid((rr - np.hypot(g.u - cu, g.v - cv) + 0.08 * _Field(lrng, 6, 3, 8)(g)) * 15)
    col = _blend(col, _WHITE, scar * lrng.uniform(0.6, 0.9))
    return _blend(img, col * darkness, alpha), 1.0 - d


def _vessels(img: np.ndarray, lrng: np.random.Generator, g: _Grid, spec: _Spec) -> np.ndarray:
    """Draw branching (arborizing) red vessels inside the lesion."""
    mask = Image.new("L", (g.w, g.h), 0)
    draw = ImageDraw.Draw(mask)
    stack = []
    for _ in range(int(lrng.integers(2, 6))):
        a = lrng.uniform(0, 2 * np.pi)
        stack.append((np.array([np.cos(a), np.sin(a)]) * lrng.uniform(0.5, 0.85), a + np.pi, 3.0, 0))
    while stack:
        p, heading, width, depth = stack.pop()
        for _ in range(int(lrng.integers(3, 7))):
            heading += lrng.normal(0, 0.35)
            q = p + 0.09 * np.array([np.cos(heading), np.sin(heading)])
            px = max(1, round(width * g.px_per_unit / 120))
            draw.line([g.to_px(*p), g.to_px(*q)], fill=int(200 + 50 * width / 3), width=px)
            p = q
            if depth < 3 and lrng.random() < 0.25:
                stack.append((p, heading + lrng.choice([-1, 1]) * lrng.uniform(0.4, 1.0), width * 0.7, depth + 1))
    alpha = np.asarray(mask, np.float32) / 255.0 * lrng.uniform(0.6, 0.9)
    return _blend(img, np.asarray(_VASC_RED) * (1.0 - 0.3 * spec.skin), alpha)


def _draw_hairs(
    img: np.ndarray, spec: _Spec, irng: np.random.Generator, w: int, h: int, scale: float
) -> np.ndarray:
    """A few dark curved hairs (quadratic Bezier curves, 1-3 px at 600 px wide)."""
    count = int(irng.poisson(spec.hair * 10.0))
    if count == 0:
        return img
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for _ in range(count):
        p0 = irng.uniform([-0.1 * w, -0.1 * h], [1.1 * w, 1.1 * h])
        ang = irng.uniform(0, 2 * np.pi)
        length = irng.uniform(0.3, 1.0) * scale
        p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
        p1 = (p0 + p2) / 2 + irng.normal(0, 0.25 * length, 2)
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        width = max(1, round(irng.uniform(1.0, 3.0) * scale / 450))
        draw.line([tuple(map(float, q)) for q in pts], fill=int(irng.integers(170, 256)), width=width, joint="curve")
    alpha = np.asarray(mask, np.float32) / 255.0
    colour = _lerp((0.10, 0.07, 0.05), (0.35, 0.25, 0.18), float(irng.uniform(0, 0.6)))
    return _blend(img, colour, alpha)


def _draw_artifacts(img: np.ndarray, irng: np.random.Generator, w: int, h: int, scale: float) -> np.ndarray:
    """Rare ruler ticks along an edge and immersion-fluid bubbles."""
    r = irng.random()
    if r < 0.05:  # ruler
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        step = max(3.0, scale * irng.uniform(0.025, 0.04))
        y0 = irng.uniform(0.04, 0.12) * h
        if irng.random() < 0.5:
            y0 = h - y0
        sign = 1 if y0 < h / 2 else -1
        x = irng.uniform(0.05, 0.2) * w
        i = 0
        while x < 0.95 * w:
            length = scale * (0.06 if i % 10 == 0 else 0.04 if i % 5 == 0 else 0.025)
            draw.line([(x, y0), (x, y0 + sign * length)], fill=230, width=max(1, round(scale / 300)))
            x += step
            i += 1
        return _blend(img, (0.08, 0.08, 0.09), np.asarray(mask, np.float32) / 255.0)
    if r < 0.10:  # bubbles
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(int(irng.integers(1, 6))):
            cx, cy = irng.uniform(0, w), irng.uniform(0, h)
            rad = irng.uniform(0.02, 0.09) * scale
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=200, width=max(1, round(scale / 250)))
        return _blend(img, (0.97, 0.97, 0.97), np.asarray(mask, np.float32) / 255.0)
    return img
