"""ReCo+ training: DeepLabV3+ on ReCo's pseudo-labels with Ray Train V2 (``TorchTrainer``).

Inputs: the output URI of ``reco pseudo-label`` (``OUT/manifest/part-*.parquet`` rows with
status ``ok``, ``OUT/labels/<id>.png``, optional ``OUT/confidence/<id>.png``, the class list in
``OUT/pseudo_label.json``) and a :class:`TrainConfig` (paper recipe by default).

**Run layout** (``RUN = STORAGE/NAME``, a local path or an fsspec URL such as ``s3://``)::

    RUN/train_settings.json        config hash + what it covers; a rerun with another hash is refused
    RUN/train_config.yaml          the resolved TrainConfig
    RUN/checkpoint_00001000/       Ray Train checkpoints (every ``checkpoint_every`` steps + the last):
        model.safetensors          the unwrapped model's state dict (rank 0)
        optimizer.safetensors      Adam's tensors; optimizer.json: its param groups and scalars
        state.json                 step, config hash, scheduler state, loss/lr history, attempts,
                                   training seconds, holdout mIoU, classes, model spec
        rng_rank<r>.json           every rank's torch (and CUDA) RNG state
    RUN/checkpoint_manager_snapshot.json ...   Ray Train's own bookkeeping
    RUN/model/model.safetensors + model.json   the exported model (safetensors + JSON, no pickle)
    RUN/train_report.json, RUN/train_curve.png the report: loss + lr over steps, throughput, checkpoints

**Data.** Every worker reads the manifest itself (storage URI rule) and draws its batches with a
*step-indexed* sampler: global sample position ``p = step * batch_size + j`` maps to epoch
``p // n`` (a seeded permutation of the ``n`` training images) and rank ``j // (batch_size /
num_workers)``; the augmentation of position ``p`` is seeded by ``(seed, p)``. A run resumed from
step ``s`` therefore sees exactly the batches an uninterrupted run sees from step ``s`` on.

**Resume.** Ray Train V2 hands the latest reported checkpoint to the workers after a worker
failure (``FailureConfig(max_failures)``) and to a new job started with the same ``name`` and
storage path (its checkpoint-manager snapshot). The loop restores model, optimiser, scheduler,
step, per-rank RNG states and the loss history from it, after checking the config hash stored in
it; the driver refuses a different configuration under the same name before Ray starts.

**Checkpoint selection never uses an evaluation split**: ``selection: last`` exports the last
checkpoint; ``selection: holdout`` keeps a hash-chosen slice of the *pseudo-labelled training
images* out of training and exports the checkpoint with the best mIoU against their
pseudo-labels. The report says which.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from reco.config import from_dict, to_dict
from reco.errors import ConfigError, ReCoError, WeightsNotFoundError

logger = logging.getLogger(__name__)

IGNORE = -100  # internal ignore index; label values >= num_classes (e.g. 255) and low-confidence pixels map here
SETTINGS_FILE = "train_settings.json"
CONFIG_FILE = "train_config.yaml"
REPORT_FILE = "train_report.json"
PLOT_FILE = "train_curve.png"
MODEL_DIR = "model"
CKPT_PREFIX = "checkpoint_"
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

        need(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr_head > 0 and self.lr_encoder >= 0, "lr_head must be > 0 and lr_encoder >= 0")
        need(self.weight_decay >= 0 and self.poly_power >= 0, "weight_decay and poly_power must be >= 0")
        need(self.crop_size >= 16 and self.crop_size % 16 == 0, f"crop_size must be a multiple of 16, got {self.crop_size}")
        need(self.base_size >= 16, f"base_size must be >= 16, got {self.base_size}")
        need(0 < self.scale_min <= self.scale_max, f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        for name in ("jitter_prob", "blur_prob", "jitter_hue"):
            need(0 <= getattr(self, name) <= 1, f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
            need(0 <= getattr(self, name) < 1, f"{name} must lie in [0, 1), got {getattr(self, name)}")
        need(0 < self.blur_sigma_min <= self.blur_sigma_max, "need 0 < blur_sigma_min <= blur_sigma_max")
        if self.confidence_threshold is not None:
            need(0 <= self.confidence_threshold <= 1, f"confidence_threshold must lie in [0, 1], got {self.confidence_threshold}")
        need(self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        need(0 < self.holdout_fraction < 1, f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        need(self.batch_size % self.num_workers == 0,
             f"batch_size ({self.batch_size}, global) must be divisible by num_workers ({self.num_workers})")
        need(self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        need(self.loader_workers >= 0, "loader_workers must be >= 0")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.max_failures >= -1, "max_failures must be >= -1 (-1: unlimited)")
        need(self.output_stride in (8, 16), f"output_stride must be 8 or 16, got {self.output_stride}")

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers


#: fields that do not change what is learned (or only its speed) and may differ on a resume
OPERATIONAL = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "use_gpu",
                         "cpus_per_worker", "loader_workers", "precision", "max_failures"})


def load_train_config(data: Optional[Mapping[str, Any]] = None, **overrides: Any) -> TrainConfig:
    """Strictly parse the ``train:`` mapping of a YAML file, then apply non-None ``overrides``."""
    cfg = from_dict(TrainConfig, dict(data or {}), "train")
    extra = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(extra) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown train setting(s) {sorted(unknown)}")
    return replace(cfg, **extra) if extra else cfg


# ---------------------------------------------------------------------------------------------
# pseudo-labels: the manifest, the hold-out split


@dataclass(frozen=True)
class Sample:
    id: str
    uri: str  # the image
    label: str  # URI of the label PNG
    confidence: str  # URI of the confidence PNG, or ""


@dataclass(frozen=True)
class PseudoLabels:
    classes: Tuple[str, ...]
    samples: Tuple[Sample, ...]  # status "ok" rows, sorted by id
    settings: Dict[str, Any]
    digest: str  # sha256 over classes, the pseudo-label config hash and (id, label file) of every sample


def read_pseudo_labels(labels_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> PseudoLabels:
    """The usable rows of a ``reco pseudo-label`` output. ``FileNotFoundError`` when it is not one
    (no ``pseudo_label.json`` or no manifest), :class:`ConfigError` when no row is usable."""
    from index.storage import join, read_bytes

    from .pseudo_label import MANIFEST_DIR, SETTINGS_FILE as PL_SETTINGS, committed_rows

    try:
        settings = json.loads(read_bytes(join(labels_uri, PL_SETTINGS), storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{labels_uri} is not a pseudo-label output (no {PL_SETTINGS}): "
                                "run `reco pseudo-label` first") from None
    classes = tuple(settings.get("classes") or ())
    if not classes:
        raise ConfigError(f"{join(labels_uri, PL_SETTINGS)} names no classes")
    rows = committed_rows(labels_uri, storage_options)
    if not rows:
        raise FileNotFoundError(f"{join(labels_uri, MANIFEST_DIR)} holds no manifest part (part-*.parquet)")
    seen: Dict[str, Sample] = {}
    for r in sorted(rows, key=lambda r: str(r["id"])):
        if r.get("status") == "ok" and r.get("label") and str(r["id"]) not in seen:
            conf = r.get("confidence") or ""
            seen[str(r["id"])] = Sample(str(r["id"]), str(r["uri"]), join(labels_uri, r["label"]),
                                        join(labels_uri, conf) if conf else "")
    if not seen:
        raise ConfigError(f"the manifest of {labels_uri} has {len(rows)} rows but none with status ok: nothing to train on")
    samples = tuple(seen.values())
    # classes, the labelling configuration (a relabelled --overwrite output keeps its file names) and the rows
    h = hashlib.sha256(json.dumps([list(classes), settings.get("config_hash")]).encode())
    for s in samples:
        h.update(f"\n{s.id}\t{s.label.rsplit('/', 1)[-1]}".encode())
    return PseudoLabels(classes, samples, settings, h.hexdigest())


def split_holdout(samples: Sequence[Sample], cfg: TrainConfig) -> Tuple[List[Sample], List[Sample]]:
    """(train, holdout). ``selection: last`` trains on everything; ``holdout`` keeps out the
    ``holdout_fraction`` of images whose hash of (seed, id) is smallest (at least one)."""
    if cfg.selection != "holdout":
        return list(samples), []
    if len(samples) < 2:
        raise ConfigError("selection: holdout needs at least 2 pseudo-labelled images")
    k = min(len(samples) - 1, max(1, round(cfg.holdout_fraction * len(samples))))
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"{cfg.seed}:{s.id}".encode()).hexdigest())
    held = {s.id for s in ranked[:k]}
    return [s for s in samples if s.id not in held], [s for s in samples if s.id in held]


def config_hash(cfg: TrainConfig, data_digest: str, weights_sha256: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """The hash of what a run learns (operational fields left out) and what it covers."""
    learned = {k: v for k, v in to_dict(cfg).items() if k not in OPERATIONAL}
    core = {"train": learned, "data_digest": data_digest, "encoder_weights_sha256": weights_sha256}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16], core


# ---------------------------------------------------------------------------------------------
# augmentation and the step-indexed sampler


def load_sample(sample: Sample, storage_options=None):
    """(RGB PIL image, (H, W) int64 ids, (H, W) uint8 confidence or None)."""
    from PIL import Image

    from index.labels import decode_labels
    from index.readers import read_image
    from index.storage import read_bytes

    img = read_image(sample.uri, storage_options)
    lab = decode_labels(read_bytes(sample.label, storage_options))
    conf = None
    if sample.confidence:
        conf = np.array(Image.open(io.BytesIO(read_bytes(sample.confidence, storage_options))).convert("L"))
    if lab.shape != (img.size[1], img.size[0]):
        raise ValueError(f"{sample.id}: label {lab.shape[::-1]} and image {img.size} sizes differ")
    return img, lab, conf


def target_ids(lab: np.ndarray, conf: Optional[np.ndarray], num_classes: int,
               threshold: Optional[float]) -> np.ndarray:
    """Label ids with ignore (id >= num_classes, e.g. 255; confidence < threshold) set to IGNORE."""
    y = lab.astype(np.int64)
    y[(y < 0) | (y >= num_classes)] = IGNORE
    if threshold is not None:
        if conf is None:
            raise ConfigError("confidence_threshold needs confidence maps (reco pseudo-label --confidence-maps)")
        y[conf.astype(np.float32) < threshold * 255.0] = IGNORE
    return y


def _nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ri = np.minimum((np.arange(h) + 0.5) * a.shape[0] / h, a.shape[0] - 1).astype(np.int64)
    ci = np.minimum((np.arange(w) + 0.5) * a.shape[1] / w, a.shape[1] - 1).astype(np.int64)
    return a[np.ix_(ri, ci)]


def _jitter(img, cfg: TrainConfig, rng: np.random.Generator):
    from PIL import Image, ImageEnhance

    for op in rng.permutation(4):
        if op == 0 and cfg.jitter_brightness:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - cfg.jitter_brightness, 1 + cfg.jitter_brightness))
        elif op == 1 and cfg.jitter_contrast:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - cfg.jitter_contrast, 1 + cfg.jitter_contrast))
        elif op == 2 and cfg.jitter_saturation:
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - cfg.jitter_saturation, 1 + cfg.jitter_saturation))
        elif op == 3 and cfg.jitter_hue:
            shift = int(round(rng.uniform(-cfg.jitter_hue, cfg.jitter_hue) * 255))
            hsv = np.array(img.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img


def augment(img, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
            mean: Sequence[float], std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One training crop: shorter side to ``base_size`` x U(scale_min, scale_max), pad (ignore)
    to the crop, random crop, h-flip, colour jitter, Gaussian blur, normalise."""
    from PIL import Image, ImageFilter

    w, h = img.size
    s = cfg.base_size / min(w, h) * rng.uniform(cfg.scale_min, cfg.scale_max)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = img.resize((nw, nh), Image.BILINEAR)
    y = _nearest(y, nh, nw)
    c = cfg.crop_size
    ph, pw = max(c - nh, 0), max(c - nw, 0)
    arr = np.asarray(img, dtype=np.uint8)
    if ph or pw:
        fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
        big = np.empty((nh + ph, nw + pw, 3), np.uint8)
        big[:] = fill
        big[:nh, :nw] = arr
        arr = big
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
    top = int(rng.integers(0, arr.shape[0] - c + 1))
    left = int(rng.integers(0, arr.shape[1] - c + 1))
    arr, y = arr[top:top + c, left:left + c], y[top:top + c, left:left + c]
    if cfg.hflip and rng.random() < 0.5:
        arr, y = arr[:, ::-1], y[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(arr))
    if rng.random() < cfg.jitter_prob:
        img = _jitter(img, cfg, rng)
    if rng.random() < cfg.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(cfg.blur_sigma_min, cfg.blur_sigma_max))))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.contiguous(), torch.from_numpy(np.ascontiguousarray(y))


class PseudoLabelDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by ``(index, position)`` (see :class:`StepSampler`)."""

    def __init__(self, samples: Sequence[Sample], cfg: TrainConfig, num_classes: int, storage_options=None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.samples, self.cfg, self.num_classes = list(samples), cfg, num_classes
        self.storage_options = dict(storage_options or {})
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index, position = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.cfg.seed, 7, position])
        last: Optional[Exception] = None
        for k in range(4):  # an unreadable image is replaced by the next one (logged), not fatal
            s = self.samples[(index + k) % len(self.samples)]
            try:
                img, lab, conf = load_sample(s, self.storage_options)
                break
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - bad or vanished input
                logger.warning("training sample %s unusable (%s: %s); using the next one", s.id, type(exc).__name__, exc)
                last = exc
        else:
            raise RuntimeError(f"4 consecutive training samples from {index} are unusable: {last}")
        y = target_ids(lab, conf, self.num_classes, self.cfg.confidence_threshold)
        return augment(img, y, self.cfg, rng, self.mean, self.std)


class StepSampler(torch.utils.data.Sampler):
    """Yields ``(index, position)`` for this rank's share of the global batches of steps
    ``[start_step, end_step)``: position ``p = step * global_batch + j``; rank ``r`` takes
    ``j`` in ``[r * b, (r + 1) * b)``; index = epoch ``p // n``'s seeded permutation at ``p % n``."""

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, start_step: int, end_step: int,
                 seed: int):
        if n < 1:
            raise ConfigError("no training images")
        self.n, self.B, self.rank, self.world = n, global_batch, rank, world_size
        self.b = global_batch // world_size
        self.start, self.end, self.seed = start_step, end_step, seed
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, 11, epoch]).permutation(self.n)
        return self._perms[epoch]

    def positions(self, step: int) -> List[int]:
        return [step * self.B + j for j in range(self.rank * self.b, (self.rank + 1) * self.b)]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for step in range(self.start, self.end):
            for p in self.positions(step):
                yield int(self._perm(p // self.n)[p % self.n]), p

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.b


# ---------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, never pickle


def _optimizer_to_files(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> Dict[str, Any]:
    st = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
          "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        st["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    py = st.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    if st.get("cuda") and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in st["cuda"]])


def write_checkpoint(folder: str, rank: int, model: torch.nn.Module, opt, sched, state: Mapping[str, Any]) -> None:
    """Write this rank's part of a checkpoint into a local folder (rank 0: model, optimiser, state)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if rank == 0:
        meta = {"config_hash": str(state["config_hash"]), "step": str(state["step"])}
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, "model.safetensors"), metadata=meta)
        tensors, ometa = _optimizer_to_files(opt)
        save_file(tensors, os.path.join(folder, "optimizer.safetensors"), metadata=meta)
        with open(os.path.join(folder, "optimizer.json"), "w") as f:
            json.dump(ometa, f)
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump({**state, "scheduler": sched.state_dict()}, f)
    with open(os.path.join(folder, f"rng_rank{rank}.json"), "w") as f:
        json.dump(_rng_state(), f)


def read_checkpoint_state(folder: str) -> Dict[str, Any]:
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


def restore_checkpoint(folder: str, rank: int, model: torch.nn.Module, opt, sched, want_hash: str) -> Dict[str, Any]:
    """Load a checkpoint folder into model/optimiser/scheduler and this rank's RNG; returns its
    state. A checkpoint of another configuration raises :class:`ConfigError`."""
    from safetensors.torch import load_file

    state = read_checkpoint_state(folder)
    if state.get("config_hash") != want_hash:
        raise ConfigError(f"checkpoint {folder} was written by configuration {state.get('config_hash')}, "
                          f"this run is {want_hash}: refusing to resume from it")
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    with open(os.path.join(folder, "optimizer.json")) as f:
        ometa = json.load(f)
    opt.load_state_dict(_optimizer_from_files(load_file(os.path.join(folder, "optimizer.safetensors")), ometa))
    sched.load_state_dict(state.pop("scheduler"))
    rng = os.path.join(folder, f"rng_rank{rank}.json")
    if os.path.isfile(rng):
        with open(rng) as f:
            _set_rng_state(json.load(f))
    else:  # resumed on more workers than wrote it: a fresh, deterministic stream
        torch.manual_seed(state["step"] * 1009 + rank)
    return state


def checkpoint_segmodel(folder: str, device: str = "cpu"):
    """A :class:`reco.segmodel.SegModel` from a local checkpoint folder."""
    from safetensors.torch import load_file

    from reco.segmodel import SegModel, SegModelSpec, build_model

    state = read_checkpoint_state(folder)
    spec = SegModelSpec(**state["spec"])
    model = build_model(spec)
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    return SegModel(model, spec, state["classes"], state["base_size"], state["mean"], state["std"],
                    {"config_hash": state["config_hash"], "step": state["step"]}, device)


# ---------------------------------------------------------------------------------------------
# the training loop (one per worker) and its two sessions


class _RaySession:
    """Ray Train V2 worker context."""

    def __init__(self, cfg: TrainConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if isinstance(self.device, list):
            self.device = self.device[0]

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: Dict[str, Any], folder: str, name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        # Wait until the controller has committed it: a worker dying right after report() would
        # otherwise lose the report (it sits in the workers' result queues until the next poll).
        wait = getattr(ray.train, "get_all_reported_checkpoints", None)
        if wait is not None:
            wait(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            for b in module.buffers():
                dist.broadcast(b, 0)


class _LocalCheckpoint:
    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class _LocalSession:
    """The same loop in one plain process (no Ray, no DDP): benchmarks and tools."""

    def __init__(self, cfg: TrainConfig, run_dir: str):
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.run_dir = run_dir

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def get_checkpoint(self):
        names = sorted(n for n in os.listdir(self.run_dir) if n.startswith(CKPT_PREFIX)
                       and os.path.isdir(os.path.join(self.run_dir, n))) if os.path.isdir(self.run_dir) else []
        return _LocalCheckpoint(os.path.join(self.run_dir, names[-1])) if names else None

    def report(self, metrics: Dict[str, Any], folder: str, name: str) -> None:
        dest = os.path.join(self.run_dir, name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
        with open(os.path.join(dest, "metrics.json"), "w") as f:
            json.dump(metrics, f)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        pass


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    cfg = from_dict(TrainConfig, loop_config["config"], "train")
    _train(loop_config, cfg, _RaySession(cfg))


def _say(line: str) -> None:
    """Progress on the console: stdout of the worker, which Ray forwards to the driver (plain
    ``sys.stdout.write``: Ray Train patches ``print`` into its logger, which prints it twice)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _holdout_miou(core, holdout: Sequence[Sample], num_classes: int, cfg: TrainConfig, session, mean, std,
                  storage_options, bf16: bool) -> float:
    """mIoU of the model against the pseudo-labels of its rank's share of the held-out images,
    confusion matrices summed over ranks (same inference as the exported model)."""
    from reco.metrics import ConfusionMatrix
    from reco.segmodel import predict_logits

    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    for s in holdout[session.rank::session.world_size]:
        img, lab, conf = load_sample(s, storage_options)
        y = target_ids(lab, conf, num_classes, cfg.confidence_threshold)
        pred = predict_logits(core, img, cfg.base_size, mean, std, session.device, bf16).argmax(0)
        cm.update(pred, torch.from_numpy(y))
    m = session.all_reduce(cm.matrix.to(session.device)).cpu()
    cm.matrix = m
    return float(cm.compute().miou)


def _train(lc: Mapping[str, Any], cfg: TrainConfig, session) -> Dict[str, Any]:
    from reco.segmodel import IMAGENET_MEAN, IMAGENET_STD, SegModelSpec, build_model, load_encoder_weights, \
        read_state_dict, required_multiple

    from index.storage import fetch_to_cache

    so = lc.get("storage_options") or {}
    rank, world = session.rank, session.world_size
    if session.device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and session.device.type == "cuda")
    data = read_pseudo_labels(lc["labels_uri"], so)
    if data.digest != lc["data_digest"]:
        raise ConfigError(f"the pseudo-labels under {lc['labels_uri']} changed since the run was configured "
                          f"(digest {data.digest[:12]} != {lc['data_digest'][:12]})")
    train, holdout = split_holdout(data.samples, cfg)
    held_ids = [s.id for s in holdout]
    holdout_info = {"count": len(held_ids), "ids_sha256": hashlib.sha256("\n".join(held_ids).encode()).hexdigest(),
                    "ids": held_ids if len(held_ids) <= 1000 else held_ids[:1000] + ["..."]}
    num_classes = len(data.classes)
    spec = SegModelSpec(cfg.encoder, num_classes, cfg.output_stride, cfg.decoder_channels)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(spec)
    if cfg.crop_size % required_multiple(model):
        raise ConfigError(f"crop_size {cfg.crop_size} must be a multiple of the encoder's stride {required_multiple(model)}")
    if cfg.encoder_weights:
        from reco.segmodel import file_sha256

        path = fetch_to_cache(cfg.encoder_weights, so)
        want = lc.get("encoder_weights_sha256")
        if want and file_sha256(path) != want:
            raise ConfigError(f"encoder_weights {cfg.encoder_weights} changed since the run was configured "
                              f"(sha256 {want[:12]}...)")
        load_encoder_weights(model, read_state_dict(path), cfg.encoder_weights)
    model = session.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    enc_ids = {id(p) for p in core.encoder.parameters()}
    head = [p for p in core.parameters() if id(p) not in enc_ids]
    opt = torch.optim.Adam([{"params": head, "lr": cfg.lr_head, "name": "head"},
                            {"params": list(core.encoder.parameters()), "lr": cfg.lr_encoder, "name": "encoder"}],
                           weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, 1.0 - s / cfg.iterations) ** cfg.poly_power)
    state: Dict[str, Any] = {"step": 0, "history": [], "attempts": [], "train_seconds": 0.0, "checkpoints": []}
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore_checkpoint(d, rank, core, opt, sched, lc["config_hash"])
    else:
        torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # dropout streams differ per rank
    start = int(state["step"])
    state["attempts"] = list(state.get("attempts", [])) + [{"start_step": start, "world_size": world,
                                                            "device": str(session.device), "bf16": bf16,
                                                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}]
    if rank == 0:
        _say(f"[reco train] {'resuming at step ' + str(start) if start else 'starting'}: {len(train)} training "
              f"images ({len(holdout)} held out), {num_classes} classes, {cfg.encoder}, {world} worker(s) on "
              f"{session.device}{' bf16' if bf16 else ''}, global batch {cfg.batch_size}")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    ds = PseudoLabelDataset(train, cfg, num_classes, so, mean, std)
    sampler = StepSampler(len(train), cfg.batch_size, rank, world, start, cfg.iterations, cfg.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.per_worker_batch, sampler=sampler,
                                         num_workers=cfg.loader_workers, pin_memory=session.device.type == "cuda",
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
    loader = session.prepare_loader(loader)
    fault = lc.get("fault") or {}
    step = start
    win_loss, win_n, win_t = torch.zeros((), dtype=torch.float64, device=session.device), 0, time.perf_counter()
    attempt_t0 = time.perf_counter()
    base_seconds = float(state.get("train_seconds", 0.0))
    model.train()
    for x, y in loader:
        x = x.to(session.device, non_blocking=True)
        y = y.to(session.device, non_blocking=True)
        with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        valid = (y != IGNORE).sum()
        loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=IGNORE, reduction="sum") / valid.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        win_loss += loss.detach()  # stays on the device: no per-step synchronisation
        win_n += 1
        last = step == cfg.iterations
        if step % cfg.log_every == 0 or last:
            t = session.all_reduce(torch.stack([win_loss, torch.tensor(float(win_n), dtype=torch.float64,
                                                                       device=session.device)])).cpu()
            dt = max(time.perf_counter() - win_t, 1e-9)
            sps = win_n / dt
            lrs = [g["lr"] for g in opt.param_groups]
            entry = {"step": step, "loss": float(t[0] / t[1]), "lr_head": lrs[0], "lr_encoder": lrs[1],
                     "steps_per_s": sps, "images_per_s": sps * cfg.batch_size,
                     "train_seconds": base_seconds + time.perf_counter() - attempt_t0}
            state["history"].append(entry)
            if rank == 0:
                _say(f"[reco train] step {step}/{cfg.iterations} loss {entry['loss']:.4f} lr {lrs[0]:.2e}/{lrs[1]:.2e} "
                      f"{sps:.2f} steps/s {sps * cfg.batch_size:.1f} img/s ETA {_fmt_eta((cfg.iterations - step) / sps)}")
            win_loss, win_n, win_t = torch.zeros_like(win_loss), 0, time.perf_counter()
        if step % cfg.checkpoint_every == 0 or last:
            metrics: Dict[str, Any] = {"step": step, "config_hash": lc["config_hash"],
                                       "loss": state["history"][-1]["loss"] if state["history"] else float("nan")}
            if holdout:
                session.broadcast_buffers(core)  # every rank evaluates with rank 0's BN statistics (the saved ones)
                metrics["holdout_miou"] = _holdout_miou(core, holdout, num_classes, cfg, session, mean, std, so, bf16)
                model.train()
            state["train_seconds"] = base_seconds + time.perf_counter() - attempt_t0
            state.update(step=step, config_hash=lc["config_hash"], classes=list(data.classes),
                         spec={"encoder": spec.encoder, "num_classes": spec.num_classes,
                               "output_stride": spec.output_stride, "decoder_channels": spec.decoder_channels},
                         base_size=cfg.base_size, mean=list(mean), std=list(std), world_size=world,
                         holdout=holdout_info, metrics=metrics)
            state["checkpoints"] = list(state.get("checkpoints", [])) + [{"name": f"{CKPT_PREFIX}{step:08d}", **metrics}]
            with tempfile.TemporaryDirectory(prefix="reco_ckpt_") as d:
                write_checkpoint(d, rank, core, opt, sched, state)
                session.report(metrics, d, f"{CKPT_PREFIX}{step:08d}")
        if fault and step == int(fault.get("step", -1)) and rank == int(fault.get("rank", 0)):
            marker = fault.get("marker")
            if not marker or not os.path.exists(marker):
                if marker:
                    with open(marker, "w") as f:
                        f.write(str(step))
                _say(f"[reco train] fault injection: rank {rank} exits at step {step}")
                os._exit(1)
    return state


