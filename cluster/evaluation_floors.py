"""Floors, ceilings and cross-validation of ``reco evaluate`` (see :mod:`cluster.evaluation`):
trivial baselines and the supervised-prototype ceiling from the archive frames' labels (or leave
one image out), cross-validation inside the archive frames (by drive when they hold several: the
only folds whose scored frames are no near-duplicates of an archive), and the background threshold
chosen by 2-fold CV over the scored images."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)


def floors_and_ceilings(
    req,
    spec,
    archive_items,
    eval_items,
    bank,
    bank_cfg,
    seg_cfg,
    dense,
    clip,
    protocol,
    background_concepts,
    class_map,
    storage,
) -> Dict[str, Any]:
    """``baselines`` / ``ceiling`` / ``cv`` report sections: from the archive frames' labels when
    the archives were chosen from labelled frames, else leave one scored image out."""
    from cluster.evaluate import apply_protocol, load_pair

    out: Dict[str, Any] = {}
    if req.labelled_archives:
        arch_pairs = [
            apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol) for it in archive_items
        ]
        if req.baselines:
            out["baselines"] = baselines(
                spec,
                [m for _, m in arch_pairs],
                eval_items,
                protocol,
                storage,
                source="archive half" if req.exemplars_from_split else "archive frames",
            )
        if req.ceiling:
            out["ceiling"] = ceiling(
                spec,
                arch_pairs[:: max(1, req.ceiling_every)],
                eval_items,
                dense,
                clip,
                seg_cfg,
                protocol,
                background_concepts,
                class_map,
                storage,
                bank,
            )
            out["ceiling"]["archive_frames_used"] = len(arch_pairs[:: max(1, req.ceiling_every)])
        if req.cv:
            out["cv"] = cross_validate(
                spec,
                archive_items,
                bank_cfg,
                seg_cfg,
                dense,
                clip,
                protocol,
                req,
                background_concepts,
                class_map,
                storage,
            )
        return out
    if req.baselines:
        out["baselines"] = baselines(spec, None, eval_items, protocol, storage, loo=True)
    if req.ceiling:
        out["ceiling"] = ceiling_loo(
            spec, eval_items, dense, clip, seg_cfg, protocol, background_concepts, class_map, storage, bank
        )
    return out


def threshold_cv_run(
    segmenter,
    bank,
    dense,
    clip,
    seg_cfg,
    spec,
    items,
    protocol,
    background_concepts,
    class_map,
    storage,
    overlays: int = 0,
    out: Optional[str] = None,
):
    """Background threshold chosen by 2-fold cross-validation over the scored images."""
    from cluster.evaluate import (
        THRESHOLD_GRID,
        CachedScores,
        apply_protocol,
        label_map_for,
        load_pair,
        metrics_of,
        threshold_cv,
    )
    from reco.segmenter import Segmenter

    probe = Segmenter(bank, dense, clip, replace(seg_cfg, background_threshold=0.5))
    cached, rows = [], []
    for it in items:
        img, mask = apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol)
        t0 = time.perf_counter()
        boxes, feats = probe.views(img)
        logits = probe.concept_logits(feats, [it.id] * len(boxes))
        seconds = time.perf_counter() - t0
        cached.append(CachedScores(it.id, logits, mask, seconds, boxes=boxes, image_hw=(img.size[1], img.size[0])))
        rows.append(
            {
                "id": it.id,
                "status": "ok",
                "seconds": seconds,
                "overlay": "",
                "mode": probe.mode.replace("background<0.5", "background<threshold chosen by 2-fold CV"),
            }
        )

    def seg_for(t):
        return Segmenter(bank, dense, clip, replace(seg_cfg, background_threshold=t))

    total, chosen, sweep = threshold_cv(
        cached, seg_for, spec, lambda s: label_map_for(s.class_names, spec, background_concepts, class_map)
    )
    m = metrics_of(total, spec)
    m["images"] = {"evaluated": len(items), "skipped": {}, "failed_transient": {}}
    m["seconds_per_image"] = float(np.mean([c.seconds for c in cached])) if cached else None
    if overlays and out is not None and len(chosen) == 2:
        from cluster.evaluate import png_bytes, render_overlay
        from index.labels import output_name
        from index.storage import join, write_bytes

        for i, c in enumerate(cached[:overlays]):
            t = chosen[0] if i % 2 else chosen[1]  # each half is labelled with the other half's choice
            seg = seg_for(t)
            lm = np.asarray(label_map_for(seg.class_names, spec, background_concepts, class_map))
            labels, _ = seg.labels(c.scores(seg), None)
            img, _ = apply_protocol(*load_pair(spec, items[i].image_uri, items[i].mask_uri, storage), protocol)
            rel = "overlays/" + output_name(c.id)
            write_bytes(join(out, rel), png_bytes(render_overlay(img, c.truth, lm[labels.numpy()], spec)), storage)
            rows[i]["overlay"] = rel
    info = {
        "grid": list(THRESHOLD_GRID),
        "chosen": chosen,
        "folds": "alternate images by id",
        "sweep": sweep,
        "note": "each half is scored with the threshold chosen on the other half",
    }
    return m, rows, info


def baselines(
    spec, archive_masks, items, protocol, storage, loo: bool = False, source: str = "archive half"
) -> Dict[str, Any]:
    """All-majority-class and per-pixel class prior and, when the dataset has one,
    all-background; scored on ``items`` with the same protocol. The majority class and the prior
    come from the archive half's labels or, with ``loo`` (no labelled archive half), from the
    labels of the *other* scored images (leave one image out)."""
    from cluster.evaluate import (
        apply_protocol,
        class_prior_map,
        confusion,
        coverage,
        load_pair,
        metrics_of,
        prior_prediction,
    )

    masks = [apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol)[1] for it in items]
    n = spec.num_classes
    names: Dict[str, np.ndarray] = {}

    def pixel_counts(ms):
        return (coverage(ms, n) * np.array([[m.size] for m in ms])).sum(0)

    totals: Dict[str, np.ndarray] = {}

    def add(key, pred, mask):
        totals.setdefault(key, np.zeros((n, n), dtype=np.int64))
        totals[key] += confusion(pred, mask, spec)

    src = "other scored images, leave one out" if loo else source
    if archive_masks or loo:
        if not loo:
            majority = int(pixel_counts(archive_masks).argmax())
            prior = class_prior_map(archive_masks, n)
        for i, mask in enumerate(masks):
            if loo:
                others = masks[:i] + masks[i + 1 :]
                if not others:
                    continue
                majority = int(pixel_counts(others).argmax())
                prior = class_prior_map(others, n)
            add(f"all-majority-class ({src})", np.full(mask.shape, majority), mask)
            add(f"per-pixel class prior ({src})", prior_prediction(prior, mask.shape), mask)
            names[f"all-majority-class ({src})"] = spec.classes[majority]
    if "background" in spec.classes:
        bg = spec.classes.index("background")
        for mask in masks:
            add("all-background", np.full(mask.shape, bg), mask)
    out: Dict[str, Any] = {}
    for key, total in totals.items():
        m = metrics_of(total, spec)
        out[key] = {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou"], "seconds_per_image": 0.0}
        if key in names and not loo:
            out[key]["class"] = names[key]
    return out


def view_masks(mask: np.ndarray, boxes, img) -> List[np.ndarray]:
    """The ground truth under each view of ``img`` (boxes in image pixels, mapped onto the mask)."""
    from reco.image import scale_box

    out = []
    for b in boxes:
        x0, y0, x1, y1 = scale_box(b, (img.size[1], img.size[0]), mask.shape)
        out.append(mask[y0:y1, x0:x1])
    return out


def view_tokens(probe, pairs) -> Tuple[List[Any], List[np.ndarray]]:
    """Every view's (1, D, h, w) features (:meth:`Segmenter.views`: the whole image or its sliding
    windows) with the ground truth under it: what supervised prototypes are averaged over, so the
    ceiling sees the tokens inference scores."""
    feats, masks = [], []
    for img, mask in pairs:
        boxes, f = probe.views(img)
        feats += [v[None].cpu() for v in f]
        masks += view_masks(mask, boxes, img)
    return feats, masks


def ceiling(spec, arch_pairs, items, dense, clip, seg_cfg, protocol, background_concepts, class_map, storage, bank):
    """Supervised-prototype ceiling: one mean feature per class from the ground-truth masks of the
    archive half (same features, same inference), scored on the evaluation half."""
    import torch

    from cluster.evaluate import Evaluator, run_in_process, summarize, supervised_references
    from reco.bank import ConceptBank
    from reco.segmenter import Segmenter, window_side

    seg_cfg = replace(seg_cfg, window_image_size=window_side(seg_cfg, bank))  # the run's windows, also for its bank
    probe = Segmenter(
        ConceptBank(("x",), torch.zeros(1, dense.embed_dim), metadata=dict(bank.metadata)),
        dense,
        None,
        replace(seg_cfg, calibrate=False, background_threshold=None),
    )
    t0 = time.perf_counter()
    feats, masks = view_tokens(probe, arch_pairs)
    refs, seen, stats = supervised_references(feats, masks, spec.num_classes)
    names = tuple(c for c, s in zip(spec.classes, seen.tolist()) if s)
    meta = {
        k: bank.metadata.get(k)
        for k in (
            "dense_encoder",
            "dense_weights",
            "dense_weights_id",
            "dense_weights_spec",
            "clip",
            "clip_weights",
            "clip_weights_id",
        )
    }
    meta["archive_mode"] = "supervised prototypes (ground-truth masks of the archive half)"
    ceiling_bank = ConceptBank(names, refs[seen], None, stats[None].repeat(len(names), 1), meta)
    build_seconds = time.perf_counter() - t0
    seg = Segmenter(ceiling_bank, dense, clip, replace(seg_cfg, dense_clip=False))
    from cluster.evaluate import label_map_for

    lm = label_map_for(seg.class_names, spec, background_concepts, class_map)
    rows = run_in_process(items, Evaluator(seg, spec, lm, protocol), 0, None, storage)
    m = summarize(rows, spec)
    return {
        "miou": m["miou"],
        "pixel_accuracy": m["pixel_accuracy"],
        "iou": m["iou"],
        "confusion_matrix": m["confusion_matrix"],
        "seconds_per_image": m["seconds_per_image"],
        "build_seconds": build_seconds,
        "classes_seen": list(names),
        "definition": "per class the normalised mean of the archive half's feature tokens that are >= 50% that "
        "class in the ground truth; same encoder, same inference (segmenter config) as the run",
    }


def ceiling_loo(spec, items, dense, clip, seg_cfg, protocol, background_concepts, class_map, storage, bank):
    """The supervised-prototype ceiling without a labelled archive half: each image is scored with
    per-class references from the ground-truth masks of all the *other* scored images."""
    import torch

    from cluster.evaluate import apply_protocol, confusion, label_map_for, load_pair, metrics_of, supervised_references
    from reco.bank import ConceptBank
    from reco.segmenter import Segmenter, window_side

    meta = {
        k: bank.metadata.get(k) for k in ("dense_encoder", "dense_weights", "dense_weights_id", "dense_weights_spec")
    }
    meta["archive_mode"] = "supervised prototypes (ground truth of the other images, leave one out)"
    seg_cfg = replace(seg_cfg, window_image_size=window_side(seg_cfg, bank))  # the run's windows
    probe = Segmenter(
        ConceptBank(("x",), torch.zeros(1, dense.embed_dim), metadata=meta),
        dense,
        None,
        replace(seg_cfg, calibrate=False, background_threshold=None, dense_clip=False),
    )
    pairs = [apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol) for it in items]
    t0 = time.perf_counter()
    views = [probe.views(img) for img, _ in pairs]
    feats = [[f[None].cpu() for f in v[1]] for v in views]
    masks = [view_masks(mask, v[0], img) for (img, mask), v in zip(pairs, views)]
    feat_seconds = (time.perf_counter() - t0) / max(len(pairs), 1)
    n = spec.num_classes
    total = np.zeros((n, n), dtype=np.int64)
    seconds = []
    for i, (img, mask) in enumerate(pairs):
        others = [j for j in range(len(pairs)) if j != i]
        if not others:
            continue
        refs, seen, stats = supervised_references(
            [f for j in others for f in feats[j]], [m for j in others for m in masks[j]], n
        )
        names = tuple(c for c, s in zip(spec.classes, seen.tolist()) if s)
        cb = ConceptBank(names, refs[seen], None, stats[None].repeat(len(names), 1), meta)
        seg = Segmenter(cb, dense, None, replace(seg_cfg, dense_clip=False))
        lm = np.asarray(label_map_for(seg.class_names, spec, background_concepts, class_map))
        t1 = time.perf_counter()
        s = seg.assemble(seg.concept_logits(torch.cat(feats[i])), views[i][0], (img.size[1], img.size[0]), mask.shape)
        labels, _ = seg.labels(s, np.asarray(img) if seg_cfg.crf is not None else None)
        seconds.append(time.perf_counter() - t1 + feat_seconds)
        total += confusion(lm[labels.numpy()], mask, spec)
    m = metrics_of(total, spec)
    return {
        "miou": m["miou"],
        "pixel_accuracy": m["pixel_accuracy"],
        "iou": m["iou"],
        "confusion_matrix": m["confusion_matrix"],
        "seconds_per_image": float(np.mean(seconds)) if seconds else None,
        "definition": "per class the normalised mean of the feature tokens >= 50% that class in the ground "
        "truth of every other scored image (leave one image out); same encoder and inference",
    }


def cross_validate(
    spec, archive_items, bank_cfg, seg_cfg, dense, clip, protocol, req, background_concepts, class_map, storage
) -> Dict[str, Any]:
    """Cross-validation inside the archive frames: one fold's frames give the archives (the same
    rule as the run), the rest is scored, confusions summed over folds. Folds: leave one drive
    out (:func:`reco.protocols.drive_folds`) when the frames hold several drives, else the two
    halves by id, both ways."""
    from cluster.evaluate import Evaluator, label_map_for, metrics_of, run_in_process, split_halves
    from reco.protocols import drive_folds, has_drives
    from reco.segmenter import Segmenter

    from .evaluation import labelled_bank

    ids = [it.id for it in archive_items]
    if req.archives_from and has_drives(ids):
        folds = [(d, [archive_items[i] for i in a], [archive_items[i] for i in t]) for d, a, t in drive_folds(ids)]
        how = "leave one drive out"
    else:
        a, b = split_halves(archive_items)
        folds = [("second half", a, b), ("first half", b, a)]
        how = "2-fold: the archive frames split again into halves by id, both ways"
    total = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
    per_fold = {}
    order = [n.strip() for n in req.vocab_order.split(",") if n.strip()] or None
    for held_out, train, test in folds:
        bank, _, _ = labelled_bank(spec, train, bank_cfg, dense, clip, req, storage, order)
        seg = Segmenter(bank, dense, clip, seg_cfg)
        lm = label_map_for(seg.class_names, spec, background_concepts, class_map)
        rows = run_in_process(test, Evaluator(seg, spec, lm, protocol), 0, None, storage)
        m = np.zeros_like(total)
        for r in rows:
            if r["status"] == "ok":
                m += np.asarray(r["confusion"]).reshape(spec.num_classes, -1)
        per_fold[held_out] = metrics_of(m, spec)["miou"]
        total += m
    mm = metrics_of(total, spec)
    return {
        "miou": mm["miou"],
        "pixel_accuracy": mm["pixel_accuracy"],
        "iou": mm["iou"],
        "fold_miou": per_fold,
        "folds": how,
        "scored_per_fold": {h: [it.id for it in t] for h, _, t in folds},
    }


def print_report(report: Dict[str, Any], report_uri: str) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        f"dataset {report['dataset']} ({report['images']['evaluated']} images scored), protocol: "
        f"{report['protocol']['description']}"
    ]
    plus = report.get("reco_plus")
    if report.get("bank") is not None:
        lines.append(
            f"mode: {report['mode']}  |  executor: {report['executor']}  |  bank config hash: "
            f"{report['bank'].get('config_hash')}"
        )
    if plus is not None:
        ck = plus["model"]["checkpoint"]
        lines.append(
            f"ReCo+ model: {plus['model']['uri']}  |  checkpoint {ck['exported']} (step {ck['step']}), "
            f"selection: {ck['selection']}  |  scored images it was trained on: "
            f"{plus['model']['training_data'].get('scored_images_trained_on')}"
        )
    lines.append(f"{'row':<48} {'mIoU %':>8} {'pix acc %':>10} {'s/img':>7}")
    if report.get("bank") is not None:
        label = "ReCo (this configuration)" if plus is not None else "this configuration"
        lines.append(
            f"{label:<48} {pct(report['miou']):>8} {pct(report['pixel_accuracy']):>10} "
            f"{report['seconds_per_image'] or 0:>7.2f}"
        )
    if plus is not None:
        lines.append(
            f"{'ReCo+ (trained model)':<48} {pct(plus['miou']):>8} {pct(plus['pixel_accuracy']):>10} "
            f"{plus['seconds_per_image'] or 0:>7.2f}"
        )
    if "ceiling" in report:
        c = report["ceiling"]
        lines.append(
            f"{'supervised-prototype ceiling':<48} {pct(c['miou']):>8} {pct(c['pixel_accuracy']):>10} "
            f"{c['seconds_per_image'] or 0:>7.2f}"
        )
    for name, b in (report.get("baselines") or {}).items():
        label = name + (f" = {b['class']}" if b.get("class") else "")
        lines.append(f"{label[:48]:<48} {pct(b['miou']):>8} {pct(b['pixel_accuracy']):>10} {'-':>7}")
    if "cv" in report:
        lines.append(
            f"{'CV inside the archive frames (' + report['cv']['folds'][:20] + ')':<48} "
            f"{pct(report['cv']['miou']):>8} "
            f"{pct(report['cv']['pixel_accuracy']):>10} {'-':>7}"
        )
    if "background_threshold_cv" in report:
        lines.append(f"background threshold chosen per half: {report['background_threshold_cv']['chosen']}")
    if report.get("bank") is not None:
        lines.append(
            ("ReCo " if plus is not None else "")
            + "per-class IoU %: "
            + ", ".join(f"{k} {pct(v)}" for k, v in report["metrics"]["iou"].items())
        )
    if plus is not None:
        lines.append("ReCo+ per-class IoU %: " + ", ".join(f"{k} {pct(v)}" for k, v in plus["metrics"]["iou"].items()))
    lines.append(f"report: {report_uri}")
    sys.stdout.write("\n".join(lines) + "\n")
