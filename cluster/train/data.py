"""Training data: the rows of a ``reco pseudo-label`` output, the hold-out split, augmentation and
the step-indexed sampler.

Every worker reads the manifest itself (storage URI rule) and draws its batches with a
*step-indexed* sampler: global sample position ``p = step * batch_size + j`` maps to epoch
``p // n`` (a seeded permutation of the ``n`` training images) and rank ``j // (batch_size /
num_workers)``; the augmentation of position ``p`` is seeded by ``(seed, p)``. A run resumed from
step ``s`` therefore sees exactly the batches an uninterrupted run sees from step ``s`` on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from reco.errors import ConfigError

from .config import IGNORE, TrainConfig

logger = logging.getLogger(__name__)


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
    from cluster.pseudo_label import MANIFEST_DIR, committed_rows
    from cluster.pseudo_label import SETTINGS_FILE as PL_SETTINGS
    from index.storage import join, read_bytes

    try:
        settings = json.loads(read_bytes(join(labels_uri, PL_SETTINGS), storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{labels_uri} is not a pseudo-label output (no {PL_SETTINGS}): run `reco pseudo-label` first"
        ) from None
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
            seen[str(r["id"])] = Sample(
                str(r["id"]), str(r["uri"]), join(labels_uri, r["label"]), join(labels_uri, conf) if conf else ""
            )
    if not seen:
        raise ConfigError(
            f"the manifest of {labels_uri} has {len(rows)} rows but none with status ok: nothing to train on"
        )
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


def target_ids(lab: np.ndarray, conf: Optional[np.ndarray], num_classes: int, threshold: Optional[float]) -> np.ndarray:
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
            img = ImageEnhance.Brightness(img).enhance(
                rng.uniform(1 - cfg.jitter_brightness, 1 + cfg.jitter_brightness)
            )
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


def augment(
    img, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, mean: Sequence[float], std: Sequence[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
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
    arr, y = arr[top : top + c, left : left + c], y[top : top + c, left : left + c]
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

    def __init__(
        self,
        samples: Sequence[Sample],
        cfg: TrainConfig,
        num_classes: int,
        storage_options=None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
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
                logger.warning(
                    "training sample %s unusable (%s: %s); using the next one", s.id, type(exc).__name__, exc
                )
                last = exc
        else:
            raise RuntimeError(f"4 consecutive training samples from {index} are unusable: {last}")
        y = target_ids(lab, conf, self.num_classes, self.cfg.confidence_threshold)
        return augment(img, y, self.cfg, rng, self.mean, self.std)


class StepSampler(torch.utils.data.Sampler):
    """Yields ``(index, position)`` for this rank's share of the global batches of steps
    ``[start_step, end_step)``: position ``p = step * global_batch + j``; rank ``r`` takes
    ``j`` in ``[r * b, (r + 1) * b)``; index = epoch ``p // n``'s seeded permutation at ``p % n``."""

    def __init__(
        self, n: int, global_batch: int, rank: int, world_size: int, start_step: int, end_step: int, seed: int
    ):
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