# ---------------------------------------------------------------------------------------------
# the driver


class TrainingFailed(ReCoError, RuntimeError):
    """The Ray Train run failed beyond ``max_failures``; rerunning the same command resumes it."""


@dataclass
class TrainResult:
    run_uri: str
    model_uri: str
    report: Dict[str, Any] = field(default_factory=dict)


def _ray_storage(storage_uri: str, storage_options):
    """(storage_path, storage_filesystem) for ``RunConfig``: local paths as they are, fsspec URLs
    through a pyarrow ``PyFileSystem(FSSpecHandler(...))`` carrying the storage options."""
    from index.storage import is_url, local_path

    if not is_url(storage_uri):
        p = local_path(storage_uri).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return str(p), None
    import fsspec
    import pyarrow.fs as pafs

    fs, path = fsspec.core.url_to_fs(storage_uri, **dict(storage_options or {}))
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _check_settings(run_uri: str, settings: Dict[str, Any], storage_options) -> bool:
    """Refuse another configuration under the same run; True when the run already existed."""
    from index.storage import exists, join, read_bytes

    uri = join(run_uri, SETTINGS_FILE)
    if not exists(uri, storage_options):
        return False
    have = json.loads(read_bytes(uri, storage_options))
    if have.get("config_hash") != settings["config_hash"]:
        diff = sorted(k for k in set(have.get("train", {})) | set(settings["train"])
                      if have.get("train", {}).get(k) != settings["train"].get(k))
        if have.get("data_digest") != settings["data_digest"]:
            diff.append("pseudo-labels (data digest)")
        if have.get("encoder_weights_sha256") != settings["encoder_weights_sha256"]:
            diff.append("encoder weights file")
        raise ConfigError(f"run {run_uri} was trained with another configuration (config hash "
                          f"{have.get('config_hash')}, now {settings['config_hash']}; differs in: "
                          f"{', '.join(diff) or 'unknown'}): use another --name or storage path")
    return True


