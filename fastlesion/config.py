"""Typed configuration: dataclass sections, YAML files and dotted overrides (``--optim.lr 3e-4``).

Every field carries a docstring-style comment (the ``help`` metadata) that ``fastlesion config`` prints and the
README reference is generated from. Unknown keys, wrong types and values out of range (``optim.ema_decay`` 5, a
probability above 1, NaN or infinity in any number) are a :class:`ConfigError` naming the key: each section's
``__post_init__`` checks its values, so a YAML file, ``load_config``, ``replace`` and ``fastlesion config`` all refuse
what training would.

Example:
    >>> cfg = load_config(None, ["optim.lr=3e-4", "model.name=resnet18"])
    >>> cfg.optim.lr
    0.0003
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastlesion.errors import ConfigError
from fastlesion.metrics import SEG_VAL_METRICS, TASKS, VAL_METRICS

EARLY_STOP_METRICS = ("val_loss", *VAL_METRICS, *SEG_VAL_METRICS)
"""metrics.csv columns that ``train.early_stop_metric`` may watch (the metric names have one definition:
:data:`fastlesion.metrics.METRIC_KEYS`)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (kept in metadata so docs and ``fastlesion config`` can show it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


DATASET_KINDS = ("synthetic", "isic2020", "ham10000", "isic2019", "isic2018-seg", "csv", "folder")
SEG_LOSSES = ("dice_bce", "dice", "bce")
"""``optim.loss`` choices of a segmentation run (the others are classification losses)."""
SYNTHETIC_LAYOUTS = ("isic2020", "ham10000", "isic2018-seg")
CLASS_MAP_PRESETS: dict[str, dict[str, str]] = {
    "ham3": {"mel": "mel", "nv": "nv", "*": "other"},
}
"""``data.class_map`` presets: ``ham3`` is the HAM10000 three-class study (melanoma, nevus, everything else)."""
AUTO_WORKERS_MAX = 8
"""``loader.workers`` None (the default) means the usable CPU cores, at most this many per process."""
CATCH_ALL = "*"
"""The ``data.class_map`` key that maps every source label the mapping does not name."""


def check_class_map(value: dict[str, str] | str | None) -> dict[str, str] | None:
    """``data.class_map`` as a plain ``{source label: class}`` dict: a preset name is expanded (so config.yaml
    holds the mapping itself), keys and values are non-empty strings; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() in CLASS_MAP_PRESETS:
            return dict(CLASS_MAP_PRESETS[value.strip()])
        if value.strip().startswith("{"):
            raise ConfigError(f"data.class_map: cannot read {value!r} as a mapping: every source label needs a "
                              "class, e.g. \"{akiec: other, mel: mel, '*': other}\"")
        raise ConfigError(f"data.class_map: {value!r} is neither a preset ({', '.join(CLASS_MAP_PRESETS)}) nor a "
                          "mapping such as \"{akiec: other, bcc: other, mel: mel, nv: nv, '*': other}\"")
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"data.class_map: expected a non-empty mapping {{source label: class}}, got {value!r}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, (str, int)) or isinstance(v, bool) or not str(v).strip() or not str(k).strip():
            raise ConfigError(f"data.class_map: {k!r} must map to a class name, got {v!r}")
        out[str(k).strip()] = str(v).strip()
    return out


@dataclass
class DataConfig:
    """Where the images are, how they are labelled and split."""

    dataset: str = _f("synthetic", "dataset kind: synthetic | isic2020 | ham10000 | isic2019 | isic2018-seg | csv | "
                      "folder")
    root: str | None = _f(None, "dataset root folder (synthetic: None = generated on first use into the cache)")
    csv: str | None = _f(None, "csv kind: the CSV file (absolute, or relative to root)")
    path_col: str = _f("path", "csv kind: column holding the image path (relative to root, or absolute inside it)")
    label_col: str = _f("label", "csv kind: column holding the label (class name or integer)")
    group_col: str | None = _f(None, "csv kind: column holding the group (patient id) used for grouped splits")
    mask_col: str = _f("mask", "csv kind, train.task=segmentation: column holding the mask path (a binary PNG)")
    class_map: dict[str, str] | str | None = _f(None, "group source labels into training classes, any dataset kind: "
                                                "a mapping {source: class} (key '*' = every source label not "
                                                "named) or a preset (ham3: mel, nv, other); classes in order of "
                                                "first appearance in the mapping; None = the source classes")
    synthetic_n: int = _f(800, "synthetic kind: number of images generated on first use")
    synthetic_layout: str = _f("isic2020", "synthetic kind: layout generated (isic2020 | ham10000 | isic2018-seg; "
                               "train.task=segmentation turns the default into isic2018-seg)")
    synthetic_size: int = _f(160, "synthetic kind: width in pixels of the generated images (>= 21)")
    synthetic_seed: int = _f(0, "synthetic kind: generator seed")
    synthetic_positive_rate: float = _f(0.2, "synthetic kind: malignant fraction in (0, 1) (20 %: ~30 per "
                                        "validation fold)")
    num_folds: int = _f(5, "number of stratified group k-fold folds")
    fold: int = _f(0, "validation fold trained against (0 .. num_folds-1)")
    holdout: float = _f(0.0, "fraction of groups held out as a test split before the folds (0 = none)")
    split_seed: int = _f(42, "seed of the split; a folds file is keyed by it")
    folds_file: str | None = _f(None, "folds CSV to write/reuse (None = <root>/folds_k<K>_s<seed>[_h<holdout>].csv)")
    exclude_file: str | None = _f(None, "exclusion list written by `fastlesion check` (one path a line): skipped")
    extra_train: list[str] | str | None = _f(None, "extra labelled dataset roots (ROOT[,ROOT], each detected like "
                                             "--data) added to the training folds only, never to validation, the "
                                             "holdout or the folds file; their classes are mapped onto this "
                                             "dataset's (built-in: isic2019/ham10000 -> isic2020, MEL -> "
                                             "malignant, the rest benign; isic2019 -> ham10000; same names)")
    image_size: int = _f(224, "square input size fed to the model")
    limit: int | None = _f(None, "use only the first N rows of the table (quick experiments)")

    def __post_init__(self) -> None:
        _finite_fields(self, "data")
        if self.dataset not in DATASET_KINDS:
            raise ConfigError(f"data.dataset: unknown dataset kind {self.dataset!r}; choose one of {DATASET_KINDS}")
        _choice("data.synthetic_layout", self.synthetic_layout, SYNTHETIC_LAYOUTS)
        _at_least("data.synthetic_n", self.synthetic_n, 1)
        _at_least("data.synthetic_size", self.synthetic_size, SYNTHETIC_MIN_WIDTH,
                  why=" (the generator draws images of at least 16 x 16 px, height = 3/4 of the width)")
        _at_least("data.synthetic_seed", self.synthetic_seed, 0)
        _in_range("data.synthetic_positive_rate", self.synthetic_positive_rate, 0, 1, lo_open=True, hi_open=True)
        if self.num_folds < 2:
            raise ConfigError(f"data.num_folds must be >= 2, got {self.num_folds}")
        if not 0 <= self.fold < self.num_folds:
            raise ConfigError(f"data.fold must be in 0..{self.num_folds - 1}, got {self.fold}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"data.holdout must be in [0, 1), got {self.holdout}")
        _in_range("data.split_seed", self.split_seed, 0, 2**32 - 1)
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")
        _at_least("data.limit", self.limit, 1, optional=True)
        self.class_map = check_class_map(self.class_map)
        if isinstance(self.extra_train, str):
            self.extra_train = [p.strip() for p in self.extra_train.split(",") if p.strip()]
        self.extra_train = list(self.extra_train) if self.extra_train else None


@dataclass
class LoaderConfig:
    """How batches are made: backend, threads and augmentation."""

    backend: str = _f("auto", "auto (the fastest path for the device and the images: dali on a GPU; on CPU torch "
                      "with DCT-scaled decoding for large JPEGs or for crops and flips only, else dali; torch "
                      "without DALI) | dali | torch")
    device: str = _f("auto", "where DALI decodes: auto (gpu if CUDA) | gpu | cpu")
    batch_size: int = _f(64, "per-process training batch size")
    eval_batch_size: int | None = _f(None, "per-process evaluation batch size (None = 2 x batch_size)")
    workers: int | None = _f(None, "DataLoader workers / DALI CPU threads per process (None = the CPU cores this "
                             "process may use, at most 8)")
    scale: tuple[float, float] = _f((0.35, 1.0), "RandomResizedCrop area range")
    ratio: tuple[float, float] = _f((0.75, 1.3333333), "RandomResizedCrop aspect-ratio range")
    hflip: float = _f(0.5, "probability of a horizontal flip")
    vflip: float = _f(0.5, "probability of a vertical flip")
    rotate: float = _f(30.0, "maximum rotation in degrees (uniform in [-rotate, rotate])")
    brightness: float = _f(0.2, "ColorJitter brightness")
    contrast: float = _f(0.2, "ColorJitter contrast")
    saturation: float = _f(0.2, "ColorJitter saturation")
    hue: float = _f(0.02, "ColorJitter hue (<= 0.5)")
    aug_strength: float = _f(1.0, "multiplier on rotation and colour jitter (0 = crops and flips only)")
    eval_crop: float = _f(0.875, "eval: resize the shorter side to image_size / eval_crop, then center crop")
    oversample: bool = _f(False, "resample the training list each epoch so minority classes are drawn more often")
    oversample_power: float = _f(0.5, "oversample weights = (1 / class_count) ** power (1 = balanced, 0 = none)")
    seed: int = _f(0, "shuffling/augmentation seed (offset by rank and epoch)")
    dtype: str = _f("float32", "DALI output dtype: float32 | float16 | bfloat16")
    prefetch: int = _f(2, "batches prefetched per worker / DALI queue depth")
    dct_scaling: bool = _f(True, "torch loader: decode a JPEG at 1/2, 1/4 or 1/8 scale when the crop (training) or "
                           "resize (evaluation) shrinks it that much anyway (libjpeg DCT scaling, PIL draft), else "
                           "in full by libjpeg-turbo (simplejpeg), uint8 batches normalised on the device; the crop "
                           "distribution is unchanged. false = full decode by PIL (the plain reference)")
    fast_idct: bool = _f(True, "DALI training decode: libjpeg-turbo's fast integer IDCT (~15 % faster on CPU, about "
                         "one grey level of error); evaluation always uses the accurate IDCT")

    def __post_init__(self) -> None:
        _finite_fields(self, "loader")
        _choice("loader.backend", self.backend, ("auto", "dali", "torch"))
        _choice("loader.device", self.device, ("auto", "gpu", "cpu"))
        _choice("loader.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        if self.batch_size < 1:
            raise ConfigError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        _at_least("loader.eval_batch_size", self.eval_batch_size, 1, optional=True)
        _at_least("loader.workers", self.workers, 0, optional=True)
        if not (0 < self.scale[0] <= self.scale[1] <= 1.0):
            raise ConfigError(f"loader.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"loader.ratio must satisfy 0 < min <= max, got {self.ratio}")
        for key in ("hflip", "vflip"):
            _in_range(f"loader.{key}", getattr(self, key), 0, 1)
        _in_range("loader.rotate", self.rotate, 0, 180)
        for key in ("brightness", "contrast", "saturation", "aug_strength", "oversample_power"):
            _at_least(f"loader.{key}", getattr(self, key), 0)
        _in_range("loader.hue", self.hue, 0, 0.5)
        if not 0 < self.eval_crop <= 1:
            raise ConfigError(f"loader.eval_crop must be in (0, 1], got {self.eval_crop}")
        _at_least("loader.seed", self.seed, 0)
        _at_least("loader.prefetch", self.prefetch, 1)

    def resolved_workers(self) -> int:
        """``workers``, with None resolved on this machine: the usable CPU cores
        (:func:`fastlesion.data.loader.usable_cpus`), at most :data:`AUTO_WORKERS_MAX`. The loaders, inference and
        Ray trials read the number through this, so a 2-core machine starts 2 workers, not 4."""
        if self.workers is not None:
            return self.workers
        from fastlesion.data.loader import usable_cpus  # lazy: the config module stays free of torch

        return min(usable_cpus(), AUTO_WORKERS_MAX)


@dataclass
class ModelConfig:
    """Which network and how it starts."""

    name: str = _f("resnet18", "registry name (`fastlesion models` lists them): timm names, torchvision, lenet")
    pretrained_path: str | None = _f(None, "local weights file (state_dict or checkpoint); nothing is downloaded")
    pretrained: bool = _f(False, "start from the architecture's ImageNet weights: timm through the Hugging Face hub "
                          "cache (downloaded when online, the cached copy offline: HF_HOME, HF_HUB_OFFLINE), "
                          "torchvision through its weights API (TORCH_HOME); excludes pretrained_path")
    pretrained_strict: bool = _f(True, "refuse a weights file (pretrained_path) that leaves model tensors at random "
                                 "init or holds tensors the model lacks (a classifier head of another shape is "
                                 "always skipped); false = load what fits, warn about the rest")
    freeze_epochs: int = _f(0, "train only the classifier head for the first N epochs, then the whole model "
                            "(0 = never frozen)")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    drop_path_rate: float = _f(0.0, "stochastic depth rate (timm models that support it)")

    def __post_init__(self) -> None:
        _finite_fields(self, "model")
        _in_range("model.drop_rate", self.drop_rate, 0, 1, hi_open=True)
        _in_range("model.drop_path_rate", self.drop_path_rate, 0, 1, hi_open=True)
        _at_least("model.freeze_epochs", self.freeze_epochs, 0)
        if self.pretrained and self.pretrained_path:
            raise ConfigError(f"model.pretrained and model.pretrained_path ({self.pretrained_path}) both give the "
                              "starting weights; set one of them (model.pretrained false to use the file)")


@dataclass
class OptimConfig:
    """Optimizer, schedule and loss."""

    name: str = _f("adamw", "sgd | adam | adamw | rmsprop")
    lr: float = _f(1e-3, "peak learning rate (for the global batch)")
    backbone_lr_mult: float = _f(1.0, "learning rate of the body (every parameter but the classifier head) as a "
                                 "fraction of the head's, in (0, 1]; the schedule scales both")
    weight_decay: float = _f(0.05, "weight decay")
    no_decay_norm_bias: bool = _f(True, "exempt normalisation weights and biases from weight decay")
    momentum: float = _f(0.9, "SGD / RMSprop momentum")
    nesterov: bool = _f(True, "SGD nesterov momentum")
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam/AdamW betas")
    scheduler: str = _f("cosine", "cosine | onecycle | step | plateau | constant")
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs (cosine)")
    min_lr_ratio: float = _f(0.01, "cosine floor as a fraction of lr")
    step_epochs: int = _f(10, "step: decay every N epochs")
    gamma: float = _f(0.1, "step / plateau decay factor")
    plateau_patience: int = _f(2, "plateau: epochs without improvement before decaying")
    grad_accum: int = _f(1, "gradient accumulation steps")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value (None = off)")
    loss: str = _f("ce", "classification: ce | weighted_ce | focal; segmentation: dice_bce | dice | bce "
                   "(train.task=segmentation turns the default ce into dice_bce)")
    dice_weight: float = _f(0.5, "dice_bce: loss = dice_weight * Dice loss + (1 - dice_weight) * BCE")
    label_smoothing: float = _f(0.0, "label smoothing (ce and weighted_ce)")
    focal_gamma: float = _f(2.0, "focal loss gamma")
    ema: bool = _f(False, "keep an exponential moving average of the weights and validate it")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step, in [0, 1)")

    def __post_init__(self) -> None:
        _finite_fields(self, "optim")
        _choice("optim.name", self.name, ("sgd", "adam", "adamw", "rmsprop"))
        _choice("optim.scheduler", self.scheduler, ("cosine", "onecycle", "step", "plateau", "constant"))
        _choice("optim.loss", self.loss, ("ce", "weighted_ce", "focal", *SEG_LOSSES))
        _in_range("optim.dice_weight", self.dice_weight, 0, 1)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        _in_range("optim.backbone_lr_mult", self.backbone_lr_mult, 0, 1, lo_open=True)
        _at_least("optim.weight_decay", self.weight_decay, 0)
        _in_range("optim.momentum", self.momentum, 0, 1, hi_open=True)
        for i, beta in enumerate(self.betas):
            _in_range(f"optim.betas[{i}]", beta, 0, 1, hi_open=True)
        _at_least("optim.warmup_epochs", self.warmup_epochs, 0)
        _in_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        _at_least("optim.step_epochs", self.step_epochs, 1)
        _in_range("optim.gamma", self.gamma, 0, 1, lo_open=True)
        _at_least("optim.plateau_patience", self.plateau_patience, 0)
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        _at_least("optim.clip_grad", self.clip_grad, 0, strict=True, optional=True)
        _in_range("optim.label_smoothing", self.label_smoothing, 0, 1, hi_open=True)
        _at_least("optim.focal_gamma", self.focal_gamma, 0)
        _in_range("optim.ema_decay", self.ema_decay, 0, 1, hi_open=True)


@dataclass
class TrainConfig:
    """Epochs, precision, compile, early stopping and devices."""

    task: str = _f("classification", "classification | segmentation (a binary lesion mask per image; the keys left "
                   "at their classification defaults take segmentation ones: model.name unet_resnet34, optim.loss "
                   "dice_bce, train.early_stop_metric val_iou, data.synthetic_layout isic2018-seg)")
    epochs: int = _f(10, "maximum number of epochs")
    seed: int = _f(42, "seed for model init and everything not seeded elsewhere")
    device: str = _f("auto", "auto | cuda | cpu")
    amp: str = _f("auto", "auto (bf16 on GPUs that support it, else fp16; on a CPU bf16 where it has bf16 "
                  "instructions, avx512_bf16 or amx_bf16, else off) | bf16 | fp16 | off")
    compile: str = _f("auto", "torch.compile: auto (on with CUDA) | on | off")
    compile_mode: str | None = _f(None, "torch.compile mode: None | reduce-overhead | max-autotune | ...")
    channels_last: str = _f("auto", "auto (on with CUDA, and on CPUs with bf16 instructions) | on | off")
    cudnn_benchmark: bool = _f(True, "torch.backends.cudnn.benchmark")
    early_stop_metric: str = _f("val_auc", "metric that picks best.pt and stops early: a val_* column of "
                                "metrics.csv")
    early_stop_mode: str = _f("auto", "auto (min for val_loss, else max) | max | min for early_stop_metric")
    patience: int = _f(5, "epochs without improvement before stopping (0 = never stop early)")
    min_delta: float = _f(0.0, "an epoch improves on the best only when early_stop_metric beats it by more than this")
    ddp: int = _f(0, "local worker processes to start (0/1 = single process); torchrun sets its own")
    steps_per_epoch: int | None = _f(None, "cap on training steps per epoch, >= 1 (quick experiments)")

    def __post_init__(self) -> None:
        _finite_fields(self, "train")
        _choice("train.task", self.task, TASKS)
        _choice("train.device", self.device, ("auto", "cuda", "cpu"))
        _choice("train.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        _choice("train.compile", self.compile, ("auto", "on", "off"))
        _choice("train.channels_last", self.channels_last, ("auto", "on", "off"))
        _choice("train.early_stop_mode", self.early_stop_mode, ("auto", "max", "min"))
        _choice("train.early_stop_metric", self.early_stop_metric, EARLY_STOP_METRICS)
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        _at_least("train.patience", self.patience, 0)
        _at_least("train.min_delta", self.min_delta, 0)
        if self.ddp < 0:
            raise ConfigError(f"train.ddp must be >= 0 (0/1 = single process), got {self.ddp}")
        _at_least("train.steps_per_epoch", self.steps_per_epoch, 1, optional=True)


@dataclass
class RunConfig:
    """Where results go and how much is printed."""

    out: str | None = _f(None, "run folder (None = runs/<model>-<dataset>-f<fold>-<time>)")
    overwrite: bool = _f(False, "replace a run folder that holds a different run")
    quiet: bool = _f(False, "no progress bars, one line per epoch")
    plots: bool = _f(True, "write PNG plots (curves, ROC, confusion)")
    save_predictions: bool = _f(True, "write validation predictions CSV")
    tensorboard: bool = _f(True, "write TensorBoard event files into RUN/tb")
    mlflow_uri: str | None = _f(None, "log to MLflow at this tracking URI (file:./mlruns, a folder, "
                                "sqlite:///mlflow.db, http://host:5000); needs pip install 'fastlesion[mlflow]'")

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None and not self.mlflow_uri.strip():
            raise ConfigError("run.mlflow_uri must be a tracking URI or a folder (or None), got an empty string")


@dataclass
class Config:
    """The whole configuration of a run; ``config.yaml`` in a run folder is this, resolved."""

    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.train.task == "segmentation":
            self._segmentation_defaults()
        self._check_task()

    def _segmentation_defaults(self) -> None:
        """Keys still at their classification defaults take the segmentation ones (new section objects: a section
        may be shared with another Config)."""
        for (section, key), (cls_default, seg_default) in SEG_DEFAULTS.items():
            sec = getattr(self, section)
            if getattr(sec, key) == cls_default:
                setattr(self, section, dataclasses.replace(sec, **{key: seg_default}))

    def _check_task(self) -> None:
        """The loss, the watched metric and the synthetic layout must belong to ``train.task``."""
        seg = self.train.task == "segmentation"
        if seg != (self.optim.loss in SEG_LOSSES):
            allowed = SEG_LOSSES if seg else ("ce", "weighted_ce", "focal")
            raise ConfigError(f"optim.loss: {self.optim.loss!r} is not a {self.train.task} loss; choose from {allowed}")
        metric = self.train.early_stop_metric
        if metric != "val_loss" and seg != (metric in SEG_VAL_METRICS):
            allowed = ("val_loss", *(SEG_VAL_METRICS if seg else VAL_METRICS))
            raise ConfigError(f"train.early_stop_metric: {metric!r} is not a {self.train.task} metric; choose from "
                              f"{allowed}")
        if self.data.dataset == "synthetic" and seg != (self.data.synthetic_layout == "isic2018-seg"):
            raise ConfigError(f"data.synthetic_layout: {self.data.synthetic_layout!r} does not fit train.task="
                              f"{self.train.task} (isic2018-seg is the segmentation layout)")
        if self.data.dataset == "isic2018-seg" and not seg:
            raise ConfigError("data.dataset: isic2018-seg is a segmentation set; add --task segmentation")
        if seg and self.data.image_size % SEG_SIZE_MULTIPLE:
            raise ConfigError(f"data.image_size must be a multiple of {SEG_SIZE_MULTIPLE} for segmentation (the "
                              f"encoder halves it 5 times), got {self.data.image_size}")


SEG_DEFAULTS = {("model", "name"): ("resnet18", "unet_resnet34"), ("optim", "loss"): ("ce", "dice_bce"),
                ("train", "early_stop_metric"): ("val_auc", "val_iou"),
                ("data", "synthetic_layout"): ("isic2020", "isic2018-seg")}
"""``(section, key) -> (classification default, segmentation default)``: with ``train.task=segmentation`` a key left
at its classification default takes the segmentation one."""
SEG_SIZE_MULTIPLE = 32


SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")


# --------------------------------------------------------------------------------------------------- range checks
SYNTHETIC_MIN_WIDTH = 21
"""Smallest ``data.synthetic_size``: the generator's images are at least 16 x 16 px and 3/4 as high as wide."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(x: float) -> str:
    """A bound as written: ``0``, ``0.5``, ``4294967295``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _finite_fields(section: Any, name: str) -> None:
    """NaN and infinity are refused in every float field (and float pair) of a section, naming the key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            if isinstance(v, float) and not math.isfinite(v):
                key = f"{name}.{f.name}" + (f"[{i}]" if isinstance(value, tuple) else "")
                raise ConfigError(f"{key} must be a finite number, got {v}")


def _at_least(key: str, value: Any, low: float, *, strict: bool = False, optional: bool = False,
              why: str = "") -> None:
    """``value >= low`` (``> low`` when ``strict``); None passes when ``optional``."""
    if value is None and optional:
        return
    if not _is_number(value):
        return  # a wrong type is _coerce's message; a section built in code with one fails where it is used
    if value < low or (strict and value == low):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {_num(low)}{' (or None)' if optional else ''}"
                          f"{why}, got {value}")


