"""`reco train` settings: :class:`TrainConfig` (the recipe, YAML ``train:``), the config hash,
and :class:`LoopConfig` (what the driver hands every training loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from reco.config import config_hash as reco_config_hash
from reco.config import from_dict, to_dict
from reco.errors import ConfigError

IGNORE = -100  # internal ignore index; label values >= num_classes (e.g. 255) and low-confidence pixels map here
SETTINGS_FILE = "train_settings.json"
CONFIG_FILE = "train_config.yaml"
REPORT_FILE = "train_report.json"
PLOT_FILE = "train_curve.png"
MODEL_DIR = "model"
CKPT_PREFIX = "checkpoint_"
DIVERGED_FILE = "train_diverged.json"  # left by rank 0 when the loss became NaN/Inf (read by the driver)
SELECTIONS = ("last", "holdout")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """ReCo+ training; the defaults are the paper's recipe (RECO_SPEC.md, "ReCo+")."""

    # model: DeepLabV3+ (paper: ResNet-101, output stride 8)
    encoder: str = "resnet101"
    encoder_weights: Optional[str] = None  # URI of an ImageNet checkpoint; None = random init
    output_stride: int = 8
    decoder_channels: int = 256
    # optimisation (paper): Adam, lr 5e-4 head / 5e-5 encoder, wd 2e-4, poly 0.9, 20k its, batch 8
    iterations: int = 20000
    batch_size: int = 8  # global: split evenly over the workers
    lr_head: float = 5e-4
    lr_encoder: float = 5e-5
    weight_decay: float = 2e-4
    poly_power: float = 0.9
    # augmentation (paper): 320 crops, scale 0.5-2, h-flip, colour jitter, Gaussian blur. The
    # jitter/blur strengths are not given by the spec: common (SimCLR-style) values.
    crop_size: int = 320
    base_size: int = 320  # shorter side before random scaling; also the inference size
    scale_min: float = 0.5
    scale_max: float = 2.0
    hflip: bool = True
    jitter_prob: float = 0.8
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.1
    blur_prob: float = 0.5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    # loss: cross-entropy ignoring 255 (any id >= num_classes) and, when set, pixels whose
    # pseudo-label confidence (confidence PNG / 255) is below this threshold
    confidence_threshold: Optional[float] = None
    # checkpoint selection: "last", or "holdout" = best pseudo-label mIoU on a held-out slice of
    # the pseudo-labelled training images (never the evaluation split)
    selection: str = "last"
    holdout_fraction: float = 0.05
    seed: int = 0
    # --- operational: not part of the config hash (may change between resumes) ---
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 20
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 2  # DataLoader processes per train worker
    precision: str = "auto"  # auto = bf16 autocast on CUDA, float32 on CPU
    max_failures: int = 1

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"train.{msg}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"train.{f.name} must be a finite number, got {v}")
        need(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr_head > 0 and self.lr_encoder >= 0, "lr_head must be > 0 and lr_encoder >= 0")
        need(self.weight_decay >= 0 and self.poly_power >= 0, "weight_decay and poly_power must be >= 0")
        need(
            self.crop_size >= 16 and self.crop_size % 16 == 0,
            f"crop_size must be a multiple of 16, got {self.crop_size}",
        )
        need(self.base_size >= 16, f"base_size must be >= 16, got {self.base_size}")
        need(
            0 < self.scale_min <= self.scale_max,
            f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}",
        )
        for name in ("jitter_prob", "blur_prob", "jitter_hue"):
            need(0 <= getattr(self, name) <= 1, f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
            need(0 <= getattr(self, name) < 1, f"{name} must lie in [0, 1), got {getattr(self, name)}")
        need(0 < self.blur_sigma_min <= self.blur_sigma_max, "need 0 < blur_sigma_min <= blur_sigma_max")
        if self.confidence_threshold is not None:
            need(
                0 <= self.confidence_threshold <= 1,
                f"confidence_threshold must lie in [0, 1], got {self.confidence_threshold}",
            )
        need(self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        need(0 < self.holdout_fraction < 1, f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        need(
            self.batch_size % self.num_workers == 0,
            f"batch_size ({self.batch_size}, global) must be divisible by num_workers ({self.num_workers})",
        )
        need(self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        need(self.loader_workers >= 0, "loader_workers must be >= 0")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.max_failures >= -1, "max_failures must be >= -1 (-1: unlimited)")
        need(self.output_stride in (8, 16), f"output_stride must be 8 or 16, got {self.output_stride}")

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers


#: fields that do not change what is learned (or only its speed) and may differ on a resume
OPERATIONAL = frozenset(
    {
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "loader_workers",
        "precision",
        "max_failures",
    }
)


def load_train_config(data: Optional[Mapping[str, Any]] = None, **overrides: Any) -> TrainConfig:
    """Strictly parse the ``train:`` mapping of a YAML file, then apply non-None ``overrides``."""
    cfg = from_dict(TrainConfig, dict(data or {}), "train")
    extra = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(extra) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown train setting(s) {sorted(unknown)}")
    return replace(cfg, **extra) if extra else cfg


def config_hash(cfg: TrainConfig, data_digest: str, weights_sha256: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """The hash of what a run learns (operational fields left out) and what it covers (the
    ``covered`` settings of the run's :class:`index.output.ResumableOutput`)."""
    learned = {k: v for k, v in to_dict(cfg).items() if k not in OPERATIONAL}
    core = {"train": learned, "data_digest": data_digest, "encoder_weights_sha256": weights_sha256}
    return reco_config_hash(core), core


@dataclass(frozen=True)
class LoopConfig:
    """What every training loop gets from the driver (Ray Train's ``train_loop_config["loop"]``)."""

    train: TrainConfig
    labels_uri: str
    data_digest: str
    config_hash: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    encoder_weights_sha256: Optional[str] = None
    #: the run folder (URI): where an older checkpoint is read from when the latest one is damaged
    run_uri: str = ""
    #: the newest intact checkpoint the driver found before starting (None: none, or a new run)
    resume_from: Optional[str] = None
    #: damaged checkpoints the driver already reported (the loop does not report them again)
    reported_damaged: Tuple[str, ...] = ()
    #: bind the process-group listeners of the workers to 127.0.0.1 (embedded loopback-only Ray)
    loopback: bool = False