@dataclass
class TrainPlan:
    """Everything checked before Ray starts (:func:`plan_training`)."""

    labels_uri: str
    storage_uri: str
    name: str
    run_uri: str
    cfg: TrainConfig
    data: PseudoLabels
    settings: Dict[str, Any]
    storage_options: Dict[str, Any]
    n_train: int
    n_holdout: int

    @property
    def config_hash(self) -> str:
        return self.settings["config_hash"]


def plan_training(labels_uri: str, storage_uri: str, name: str, cfg: TrainConfig = TrainConfig(),
                  storage_options: Optional[Mapping[str, Any]] = None) -> TrainPlan:
    """Check a run before anything starts: the run name, the encoder, the weight file, the
    pseudo-labels (manifest present, usable rows, confidence maps when a threshold is set) and that
    ``storage_uri/name`` holds no run of another configuration. Writes nothing. Raises
    :class:`ConfigError` / ``FileNotFoundError`` (:class:`WeightsNotFoundError` for weights)."""
    from index.storage import fetch_to_cache, join
    from reco.segmodel import check_encoder, file_sha256

    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r}: give a plain run name (no '/')")
    check_encoder(cfg.encoder)
    weights_sha = None
    if cfg.encoder_weights:
        try:
            weights_sha = file_sha256(fetch_to_cache(cfg.encoder_weights, storage_options))
        except FileNotFoundError as exc:
            raise WeightsNotFoundError(f"encoder_weights {cfg.encoder_weights} does not exist") from exc
    data = read_pseudo_labels(labels_uri, storage_options)
    if cfg.confidence_threshold is not None:
        lacking = [s.id for s in data.samples if not s.confidence]
        if lacking:
            raise ConfigError(f"confidence_threshold is set but {len(lacking)} pseudo-labels have no confidence map "
                              f"(e.g. {lacking[0]}): pseudo-label with --confidence-maps, or drop the threshold")
    train, holdout = split_holdout(data.samples, cfg)
    chash, core = config_hash(cfg, data.digest, weights_sha)
    settings = {"config_hash": chash, **core, "labels_uri": labels_uri, "classes": list(data.classes),
                "pseudo_label_config_hash": data.settings.get("config_hash")}
    run_uri = join(storage_uri, name)
    _check_settings(run_uri, settings, storage_options)
    return TrainPlan(labels_uri, storage_uri, name, run_uri, cfg, data, settings, dict(storage_options or {}),
                     len(train), len(holdout))


