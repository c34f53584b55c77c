"""Ray Data segmentation: an actor pool of Segmenters writing label maps and overlays."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

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


def _stem(uri: str) -> str:
    return Path(uri.split("://", 1)[-1]).stem


class SegmentUDF:
    """``map_batches`` callable class: rows {uri, mask_uri} -> per-image status and confusion.

    ``label_map[i]`` is the dataset id written for output class ``i`` of the segmenter (so
    several concepts, e.g. stuff concepts, can map to one dataset class such as background).
    """

    def __init__(
        self,
        bank_dir: str,
        encoders: EncoderSpec,
        config: SegmenterConfig,
        label_map: Sequence[int],
        num_classes: int,
        ignore_index: Optional[int],
        out_dir: Optional[str],
        threads: Optional[int] = None,
        write_overlays: bool = True,
    ):
        dense, clip, self.device = encoders.load(threads)
        bank = ConceptBank.load(bank_dir)
        self.segmenter = Segmenter(bank, dense, clip, config)
        if len(label_map) != len(self.segmenter.class_names):
            raise ValueError(
                f"label_map has {len(label_map)} entries for {len(self.segmenter.class_names)} output classes"
            )
        self.lut = np.asarray(label_map, dtype=np.int64)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.out = Path(out_dir) if out_dir else None
        self.write_overlays = write_overlays
        if self.out is not None:
            (self.out / "labels").mkdir(parents=True, exist_ok=True)
            (self.out / "overlays").mkdir(parents=True, exist_ok=True)

    def _one(self, uri: str, mask_uri: str) -> Dict[str, object]:
        from index.readers import read_image
        from index.sources import fetch_bytes

        t0 = time.perf_counter()
        img = read_image(uri)
        with autocast_for(self.device):
            out = self.segmenter(img)[0]
        pred = self.lut[out.labels.numpy()]
        cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        gt = None
        if mask_uri:
            import io

            from PIL import Image

            gt = np.array(Image.open(io.BytesIO(fetch_bytes(mask_uri))))
            if gt.ndim == 3:
                raise ValueError(f"{mask_uri}: masks must be single-channel class ids")
            if gt.shape != pred.shape:
                raise ValueError(f"{mask_uri}: mask {gt.shape} differs from image {pred.shape}")
            c = ConfusionMatrix(self.num_classes, self.ignore_index)
            c.update(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)))
            cm = c.matrix.numpy()
        overlay_path = ""
        if self.out is not None:
            from PIL import Image

            stem = _stem(uri)
            Image.fromarray(pred.astype(np.uint8), "L").save(self.out / "labels" / f"{stem}.png")
            if self.write_overlays:
                panels = [img, overlay(img, pred)]
                if gt is not None:
                    panels.append(overlay(img, gt))
                side_by_side(*panels).save(self.out / "overlays" / f"{stem}.png")
                overlay_path = f"overlays/{stem}.png"
        return {"status": "ok", "error": "", "confusion": cm.reshape(-1), "overlay": overlay_path,
                "seconds": time.perf_counter() - t0, "mode": out.mode}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows: List[Dict[str, object]] = []
        uris = [str(u) for u in batch["uri"]]
        masks = [str(m) for m in batch.get("mask_uri", [""] * len(uris))]
        for uri, mask in zip(uris, masks):
            try:
                rows.append(self._one(uri, mask))
            except (ImageDecodeError, OSError, ValueError) as exc:
                logger.warning("skipped %s: %s", uri, exc)
                rows.append({"status": "skipped", "error": f"{type(exc).__name__}: {exc}",
                             "confusion": np.zeros(self.num_classes**2, dtype=np.int64), "overlay": "",
                             "seconds": 0.0, "mode": self.segmenter.mode})
        return {
            "uri": np.array(uris, dtype=object),
            "status": np.array([r["status"] for r in rows], dtype=object),
            "error": np.array([r["error"] for r in rows], dtype=object),
            "confusion": np.stack([r["confusion"] for r in rows]).astype(np.int64),
            "overlay": np.array([r["overlay"] for r in rows], dtype=object),
            "seconds": np.array([r["seconds"] for r in rows], dtype=np.float64),
            "mode": np.array([r["mode"] for r in rows], dtype=object),
        }


def run_segmentation(
    items: Sequence[Mapping[str, str]],
    bank_dir: str,
    encoders: EncoderSpec,
    config: SegmenterConfig,
    label_map: Sequence[int],
    num_classes: int,
    ignore_index: Optional[int],
    out_dir: Optional[str],
    actors: ActorConfig = ActorConfig(),
) -> List[Dict[str, object]]:
    """Segment ``items`` ({uri, mask_uri}) with a Ray Data actor pool; returns one row per image."""
    import ray
    import ray.data

    if not items:
        return []
    ds = ray.data.from_items([{"uri": i["uri"], "mask_uri": i.get("mask_uri", "")} for i in items])
    ds = ds.map_batches(
        SegmentUDF,
        fn_constructor_kwargs=dict(
            bank_dir=str(bank_dir), encoders=encoders, config=config, label_map=list(label_map),
            num_classes=num_classes, ignore_index=ignore_index, out_dir=out_dir, threads=actors.torch_threads,
        ),
        batch_size=actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.num_actors),
        num_cpus=actors.cpus_per_actor,
        num_gpus=actors.gpus_per_actor or None,
    )
    return ds.take_all()