def _in_range(key: str, value: Any, low: float, high: float, *, lo_open: bool = False,
              hi_open: bool = False) -> None:
    """``value`` in the interval ``[low, high]``, an end excluded with ``lo_open`` / ``hi_open``."""
    if not _is_number(value):
        return
    above = value > low if lo_open else value >= low
    below = value < high if hi_open else value <= high
    if not (above and below):
        interval = f"{'(' if lo_open else '['}{_num(low)}, {_num(high)}{')' if hi_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value}")


# --------------------------------------------------------------------------------------------------- coercion
def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one value to the field type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        first: ConfigError | None = None
        for option in inner:  # the first type that takes the value (``dict[str, str] | str``: a mapping, else text)
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                first = first or e
        raise first  # type: ignore[misc]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a mapping {{key: value}}, got {value!r}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping {{key: value}}, got {value!r}")
        out = {}
        for k, v in value.items():
            if v is None:
                raise ConfigError(f"{key}: {k!r} maps to nothing")
            out[_coerce(f"{key} key", k, args[0])] = _coerce(f"{key}[{k!r}]", v, args[1])
        return out
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - a bug in this file


def _check_sections(d: Any, source: str) -> None:
    """A config dict's shape: a mapping of known sections, each a mapping of keys (or empty)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (section: {{key: value}}), got {_shown(d)}")
    for name, v in d.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(SECTIONS)})")
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys (key: value), got {_shown(v)}")


def _shown(v: Any) -> str:
    """A short description of a YAML value for an error message: its repr, cut, and its type."""
    text = repr(v)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(v).__name__})"


def _build_section(name: str, values: dict[str, Any], source: str) -> Any:
    cls = SECTIONS[name]
    hints = _section_types(cls)
    kwargs = {}
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(f"{source}: unknown key '{name}.{k}' (known: {', '.join(sorted(hints))})")
        kwargs[k] = _coerce(f"{name}.{k}", v, hints[k])
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any] | None, source: str = "config") -> Config:
    """Build a :class:`Config` from a nested dict, checking every key and type."""
    d = d or {}
    _check_sections(d, source)
    return Config(**{name: _build_section(name, d.get(name) or {}, source) for name in SECTIONS})


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", "3e-4")`` (the value is typed later against the field)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def check_key(key: str) -> tuple[str, str]:
    """``"optim.lr"`` -> ``("optim", "lr")``; an unknown section or key is a ConfigError naming it."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key '{key}' (use section.key with a section in {list(SECTIONS)})")
    if parts[1] not in _section_types(SECTIONS[parts[0]]):
        raise ConfigError(f"unknown config key '{key}'")
    return parts[0], parts[1]