def execute_training(plan: TrainPlan, fault: Optional[Mapping[str, Any]] = None) -> TrainResult:
    """Run a checked plan on Ray Train (Ray must be initialised), then export and report."""
    import yaml

    from index.lock import writer_lock
    from index.storage import join, write_bytes

    so, cfg, run_uri = plan.storage_options, plan.cfg, plan.run_uri
    with writer_lock(run_uri, "train", so):
        existed = _check_settings(run_uri, plan.settings, so)  # again, under the lock
        if not existed:
            write_bytes(join(run_uri, SETTINGS_FILE), json.dumps(plan.settings, indent=2).encode(), so)
        write_bytes(join(run_uri, CONFIG_FILE), yaml.safe_dump({"train": to_dict(cfg)}, sort_keys=False).encode(), so)
        logger.info("%s run %s: %d training images, %d held out, %d classes, config hash %s",
                    "resuming" if existed else "starting", run_uri, plan.n_train, plan.n_holdout,
                    len(plan.data.classes), plan.config_hash)
        loop_config = {"config": to_dict(cfg), "labels_uri": plan.labels_uri, "storage_options": so,
                       "data_digest": plan.data.digest, "config_hash": plan.config_hash, "fault": dict(fault or {}),
                       "encoder_weights_sha256": plan.settings["encoder_weights_sha256"]}
        t0 = time.perf_counter()
        result = _fit(loop_config, cfg, plan.storage_uri, plan.name, so)
        return _finish(result, plan, time.perf_counter() - t0)


