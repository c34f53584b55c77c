"""Ray Data segmentation: an actor pool of Segmenters writing label maps and overlays.

Storage rule (:mod:`index.storage`): the bank reaches the actors as bytes (read once on the
driver from its URI), images and masks are read by URI, and labels/overlays are written to the
output URI (a local path on a shared file system, or ``s3://...``) under names derived from each
input's id (:func:`index.labels.output_name`), never from the bare file stem.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from reco.bank import ConceptBank
from reco.config import SegmenterConfig
from reco.errors import ImageDecodeError
from reco.metrics import ConfusionMatrix
from reco.segmenter import Segmenter
from reco.visualize import overlay, side_by_side

from . import faults
from .config import ActorConfig
from .datamap import actor_pool_map
from .models import EncoderSpec, autocast_for

logger = logging.getLogger(__name__)


class SegmentUDF:
    """``map_batches`` callable class: rows {id, uri, mask_uri} -> per-image status and confusion.

    ``label_map[i]`` is the dataset id written for output class ``i`` of the segmenter (so
    several concepts, e.g. stuff concepts, can map to one dataset class such as background).
    Statuses: ``ok``; ``skipped`` (bad input: undecodable image or mask, skipped for good);
    ``failed`` (an I/O error: transient, to be retried by a rerun). Rows may carry ``overlay``
    (bool): whether to render that image's colour overlay (default: ``write_overlays``).
    Outputs per image: ``labels/ID.png`` (class ids: palette PNG, 16-bit beyond 256 classes),
    ``confidence/ID.png`` (max score x 255, with ``confidence_maps``), ``overlays/ID.png``; the
    row carries classes present with their pixel shares and the mean confidence.
    """

    def __init__(
        self,
        bank_bytes: bytes,
        encoders: EncoderSpec,
        config: SegmenterConfig,
        label_map: Sequence[int],
        num_classes: int,
        ignore_index: Optional[int],
        out_uri: Optional[str],
        threads: Optional[int] = None,
        write_overlays: bool = True,
        storage_options: Optional[Mapping[str, Any]] = None,
        confidence_maps: bool = False,
    ):
        dense, clip, self.device = encoders.load(threads)
        bank = ConceptBank.from_bytes(bank_bytes, "bank sent by the driver")
        self.segmenter = Segmenter(bank, dense, clip, config)
        if len(label_map) != len(self.segmenter.class_names):
            raise ValueError(
                f"label_map has {len(label_map)} entries for {len(self.segmenter.class_names)} output classes"
            )
        self.lut = np.asarray(label_map, dtype=np.int64)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.out = out_uri
        self.write_overlays = write_overlays
        self.storage_options = dict(storage_options or {})
        self.confidence_maps = confidence_maps

    def _mask(self, mask_uri: str, shape) -> np.ndarray:
        from index.labels import decode_labels
        from index.storage import read_bytes

        try:
            gt = decode_labels(read_bytes(mask_uri, self.storage_options))
        except (ValueError, SyntaxError) as exc:  # PIL raises SyntaxError on some broken PNGs
            raise ImageDecodeError(f"{mask_uri}: not a single-channel label image ({exc})") from exc
        if gt.shape != shape:
            raise ImageDecodeError(f"{mask_uri}: mask {gt.shape} differs from image {shape}")
        return gt

    def _write(
        self, item_id: str, img, pred: np.ndarray, gt: Optional[np.ndarray], scores: torch.Tensor, with_overlay: bool
    ) -> Dict[str, str]:
        """Write the label PNG (+ confidence PNG, + overlay) of one image under the output URI;
        returns their paths relative to it."""
        from index.labels import encode_labels, output_name
        from index.storage import join, write_bytes

        if self.out is None:
            return {"label": "", "confidence": "", "overlay": ""}
        import io

        from PIL import Image

        rel = output_name(item_id)
        paths = {"label": f"labels/{rel}", "confidence": "", "overlay": ""}
        write_bytes(join(self.out, paths["label"]), encode_labels(pred), self.storage_options)
        if self.confidence_maps:
            conf = (scores.max(dim=0).values.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(conf, "L").save(buf, format="PNG")
            paths["confidence"] = f"confidence/{rel}"
            write_bytes(join(self.out, paths["confidence"]), buf.getvalue(), self.storage_options)
        if with_overlay:
            panels = [img, overlay(img, pred)] + ([overlay(img, gt)] if gt is not None else [])
            buf = io.BytesIO()
            side_by_side(*panels).save(buf, format="PNG")
            paths["overlay"] = f"overlays/{rel}"
            write_bytes(join(self.out, paths["overlay"]), buf.getvalue(), self.storage_options)
        return paths

    def _row(self, status: str, error: str = "", **kw) -> Dict[str, object]:
        row: Dict[str, object] = {
            "status": status,
            "error": error,
            "label": "",
            "confidence": "",
            "overlay": "",
            "seconds": 0.0,
            "mean_confidence": float("nan"),
            "width": 0,
            "height": 0,
            "classes": "[]",
            "shares": "[]",
            "mode": self.segmenter.mode,
            "confusion": np.zeros(self.num_classes**2, dtype=np.int64),
        }
        row.update(kw)
        return row

    def _failure(self, name: str, exc: BaseException) -> Dict[str, object]:
        """A row for an input that could not be used: ``skipped`` (bad input, for good) or
        ``failed`` (transient: a rerun retries it), by :func:`index.sources.classify_failure`."""
        from index.sources import BAD, classify_failure

        kind, reason = classify_failure(exc)
        status = "skipped" if kind == BAD else "failed"
        logger.warning(
            "%s %s: %s", "skipped" if status == "skipped" else "failed (transient, rerun to retry)", name, reason
        )
        return self._row(status, reason)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from index.readers import read_image

        uris = [str(u) for u in batch["uri"]]
        ids = [str(i) for i in batch["id"]] if "id" in batch else uris
        masks = [str(m) for m in batch["mask_uri"]] if "mask_uri" in batch else [""] * len(uris)
        overlay_flags = batch["overlay"] if "overlay" in batch else [self.write_overlays] * len(uris)
        rows: List[Optional[Dict[str, object]]] = [None] * len(uris)
        images, gts, todo = [], [], []
        t0 = time.perf_counter()
        for i, (uri, mask) in enumerate(zip(uris, masks)):
            try:
                img = read_image(uri, self.storage_options)
                gt = self._mask(mask, (img.size[1], img.size[0])) if mask else None
            except Exception as exc:  # noqa: BLE001 - classified by the one rule, never raised past a row
                rows[i] = self._failure(uri, exc)
                continue
            images.append(img)
            gts.append(gt)
            todo.append(i)
        if images:
            with autocast_for(self.device):
                outs = self.segmenter(images)
            per_image = (time.perf_counter() - t0) / len(images)
            for i, img, gt, out in zip(todo, images, gts, outs):
                t1 = time.perf_counter()
                pred = self.lut[out.labels.numpy()]
                cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
                if gt is not None:
                    c = ConfusionMatrix(self.num_classes, self.ignore_index)
                    c.update(torch.from_numpy(pred), torch.from_numpy(gt))
                    cm = c.matrix.numpy()
                try:
                    paths = self._write(ids[i], img, pred, gt, out.scores, bool(overlay_flags[i]))
                except Exception as exc:  # noqa: BLE001 - an output write that failed is transient
                    rows[i] = self._failure(ids[i], exc)
                    continue
                classes, counts = np.unique(pred, return_counts=True)
                conf = out.scores.max(dim=0).values
                rows[i] = self._row(
                    "ok",
                    confusion=cm.reshape(-1),
                    mode=out.mode,
                    seconds=per_image + time.perf_counter() - t1,
                    width=img.size[0],
                    height=img.size[1],
                    classes=json.dumps(classes.tolist()),
                    shares=json.dumps((counts / pred.size).round(6).tolist()),
                    mean_confidence=float(conf.mean()),
                    **paths,
                )
        done = [r for r in rows if r is not None]
        assert len(done) == len(uris)
        faults.fire("segment.batch", len(uris))
        out = {"id": np.array(ids, dtype=object), "uri": np.array(uris, dtype=object)}
        for key in ("status", "error", "label", "confidence", "overlay", "mode", "classes", "shares"):
            out[key] = np.array([r[key] for r in done], dtype=object)
        for key, dtype in (
            ("seconds", np.float64),
            ("mean_confidence", np.float64),
            ("width", np.int32),
            ("height", np.int32),
        ):
            out[key] = np.array([r[key] for r in done], dtype=dtype)
        out["confusion"] = np.stack([r["confusion"] for r in done]).astype(np.int64)
        import resource

        out["peak_rss_mb"] = np.full(len(done), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
        return out


def segmentation_dataset(
    items: Sequence[Mapping[str, Any]],
    bank_bytes: bytes,
    encoders: EncoderSpec,
    config: SegmenterConfig,
    label_map: Sequence[int],
    num_classes: int,
    ignore_index: Optional[int],
    out_uri: Optional[str],
    actors: ActorConfig = ActorConfig(),
    storage_options: Optional[Mapping[str, Any]] = None,
    write_overlays: bool = True,
    confidence_maps: bool = False,
):
    """The lazy Ray Dataset of :class:`SegmentUDF` rows for ``items`` ({id, uri, mask_uri?,
    overlay?}), in batch-aligned blocks (:mod:`cluster.datamap`); callers stream it
    (``iter_batches``) or take it whole."""
    rows = [
        {
            "id": str(i["id"]),
            "uri": str(i["uri"]),
            "mask_uri": str(i.get("mask_uri") or ""),
            "overlay": bool(i.get("overlay", write_overlays)),
        }
        for i in items
    ]
    return actor_pool_map(
        rows,
        SegmentUDF,
        actors,
        dict(
            bank_bytes=bank_bytes,
            encoders=encoders,
            config=config,
            label_map=list(label_map),
            num_classes=num_classes,
            ignore_index=ignore_index,
            out_uri=out_uri,
            threads=actors.torch_threads,
            write_overlays=write_overlays,
            storage_options=dict(storage_options or {}),
            confidence_maps=confidence_maps,
        ),
    )


def default_id(uri: str) -> str:
    """An item id from its uri when the caller gives none: the path without scheme or leading /."""
    return str(uri).split("://", 1)[-1].lstrip("/")


def run_segmentation(
    items: Sequence[Mapping[str, str]],
    bank_uri: str,
    *args: Any,
    storage_options: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> List[Dict[str, object]]:
    """Segment ``items`` ({id, uri, mask_uri}) with a Ray Data actor pool; one row per image.

    ``bank_uri`` is read here, on the driver, and its bytes are shipped to the actors; ``id``
    (default: the uri's path) names the outputs under ``out_uri``. The other arguments are those of
    :func:`segmentation_dataset` after ``bank_bytes`` (encoders, config, label_map, num_classes,
    ignore_index, out_uri, actors, ..., write_overlays), passed on as given.
    """
    from index.storage import join, read_bytes

    if not items:
        return []
    items = [dict(i, id=str(i.get("id") or default_id(i["uri"]))) for i in items]
    ids = [i["id"] for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique (they name the output files)")
    bank_bytes = read_bytes(join(bank_uri, "bank.safetensors"), storage_options)
    ds = segmentation_dataset(items, bank_bytes, *args, storage_options=storage_options, **options)
    return ds.take_all()