Overrides = Mapping[str, Any] | Iterable[str]
"""Dotted changes: a mapping ``{"optim.lr": 3e-4}`` or CLI-style strings ``["optim.lr=3e-4"]``."""


def _override_items(overrides: Overrides | None) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    if isinstance(overrides, str):
        return [parse_override(overrides)]
    return [parse_override(o) for o in overrides]


def replace(cfg: Config, overrides: Overrides | None = None, /, **dotted: Any) -> Config:
    """A copy of ``cfg`` with dotted keys changed: the one way a config is changed after it is built.

    Each value is typed against its field (``"3e-4"`` -> ``0.0003``) and each changed section is rebuilt, so its
    ``__post_init__`` checks run again; later keys win. Examples::

        replace(cfg, **{"optim.lr": 1e-4, "run.out": "runs/a"})
        replace(cfg, ["optim.lr=1e-4"])            # CLI-style strings
        replace(cfg, {"model.name": "resnet50"})   # a mapping (a Ray Tune trial's sampled keys)
    """
    changes: dict[str, dict[str, Any]] = {}
    for key, value in [*_override_items(overrides), *dotted.items()]:
        section, name = check_key(key)
        changes.setdefault(section, {})[name] = _coerce(key, value, _section_types(SECTIONS[section])[name])
    if not changes:
        return cfg
    new = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in changes.items()})
    if new.train.task == "segmentation":  # a classification value asked for by name is refused, not rewritten
        for (section, name), (cls_default, _) in SEG_DEFAULTS.items():
            if changes.get(section, {}).get(name) == cls_default:
                raise ConfigError(f"{section}.{name}: {cls_default!r} does not fit train.task=segmentation")
    return new


def lookup(cfg: Config, key: str) -> Any:
    """The value of a dotted key: ``lookup(cfg, "optim.lr")``."""
    section, name = check_key(key)
    return getattr(getattr(cfg, section), name)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (in declaration order)."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(SECTIONS[s])
            if getattr(getattr(old, s), f.name) != getattr(getattr(new, s), f.name)]


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document of ``path`` (None for an empty file); a missing file or bad YAML is one ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's sections, checked for shape (an empty file: the defaults)."""
    d = read_yaml(path)
    if d is None:  # an empty file (or only comments): the defaults
        return {}
    _check_sections(d, str(path))
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply dotted overrides."""
    base = config_from_dict(load_yaml(path), str(path)) if path else Config()
    return replace(base, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every field: the config reference."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = _section_types(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            tname = (getattr(tp, "__name__", None) or str(tp).replace("typing.", "")).replace(" | ", " or ")
            rows.append((f"{section}.{f.name}", tname, f.default, f.metadata.get("help", "")))
    return rows