def run_training(labels_uri: str, storage_uri: str, name: str, cfg: TrainConfig = TrainConfig(),
                 storage_options: Optional[Mapping[str, Any]] = None, fault: Optional[Mapping[str, Any]] = None,
                 ) -> TrainResult:
    """Train ReCo+ on the pseudo-labels at ``labels_uri`` into ``storage_uri/name`` with Ray Train
    (Ray must be initialised). Resumes a run of the same configuration; refuses another one.
    ``fault`` (tests only): ``{"step", "rank", "marker"}`` makes that rank exit once at that step."""
    return execute_training(plan_training(labels_uri, storage_uri, name, cfg, storage_options), fault)


def _fit(loop_config, cfg: TrainConfig, storage_uri: str, name: str, storage_options):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:
        from ray.train import TrainingFailedError
    except ImportError:  # pragma: no cover
        TrainingFailedError = RuntimeError  # type: ignore

    path, fs = _ray_storage(storage_uri, storage_options)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    holdout = cfg.selection == "holdout"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="holdout_miou" if holdout else "step",
                checkpoint_score_order="max"),
        ),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        msg = str(exc).strip().splitlines()
        raise TrainingFailed(f"training run {name} failed ({type(exc).__name__}: {msg[0] if msg else ''}); "
                             "rerun the same command to resume from its latest checkpoint") from exc


