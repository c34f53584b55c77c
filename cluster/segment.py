"""Ray Data segmentation: an actor pool of Segmenters writing label maps and overlays.

Storage rule (:mod:`index.storage`): the bank reaches the actors as bytes (read once on the
driver from its URI), images and masks are read by URI, and labels/overlays are written to the
output URI (a local path on a shared file system, or ``s3://...``) under names derived from each
input's id (:func:`index.labels.output_name`), never from the bare file stem.
"""
from __future__ import annotations

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

from .config import ActorConfig
from .models import EncoderSpec, autocast_for

logger = logging.getLogger(__name__)


class SegmentUDF:
    """``map_batches`` callable class: rows {id, uri, mask_uri} -> per-image status and confusion.

    ``label_map[i]`` is the dataset id written for output class ``i`` of the segmenter (so
    several concepts, e.g. stuff concepts, can map to one dataset class such as background).
    Statuses: ``ok``; ``skipped`` (bad input: undecodable image or mask, skipped for good);
    ``failed`` (an I/O error: transient, to be retried by a rerun).
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

    def _write(self, item_id: str, img, pred: np.ndarray, gt: Optional[np.ndarray]) -> Dict[str, str]:
        from index.labels import encode_labels, output_name
        from index.storage import join, write_bytes

        if self.out is None:
            return {"label": "", "overlay": ""}
        import io

        rel = output_name(item_id)
        label_uri = join(self.out, "labels", rel)
        write_bytes(label_uri, encode_labels(pred), self.storage_options)
        overlay_rel = ""
        if self.write_overlays:
            panels = [img, overlay(img, pred)] + ([overlay(img, gt)] if gt is not None else [])
            buf = io.BytesIO()
            side_by_side(*panels).save(buf, format="PNG")
            overlay_rel = f"overlays/{rel}"
            write_bytes(join(self.out, "overlays", rel), buf.getvalue(), self.storage_options)
        return {"label": f"labels/{rel}", "overlay": overlay_rel}

    def _row(self, status: str, error: str = "", **kw) -> Dict[str, object]:
        row: Dict[str, object] = {"status": status, "error": error, "label": "", "overlay": "", "seconds": 0.0,
                                  "confusion": np.zeros(self.num_classes**2, dtype=np.int64),
                                  "mode": self.segmenter.mode}
        row.update(kw)
        return row

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from index.readers import read_image

        uris = [str(u) for u in batch["uri"]]
        ids = [str(i) for i in batch["id"]] if "id" in batch else uris
        masks = [str(m) for m in batch["mask_uri"]] if "mask_uri" in batch else [""] * len(uris)
        rows: List[Optional[Dict[str, object]]] = [None] * len(uris)
        images, gts, todo = [], [], []
        t0 = time.perf_counter()
        for i, (uri, mask) in enumerate(zip(uris, masks)):
            try:
                img = read_image(uri, self.storage_options)
                gt = self._mask(mask, (img.size[1], img.size[0])) if mask else None
            except ImageDecodeError as exc:
                logger.warning("skipped %s: %s", uri, exc)
                rows[i] = self._row("skipped", f"{type(exc).__name__}: {exc}")
                continue
            except OSError as exc:
                logger.warning("failed (transient, rerun to retry) %s: %s", uri, exc)
                rows[i] = self._row("failed", f"{type(exc).__name__}: {exc}")
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
                    paths = self._write(ids[i], img, pred, gt)
                except OSError as exc:
                    logger.warning("failed (transient, rerun to retry) writing %s: %s", ids[i], exc)
                    rows[i] = self._row("failed", f"{type(exc).__name__}: {exc}")
                    continue
                rows[i] = self._row("ok", confusion=cm.reshape(-1), mode=out.mode,
                                    seconds=per_image + time.perf_counter() - t1, **paths)
        done = [r for r in rows if r is not None]
        assert len(done) == len(uris)
        return {
            "id": np.array(ids, dtype=object),
            "uri": np.array(uris, dtype=object),
            "status": np.array([r["status"] for r in done], dtype=object),
            "error": np.array([r["error"] for r in done], dtype=object),
            "confusion": np.stack([r["confusion"] for r in done]).astype(np.int64),
            "label": np.array([r["label"] for r in done], dtype=object),
            "overlay": np.array([r["overlay"] for r in done], dtype=object),
            "seconds": np.array([r["seconds"] for r in done], dtype=np.float64),
            "mode": np.array([r["mode"] for r in done], dtype=object),
        }


def run_segmentation(
    items: Sequence[Mapping[str, str]],
    bank_uri: str,
    encoders: EncoderSpec,
    config: SegmenterConfig,
    label_map: Sequence[int],
    num_classes: int,
    ignore_index: Optional[int],
    out_uri: Optional[str],
    actors: ActorConfig = ActorConfig(),
    storage_options: Optional[Mapping[str, Any]] = None,
    write_overlays: bool = True,
) -> List[Dict[str, object]]:
    """Segment ``items`` ({id, uri, mask_uri}) with a Ray Data actor pool; one row per image.

    ``bank_uri`` is read here, on the driver, and its bytes are shipped to the actors; ``id``
    (default: the uri's path) names the outputs under ``out_uri``.
    """
    import ray.data

    from index.storage import read_bytes, join

    if not items:
        return []
    ids = [str(i.get("id") or str(i["uri"]).split("://", 1)[-1].lstrip("/")) for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique (they name the output files)")
    bank_bytes = read_bytes(join(bank_uri, "bank.safetensors"), storage_options)
    ds = ray.data.from_items([{"id": n, "uri": i["uri"], "mask_uri": i.get("mask_uri", "")} for n, i in zip(ids, items)])
    ds = ds.map_batches(
        SegmentUDF,
        fn_constructor_kwargs=dict(
            bank_bytes=bank_bytes, encoders=encoders, config=config, label_map=list(label_map),
            num_classes=num_classes, ignore_index=ignore_index, out_uri=out_uri, threads=actors.torch_threads,
            write_overlays=write_overlays, storage_options=dict(storage_options or {}),
        ),
        batch_size=actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.num_actors),
        num_cpus=actors.cpus_per_actor,
        num_gpus=actors.gpus_per_actor or None,
    )
    return ds.take_all()
