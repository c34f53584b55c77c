"""Segmentation quality on an evaluation dataset: protocols, per-image scoring, baselines, the
supervised-prototype ceiling and the in-domain exemplar protocol; in this process or on Ray Data.

Every image, whichever path runs it, goes through one :class:`Evaluator` (protocol -> segmenter
-> label map -> confusion matrix), so the in-process and the Ray Data paths produce the same
confusion matrices (``tests/test_evaluate.py`` checks it). Masks are read with the dataset's own
label map (:func:`index.datasets.read_mask`), never as raw ids. A trained ReCo+ model goes through
the same :class:`Evaluator` behind :class:`ModelSegmenter`, so ReCo and ReCo+ are scored alike.

Protocols (:class:`Protocol`):

``paper``  the ReCo / STEGO evaluation: the image's shorter side is resized to ``size`` (bicubic)
           and centre-cropped to ``size x size``; the mask is resized the same way with nearest
           neighbours; the prediction is made on the crop.
``full``   the image at its own resolution (the segmenter scores its views, sliding windows by
           default or the whole image at ``image_size`` with ``segmenter.window: null``, and
           upsamples the scores back); the mask as it is.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from index.datasets import DatasetSpec, EvalItem, read_mask
from reco.errors import ConfigError, ImageDecodeError
from reco.metrics import ConfusionMatrix
from reco.protocols import (  # noqa: F401
    archives_from_labels,
    class_prior_map,
    coverage,
    prior_prediction,
    supervised_references,  # re-exported for callers
)

logger = logging.getLogger(__name__)

PROTOCOLS = ("paper", "full")
BACKGROUND = "background"
#: background thresholds tried by ``background_threshold="cv"`` (on sigmoid-calibrated scores)
THRESHOLD_GRID = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


# ----------------------------------------------------------------------------------------------
# protocol


@dataclass(frozen=True)
class Protocol:
    name: str = "paper"
    size: int = 320

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.name!r}; valid: {', '.join(PROTOCOLS)}")
        if self.size < 14:
            raise ConfigError(f"protocol size must be >= 14, got {self.size}")

    def describe(self) -> str:
        if self.name == "paper":
            return (
                f"paper: shorter side {self.size} px (bicubic), centre crop {self.size}x{self.size}, "
                f"labels resized with nearest neighbours"
            )
        return (
            "full resolution (features of the segmenter's views: sliding windows (segmenter.window) or the whole "
            "image at segmenter.image_size; scores upsampled to the image)"
        )


def apply_protocol(image, mask: np.ndarray, protocol: Protocol):
    """(PIL image, (H, W) mask) -> the pair the protocol scores."""
    from PIL import Image

    if protocol.name == "full":
        return image, mask
    size = protocol.size
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left, top, left + size, top + size)
    img = image.resize((nw, nh), Image.BICUBIC).crop(box)
    m = Image.fromarray(mask.astype(np.int32), mode="I").resize((nw, nh), Image.NEAREST).crop(box)
    return img, np.asarray(m).astype(np.int64)


def load_pair(spec: DatasetSpec, image_uri: str, mask_uri: str, storage_options=None):
    """Decode one image (RGB PIL) and its mask (train ids of ``spec``); sizes must agree."""
    from index.readers import read_image
    from index.storage import read_bytes

    img = read_image(image_uri, storage_options)
    mask = read_mask(spec, read_bytes(mask_uri, storage_options))
    if mask.shape != (img.size[1], img.size[0]):
        raise ImageDecodeError(
            f"{mask_uri}: mask {mask.shape[1]}x{mask.shape[0]} differs from image {img.size[0]}x{img.size[1]}"
        )
    return img, mask


# ----------------------------------------------------------------------------------------------
# a per-image feature cache (one encoder pass per distinct input in a run)


class FeatureCache(torch.nn.Module):
    """Wraps a dense encoder: every distinct input image tensor (by content digest) is encoded
    once; later calls with the same input reuse the features. Looks like the encoder it wraps
    (name, weights, patch size, ...), so banks and segmenters accept it. ``encoder_seconds`` is
    the time spent in the real encoder, ``hits`` / ``misses`` count images."""

    def __init__(self, dense, store: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.inner = dense
        for attr in ("name", "weights", "weights_id", "weights_spec", "patch_size", "embed_dim", "num_prefix_tokens"):
            if hasattr(dense, attr):
                setattr(self, attr, getattr(dense, attr))
        self.cache: Dict[str, torch.Tensor] = {} if store is None else store
        self.hits = self.misses = 0
        self.encoder_seconds = 0.0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.normalize(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import hashlib

        keys = []
        for x in images:
            arr = x.detach().float().cpu().contiguous().numpy()
            keys.append(hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest())
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        todo = [i for j, i in enumerate(todo) if keys[i] not in {keys[t] for t in todo[:j]}]
        if todo:
            t0 = time.perf_counter()
            feats = self.inner(images[todo])
            self.encoder_seconds += time.perf_counter() - t0
            for i, f in zip(todo, feats):
                self.cache[keys[i]] = f.detach().cpu()
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([self.cache[k] for k in keys]).to(images.device)


# ----------------------------------------------------------------------------------------------
# label maps: segmenter output classes -> dataset classes


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def label_map_for(
    output_names: Sequence[str],
    spec: DatasetSpec,
    background_concepts: Sequence[str] = (),
    class_map: Optional[Mapping[str, str]] = None,
) -> List[int]:
    """The dataset class id of each segmenter output class.

    A concept maps to the dataset class of the same name (case, ``_`` and ``-`` ignored), to the
    class ``class_map`` names for it, or, when listed in ``background_concepts`` (or when it is
    the segmenter's threshold class ``background``), to the dataset's ``background`` class.
    Anything else is a :class:`ConfigError` naming the concepts that fit no class."""
    by_name = {_norm(c): i for i, c in enumerate(spec.classes)}
    bg = set(_norm(b) for b in background_concepts)
    cmap = {_norm(k): _norm(v) for k, v in (class_map or {}).items()}
    out, missing = [], []
    for n in output_names:
        key = _norm(n)
        target = cmap.get(key, BACKGROUND if (key in bg or key == BACKGROUND) else key)
        if target not in by_name:
            missing.append(n)
            out.append(-1)
        else:
            out.append(by_name[target])
    if missing:
        has_bg = BACKGROUND in by_name
        raise ConfigError(
            f"concept(s) {missing} match no {spec.name} class ({', '.join(spec.classes)})"
            + (
                ""
                if has_bg
                else f"; {spec.name} has no background class, so a background threshold or "
                "background concepts cannot be scored on it"
            )
            + "; map them with --class-map CONCEPT=CLASS or --background-concepts"
        )
    return out


# ----------------------------------------------------------------------------------------------
# one image


@dataclass
class ImageResult:
    confusion: np.ndarray  # (N, N) int64, rows truth
    prediction: np.ndarray  # (H, W) dataset ids at the protocol's resolution
    truth: np.ndarray  # (H, W) dataset ids (ignore included)
    image: Any  # the PIL image the protocol scored
    seconds: float
    mode: str


class Evaluator:
    """Protocol -> segmenter -> label map -> confusion, for one image at a time."""

    def __init__(self, segmenter, spec: DatasetSpec, label_map: Sequence[int], protocol: Protocol = Protocol()):
        if len(label_map) != len(segmenter.class_names):
            raise ValueError(f"label_map has {len(label_map)} entries for {len(segmenter.class_names)} classes")
        self.segmenter = segmenter
        self.spec = spec
        self.lut = np.asarray(label_map, dtype=np.int64)
        self.protocol = protocol

    def __call__(self, image, mask: np.ndarray, image_id: Optional[str] = None) -> ImageResult:
        img, truth = apply_protocol(image, mask, self.protocol)
        t0 = time.perf_counter()
        out = self.segmenter([img], None if image_id is None else [image_id])[0]
        seconds = time.perf_counter() - t0
        pred = self.lut[out.labels.numpy()]
        return ImageResult(confusion(pred, truth, self.spec), pred, truth, img, seconds, out.mode)


class ModelSegmenter:
    """A trained ReCo+ model (:class:`reco.segmodel.SegModel`) behind the segmenter interface the
    :class:`Evaluator` calls: ``class_names`` (the model's classes: the bank's concept names it
    was trained on) and ``__call__([image], ids) -> [SegmentationOutput]`` with labels at the
    image's own size (the model resizes to its ``base_size`` and upsamples its logits back)."""

    def __init__(self, model, source: str = ""):
        self.model = model
        self.class_names = tuple(model.class_names)
        self.mode = f"ReCo+ model {source}".strip()

    def __call__(self, images, ids=None):
        from reco.segmenter import SegmentationOutput

        out = []
        for img in images:
            logits = self.model.logits(img)
            out.append(SegmentationOutput(logits.argmax(0).long(), logits, self.class_names, self.mode))
        return out


def confusion(pred: np.ndarray, truth: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    cm = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    cm.update(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(truth)))
    return cm.matrix.numpy()


def metrics_of(matrix: np.ndarray, spec: DatasetSpec) -> Dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU and the confusion matrix (JSON-ready)."""
    cm = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    cm.matrix = torch.as_tensor(np.asarray(matrix, dtype=np.int64)).reshape(spec.num_classes, spec.num_classes)
    m = cm.compute(list(spec.classes))
    return {
        "miou": m.miou,
        "pixel_accuracy": m.pixel_accuracy,
        "iou": m.as_dict()["iou"],
        "confusion_matrix": cm.matrix.tolist(),
    }


# ----------------------------------------------------------------------------------------------
# overlays


def render_overlay(image, truth: np.ndarray, pred: np.ndarray, spec: DatasetSpec):
    """image | ground truth | prediction, and a colour legend of the classes shown."""
    from PIL import Image, ImageDraw

    from reco.visualize import colorize, legend, side_by_side

    ids = sorted(set(np.unique(truth).tolist()) | set(np.unique(pred).tolist()))
    ids = [i for i in ids if 0 <= i < spec.num_classes]
    panels = [image.convert("RGB"), colorize(truth, spec.ignore_index), colorize(pred, spec.ignore_index)]
    out = side_by_side(*panels, legend([spec.classes[i] for i in ids], ids))
    canvas = Image.new("RGB", (out.width, out.height + 14), (255, 255, 255))
    canvas.paste(out, (0, 14))
    draw = ImageDraw.Draw(canvas)
    for x, text in zip((0, image.width, 2 * image.width), ("image", "ground truth", "prediction")):
        draw.text((x + 4, 1), text, fill=(0, 0, 0))
    return canvas


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# in this process


def run_in_process(
    items: Sequence[EvalItem],
    evaluator: Evaluator,
    overlays: int = 0,
    out_uri: Optional[str] = None,
    storage_options=None,
) -> List[Dict[str, Any]]:
    """Evaluate ``items`` one by one; one row per image (status, seconds, flat confusion, overlay)."""
    from index.labels import output_name
    from index.sources import BAD, classify_failure
    from index.storage import join, write_bytes

    rows = []
    n = evaluator.spec.num_classes
    for i, it in enumerate(items):
        row: Dict[str, Any] = {
            "id": it.id,
            "uri": it.image_uri,
            "status": "ok",
            "error": "",
            "seconds": 0.0,
            "overlay": "",
            "confusion": np.zeros(n * n, dtype=np.int64),
            "mode": "",
        }
        try:
            img, mask = load_pair(evaluator.spec, it.image_uri, it.mask_uri, storage_options)
        except Exception as exc:  # noqa: BLE001 - classified by the one rule
            kind, reason = classify_failure(exc)
            row.update(status="skipped" if kind == BAD else "failed", error=reason)
            logger.warning("%s %s: %s", row["status"], it.id, reason)
            rows.append(row)
            continue
        res = evaluator(img, mask, it.id)
        row.update(seconds=res.seconds, confusion=res.confusion.reshape(-1), mode=res.mode)
        if out_uri is not None and i < overlays:
            rel = "overlays/" + output_name(it.id)
            write_bytes(
                join(out_uri, rel),
                png_bytes(render_overlay(res.image, res.truth, res.prediction, evaluator.spec)),
                storage_options,
            )
            row["overlay"] = rel
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# on Ray Data


class EvaluateUDF:
    """``map_batches`` callable class: rows {id, uri, mask_uri, overlay} -> rows with status,
    error, seconds, mode, overlay path and the flat (N*N) confusion matrix. Builds the same
    :class:`Evaluator` as the in-process path from the bank bytes and the encoder spec, or, with
    ``model_bytes`` ((model.safetensors, model.json) bytes), from a trained ReCo+ model."""

    def __init__(
        self,
        bank_bytes: Optional[bytes],
        encoders,
        config,
        spec: DatasetSpec,
        label_map: Sequence[int],
        protocol: Protocol,
        out_uri: Optional[str] = None,
        threads: Optional[int] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        model_bytes: Optional[Tuple[bytes, Optional[bytes]]] = None,
        model_source: str = "",
    ):
        if model_bytes is not None:
            from reco.segmodel import SegModel

            if threads:
                torch.set_num_threads(int(threads))
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = SegModel.from_bytes(
                model_bytes[0], model_bytes[1], model_source or "model sent by the driver", self.device
            )
            segmenter: Any = ModelSegmenter(model, model_source)
        else:
            from reco.bank import ConceptBank
            from reco.segmenter import Segmenter

            dense, clip, self.device = encoders.load(threads)
            bank = ConceptBank.from_bytes(bank_bytes, "bank sent by the driver")
            segmenter = Segmenter(bank, dense, clip, config)
        self.evaluator = Evaluator(segmenter, spec, label_map, protocol)
        self.out = out_uri
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from .models import autocast_for

        ids = [str(i) for i in batch["id"]]
        items = [EvalItem(i, str(u), str(m)) for i, u, m in zip(ids, batch["uri"], batch["mask_uri"])]
        flags = [bool(f) for f in batch["overlay"]]
        rows = []
        with autocast_for(self.device):
            for it, flag in zip(items, flags):
                rows += run_in_process([it], self.evaluator, 1 if flag else 0, self.out, self.storage_options)
        out: Dict[str, np.ndarray] = {}
        for key in ("id", "uri", "status", "error", "overlay", "mode"):
            out[key] = np.array([r[key] for r in rows], dtype=object)
        out["seconds"] = np.array([r["seconds"] for r in rows], dtype=np.float64)
        out["confusion"] = np.stack([r["confusion"] for r in rows]).astype(np.int64)
        return out


def run_on_ray(items: Sequence[EvalItem], actors, overlays: int = 0, **udf: Any) -> List[Dict[str, Any]]:
    """The Ray Data path (Ray must be running): an actor pool of :class:`EvaluateUDF` (a bank and
    its encoders, or a trained ReCo+ model given as ``model_bytes``). ``udf``: the constructor
    arguments of :class:`EvaluateUDF` but ``threads``, which ``actors`` sets; the first
    ``overlays`` items also get an overlay."""
    import ray.data

    rows = [
        {"id": it.id, "uri": it.image_uri, "mask_uri": it.mask_uri, "overlay": i < overlays}
        for i, it in enumerate(items)
    ]
    if not rows:
        return []
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // max(actors.batch_size, 1), 512)))
    ds = ds.map_batches(
        EvaluateUDF,
        fn_constructor_kwargs=dict(
            udf,
            label_map=list(udf["label_map"]),
            storage_options=dict(udf.get("storage_options") or {}),
            threads=actors.torch_threads,
        ),
        batch_size=actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.num_actors),
        num_cpus=actors.cpus_per_actor,
        num_gpus=actors.gpus_per_actor or None,
    )
    order = {it.id: i for i, it in enumerate(items)}
    return sorted(ds.take_all(), key=lambda r: order[str(r["id"])])


def summarize(rows: Sequence[Mapping[str, Any]], spec: DatasetSpec) -> Dict[str, Any]:
    """Metrics of the whole set from the per-image rows (one confusion matrix summed)."""
    n = spec.num_classes
    total = np.zeros((n, n), dtype=np.int64)
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        total += np.asarray(r["confusion"], dtype=np.int64).reshape(n, n)
    out = metrics_of(total, spec)
    out["images"] = {
        "evaluated": len(ok),
        "skipped": {str(r["id"]): str(r["error"]) for r in rows if r["status"] == "skipped"},
        "failed_transient": {str(r["id"]): str(r["error"]) for r in rows if r["status"] == "failed"},
    }
    out["seconds_per_image"] = float(np.mean([float(r["seconds"]) for r in ok])) if ok else None
    return out


# ----------------------------------------------------------------------------------------------
# the in-domain exemplar protocol (archives from a labelled half of the same dataset)


def split_halves(items: Sequence[EvalItem]) -> Tuple[List[EvalItem], List[EvalItem]]:
    """Deterministic split into (archive half, evaluation half): items sorted by id, the first
    ceil(n/2) form the archive half. Contiguous halves, not alternate items: the CamVid frames
    are a video, and alternate frames would put a near-duplicate of every evaluation image
    into the archive half."""
    items = sorted(items, key=lambda it: it.id)
    cut = (len(items) + 1) // 2
    return items[:cut], items[cut:]


# ----------------------------------------------------------------------------------------------
# background threshold chosen by cross-validation over the evaluated images


@dataclass
class CachedScores:
    """What re-thresholding needs of one image: its token logits, truth and output size."""

    id: str
    logits: torch.Tensor  # (n, C, h, w): one row per view (the whole image, or its windows)
    truth: np.ndarray
    seconds: float
    boxes: List[Tuple[int, int, int, int]]  # the views in image pixels (Segmenter.views)
    image_hw: Tuple[int, int]
    image: Any = None

    def scores(self, segmenter) -> torch.Tensor:
        """(C', H, W) scores of ``segmenter`` at the truth's resolution from the cached logits."""
        return segmenter.assemble(self.logits, self.boxes, self.image_hw, self.truth.shape)


def threshold_cv(
    cached: Sequence[CachedScores],
    segmenter_for,
    spec: DatasetSpec,
    label_map_for_threshold,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> Tuple[np.ndarray, List[float], Dict[str, Any]]:
    """Choose the background threshold on one half of the images (alternate images by id) and
    score the other half with it, both ways; returns (summed confusion, the two thresholds,
    the per-threshold mIoU of each fold). ``segmenter_for(t)`` is a Segmenter with threshold t;
    ``label_map_for_threshold(seg)`` its label map."""
    folds = [list(range(0, len(cached), 2)), list(range(1, len(cached), 2))]
    segs = {t: segmenter_for(t) for t in grid}
    luts = {t: np.asarray(label_map_for_threshold(segs[t]), dtype=np.int64) for t in grid}

    def matrix(t: float, idx: Sequence[int]) -> np.ndarray:
        total = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
        for i in idx:
            c = cached[i]
            s = c.scores(segs[t])
            labels, _ = segs[t].labels(s, None)
            total += confusion(luts[t][labels.numpy()], c.truth, spec)
        return total

    chosen, total, sweep = [], np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64), {}
    for a, b in ((0, 1), (1, 0)):
        if not folds[a] or not folds[b]:
            continue
        scores = {t: metrics_of(matrix(t, folds[a]), spec)["miou"] for t in grid}
        best = max(grid, key=lambda t: (scores[t], -t))
        chosen.append(best)
        sweep[f"fold{a}"] = scores
        total += matrix(best, folds[b])
    return total, chosen, sweep


@dataclass
class EvalRun:
    """A finished evaluation: the report sections the job prints and writes."""

    metrics: Dict[str, Any]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)


def to_json(obj: Any) -> Any:
    """JSON-ready copy (numpy/tensor values converted, NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if v != v else v
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_json(obj.tolist())
    return obj


def dumps(report: Mapping[str, Any]) -> str:
    return json.dumps(to_json(report), indent=2)