def _select(checkpoints: List[Tuple[Any, Dict[str, Any]]], cfg: TrainConfig) -> Tuple[Any, Dict[str, Any], str]:
    if not checkpoints:
        raise TrainingFailed("the run reported no checkpoint")
    last = max(checkpoints, key=lambda cm: cm[1].get("step", -1))
    if cfg.selection == "last":
        return last[0], last[1], "the last checkpoint (no selection)"
    best = max(checkpoints, key=lambda cm: (cm[1].get("holdout_miou", float("-inf")), cm[1].get("step", -1)))
    return best[0], best[1], ("the checkpoint with the best mIoU against the pseudo-labels of the held-out "
                              "slice of the pseudo-labelled training images (never the evaluation split)")


def _finish(result, plan: TrainPlan, fit_seconds: float) -> TrainResult:
    from index.storage import join, write_bytes

    cfg, data, settings, run_uri, storage_options = plan.cfg, plan.data, plan.settings, plan.run_uri, plan.storage_options
    n_train, n_holdout = plan.n_train, plan.n_holdout
    kept = list(result.best_checkpoints or [])
    if result.checkpoint is not None and not any(c.path == result.checkpoint.path for c, _ in kept):
        kept.append((result.checkpoint, dict(result.metrics or {})))
    chosen, chosen_metrics, rule = _select(kept, cfg)
    last_ckpt = max(kept, key=lambda cm: cm[1].get("step", -1))[0]
    with last_ckpt.as_directory() as d:
        final_state = read_checkpoint_state(d)
    with chosen.as_directory() as d:
        seg = checkpoint_segmodel(d)
        chosen_state = read_checkpoint_state(d)
    if chosen_state["config_hash"] != settings["config_hash"]:
        raise ConfigError(f"checkpoint {chosen.path} belongs to another configuration")
    chosen_name = os.path.basename(chosen.path.rstrip("/"))
    encoder_init = (f"ImageNet weights from {cfg.encoder_weights} (sha256 {settings['encoder_weights_sha256']})"
                    if cfg.encoder_weights else "random init (no encoder_weights given)")
    hist = final_state.get("history", [])
    steps_done = int(final_state["step"])
    train_s = float(final_state.get("train_seconds", 0.0))
    provenance = {"config_hash": settings["config_hash"], "config": to_dict(cfg), "labels_uri": settings["labels_uri"],
                  "pseudo_label_config_hash": settings["pseudo_label_config_hash"], "data_digest": data.digest,
                  "encoder_init": encoder_init, "checkpoint": chosen_name, "step": int(chosen_state["step"]),
                  "selection": cfg.selection, "selection_rule": rule, "run": run_uri,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
                  "segmentation_models_pytorch": _version("segmentation_models_pytorch"), "ray": _version("ray")}
    seg.training = provenance
    weights, meta = seg.to_bytes()
    model_uri = join(run_uri, MODEL_DIR)
    write_bytes(join(model_uri, "model.safetensors"), weights, storage_options)
    write_bytes(join(model_uri, "model.json"), meta, storage_options)
    ckpts = sorted(({"name": os.path.basename(c.path.rstrip("/")), "uri": join(run_uri, os.path.basename(c.path.rstrip("/"))),
                     **{k: v for k, v in m.items() if k != "config_hash"}} for c, m in kept),
                   key=lambda c: c.get("step", 0))
    report = {
        "run": run_uri, "config_hash": settings["config_hash"], "labels": settings["labels_uri"],
        "classes": list(data.classes), "train_images": n_train, "holdout_images": n_holdout,
        "holdout": final_state.get("holdout"),
        "encoder": cfg.encoder, "encoder_init": encoder_init,
        "selection": {"mode": cfg.selection, "rule": rule, "checkpoint": chosen_name,
                      "step": int(chosen_state["step"]), "holdout_miou": chosen_metrics.get("holdout_miou"),
                      "evaluation_split_used": False},
        "steps": steps_done, "iterations": cfg.iterations, "batch_size": cfg.batch_size,
        "attempts": final_state.get("attempts", []),
        "throughput": {"train_seconds": train_s,
                       "steps_per_s": steps_done / train_s if train_s else None,
                       "images_per_s": steps_done * cfg.batch_size / train_s if train_s else None,
                       "note": "train_seconds sums the loop time of every attempt (start-up excluded)"},
        "fit_seconds_this_call": fit_seconds,
        "checkpoints": ckpts, "checkpoint_history": final_state.get("checkpoints", []),
        "history": hist, "model": {"weights": join(model_uri, "model.safetensors"), "meta": join(model_uri, "model.json")},
        "plot": join(run_uri, PLOT_FILE),
    }
    write_bytes(join(run_uri, PLOT_FILE), render_curve(hist, f"ReCo+ {cfg.encoder} - {os.path.basename(run_uri)}"),
                storage_options)
    write_bytes(join(run_uri, REPORT_FILE), json.dumps(report, indent=2, default=str).encode(), storage_options)
    logger.info("trained %d/%d steps (%s); exported %s (%s) to %s", steps_done, cfg.iterations, encoder_init,
                chosen_name, cfg.selection, model_uri)
    return TrainResult(run_uri, model_uri, report)


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # pragma: no cover
        return None


def run_local(labels_uri: str, run_dir: str, cfg: TrainConfig, storage_options=None,
              fault: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The same training loop in this process, without Ray or DDP (``num_workers`` must be 1).
    For benchmarks: returns the final loop state (history with steps/s)."""
    if cfg.num_workers != 1:
        raise ConfigError("run_local runs one worker")
    data = read_pseudo_labels(labels_uri, storage_options)
    chash, _ = config_hash(cfg, data.digest, None)
    lc = {"labels_uri": labels_uri, "storage_options": dict(storage_options or {}),
          "data_digest": data.digest, "config_hash": chash, "fault": dict(fault or {})}
    os.makedirs(run_dir, exist_ok=True)
    return _train(lc, cfg, _LocalSession(cfg, run_dir))


# ---------------------------------------------------------------------------------------------
# the loss / learning-rate plot (PIL: matplotlib is not a dependency)


def render_curve(history: Sequence[Mapping[str, Any]], title: str = "training") -> bytes:
    """PNG bytes: loss over steps (top) and both learning rates over steps (bottom, log scale)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, gap, ph = 900, 640, 80, 20, 40, 60, 240
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((L, 12), title, fill="black", font=font)
    steps = [float(h["step"]) for h in history]
    panels = [("loss (mean over the log window, all workers)", [("loss", [h["loss"] for h in history], (31, 119, 180))], False),
              ("learning rate (log scale)", [("head", [h["lr_head"] for h in history], (214, 39, 40)),
                                             ("encoder", [h["lr_encoder"] for h in history], (44, 160, 44))], True)]
    for i, (label, series, logy) in enumerate(panels):
        top = T + i * (ph + gap)
        box = (L, top, W - R, top + ph)
        draw.rectangle(box, outline="black")
        draw.text((L, top - 14), label, fill="black", font=font)
        if not steps:
            draw.text((L + 10, top + 10), "no steps logged", fill="black", font=font)
            continue

        def tf(v: float) -> float:
            return math.log10(v) if logy else v

        vals = [tf(v) for _, ys, _ in series for v in ys if v == v and (v > 0 or not logy)]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        x0, x1 = min(steps), max(steps)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1

        def px(s: float, v: float) -> Tuple[float, float]:
            return (L + (s - x0) / (x1 - x0) * (W - R - L), top + ph - (tf(v) - lo) / (hi - lo) * ph)

        for k in range(5):
            yv = lo + (hi - lo) * k / 4
            yy = top + ph - ph * k / 4
            draw.line((L - 4, yy, L, yy), fill="black")
            draw.text((4, yy - 6), f"{(10 ** yv if logy else yv):.3g}", fill="black", font=font)
            xv = round(x0 + (x1 - x0) * k / 4)  # integer steps, drawn where they are
            xx = px(xv, hi if not logy else 10 ** hi)[0]
            draw.line((xx, top + ph, xx, top + ph + 4), fill="black")
            draw.text((xx - 12, top + ph + 6), f"{xv:d}", fill="black", font=font)
        for j, (name, ys, colour) in enumerate(series):
            pts = [px(s, v) for s, v in zip(steps, ys) if v == v and (v > 0 or not logy)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            elif pts:
                draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
            draw.text((W - R - 120, top + 6 + 12 * j), name, fill=colour, font=font)
        draw.text(((L + W - R) // 2 - 10, top + ph + 20), "step", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
