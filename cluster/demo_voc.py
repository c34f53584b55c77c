"""The VOC demo of ``reco demo --dataset voc``: a bank built by Ray actors from the unlabelled archive
(CLIP retrieval, or the hand-written exemplar mapping without CLIP), the VOC sample segmented by a
Ray Data actor pool, mIoU / pixel accuracy beside floors and a ceiling, overlays and an HTML page."""

from __future__ import annotations

import html
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml

from cluster.config import load_yaml_mapping, redact, resolve_cluster_config
from cluster.models import EncoderSpec
from cluster.runtime import init_ray
from reco.config import BankConfig, CRFConfig, SegmenterConfig, from_dict, to_dict
from reco.errors import ConfigError, ReCoError
from reco.metrics import ConfusionMatrix

logger = logging.getLogger(__name__)

# Stuff names that stand for VOC `background` when CLIP can retrieve their archives.
CLIP_BACKGROUND_CONCEPTS = ("sky", "tree", "building", "road", "grass", "water", "wall", "floor", "ground")


def load_demo_yaml(path: Optional[str]) -> Dict:
    if not path:
        return {}
    data = load_yaml_mapping(path, "config file")
    unknown = set(data) - {"bank", "segmenter"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected bank, segmenter")
    return data


def _voc(data_root: Path, limit: Optional[int]):
    voc = data_root / "voc-sample"
    classes_file = voc / "classes.txt"
    if not classes_file.is_file():
        raise FileNotFoundError(f"{classes_file} not found: pass --data-root pointing at shared/data")
    classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
    images = sorted((voc / "images").glob("*.jpg"))[: limit or None]
    items = [
        {
            "id": i.relative_to(voc / "images").as_posix(),
            "uri": str(i),
            "mask_uri": str(voc / "masks" / f"{i.stem}.png"),
        }
        for i in images
    ]
    missing = [it["mask_uri"] for it in items if not Path(it["mask_uri"]).is_file()]
    if missing:
        raise FileNotFoundError(f"missing ground-truth masks: {missing[:3]}")
    return classes, items


def voc_demo(args, data_root: Path, t_start: float) -> int:
    """The VOC demo of ``reco demo --dataset voc`` (``args``: its parsed arguments)."""
    archive_dir = data_root / "imagenet-sample"
    if not archive_dir.is_dir():
        raise FileNotFoundError(f"{archive_dir} not found: pass --data-root pointing at shared/data")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    user = load_demo_yaml(args.config)
    clip_mode = bool(args.clip_model)

    # The default configuration in both modes (overridable by --config): with CLIP, retrieval
    # gives the paper's context concepts their archives; with the exemplar mapping they come from
    # the vocabulary where it names them (building, person) and the rest are left out.
    seg_defaults = {"calibrate": True} if args.calibration_images > 0 else {}
    bank_cfg = from_dict(BankConfig, dict(user.get("bank") or {}), "bank")
    if args.k:
        bank_cfg = replace(bank_cfg, k=args.k)
    seg_cfg = from_dict(SegmenterConfig, {**seg_defaults, **(user.get("segmenter") or {})}, "segmenter")
    if args.crf and seg_cfg.crf is None:
        seg_cfg = replace(seg_cfg, crf=CRFConfig())

    cluster_cfg = resolve_cluster_config(args.ray_config)
    encoders = EncoderSpec(args.dense_encoder, args.dense_weights, args.clip_model, args.clip_weights)
    classes, items = _voc(data_root, args.limit)
    targets = [c for c in classes if c != "background"]

    from index.readers import list_images

    archive = list_images(str(archive_dir))
    if not archive:
        raise FileNotFoundError(f"{archive_dir} holds no images")
    init_ray(cluster_cfg.ray)

    # 1. archives
    background_concepts: List[str]
    context_archives: Dict[str, List[str]] = {}
    if clip_mode:
        archives, background_concepts, context_archives, retrieval, texts = _retrieve(
            archive_dir, targets, encoders, bank_cfg, cluster_cfg, out, args.index
        )
        archive_mode = "clip-retrieval"
    else:
        archives, background_concepts = _exemplars(Path(args.exemplars), archive_dir, targets)
        archive_mode = "exemplar (hand-written mapping)"
        retrieval, texts = None, {}

    # 2. concept bank: the `reco build-bank` job (Ray actors, committed in parts, resumable)
    from cluster.bank_job import ConceptTask, run_build_bank

    t0 = time.perf_counter()
    bank_dir = out / "bank"
    tasks = [ConceptTask(n, tuple(u), texts.get(n)) for n, u in archives.items()]
    ctx_tasks = [ConceptTask(n, tuple(u), texts.get(n)) for n, u in context_archives.items()]
    bank, bank_report = run_build_bank(
        tasks, encoders, bank_cfg, str(bank_dir), cluster_cfg.bank, ctx_tasks, archive_mode, overwrite=True
    )
    if bank is None:
        raise ReCoError(
            f"the bank is incomplete ({len(bank_report.failed_transient)} concepts could not read their "
            "archives now): rerun the demo"
        )
    if args.calibration_images > 0:
        bank = _calibrate(bank, bank_dir, archive, args.calibration_images, encoders, cluster_cfg)
    bank_seconds = time.perf_counter() - t0
    logger.info("concept bank: %d concepts in %.1fs -> %s", len(bank), bank_seconds, bank_dir)

    # 3. pseudo-labels: the `reco pseudo-label` job (Ray Data, exactly-once manifest), scored here
    from cluster.pseudo_label import committed_rows, run_pseudo_label
    from index.labels import decode_labels, encode_labels
    from index.sources import Item

    names = (["background"] if seg_cfg.background_threshold is not None else []) + list(bank.names)
    label_map = np.array([0 if (n == "background" or n in background_concepts) else classes.index(n) for n in names])
    t0 = time.perf_counter()
    labels_dir = out / "pseudo_labels"
    pl_report = run_pseudo_label(
        [Item(i["id"], i["uri"]) for i in items],
        str(bank_dir),
        encoders,
        seg_cfg,
        str(labels_dir),
        cluster_cfg.segment,
        overwrite=True,
    )
    seg_seconds = time.perf_counter() - t0
    masks = {i["id"]: i["mask_uri"] for i in items}
    rows = [r for r in committed_rows(str(labels_dir)) if r["id"] in masks]
    cm = ConfusionMatrix(len(classes), 255)
    from PIL import Image

    from index.readers import read_image
    from reco.visualize import overlay, side_by_side

    (out / "overlays").mkdir(exist_ok=True)
    for r in rows:
        if r["status"] != "ok":
            continue
        pred = label_map[decode_labels((labels_dir / r["label"]).read_bytes())]
        gt = np.array(Image.open(masks[r["id"]])).astype(np.int64)
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
        img = read_image(r["uri"])
        r["overlay"] = f"overlays/{Path(r['label']).name}"
        side_by_side(img, overlay(img, pred), overlay(img, gt)).save(out / r["overlay"])
        r["label"] = f"labels/{Path(r['label']).name}"  # as VOC ids (the job's labels are bank ids)
        (out / "labels").mkdir(exist_ok=True)
        (out / r["label"]).write_bytes(encode_labels(pred))
    metrics = cm.compute(classes)
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = {str(r["uri"]): str(r["error"]) for r in rows if r["status"] == "skipped"}
    failed = dict(pl_report.failed_transient)
    mode = str(ok[0]["mode"]) if ok else "n/a"
    protocol = (
        f"VOC sample ({len(ok)} images), 21 classes, full resolution, features of "
        + (
            f"sliding windows ({seg_cfg.window:g} of the shorter side, stride {seg_cfg.window_stride:g})"
            if seg_cfg.window is not None
            else f"the whole image at shorter side {seg_cfg.image_size}px"
        )
        + f", ignore 255, CRF {'on' if seg_cfg.crf else 'off'}; background = "
        + (f"stuff concepts {background_concepts}" if background_concepts else "")
        + (f" + threshold {seg_cfg.background_threshold}" if seg_cfg.background_threshold is not None else "")
    )
    report = {
        "mode": {
            "archives": archive_mode,
            "inference": mode,
            "dense_encoder": f"{encoders.dense_encoder} ({bank.metadata.get('dense_weights')})",
            "clip": encoders.clip_model or "none (no CLIP weights: retrieval, language guidance and dense CLIP off)",
            "language_guidance": bank.metadata.get("language_guidance"),
            "context_elimination": bank.metadata.get("context_elimination"),
        },
        "protocol": protocol,
        "miou": metrics.miou,
        "pixel_accuracy": metrics.pixel_accuracy,
        "iou": metrics.as_dict()["iou"],
        "images": {"segmented": len(ok), "skipped": skipped, "failed_transient": failed},
        "per_image": [
            {
                "id": str(r["id"]),
                "uri": str(r["uri"]),
                "label": str(r["label"]),
                "overlay": str(r["overlay"]),
                "seconds": float(r["seconds"]),
            }
            for r in ok
        ],
        "bank": {
            **bank_report.as_dict(),
            "seconds": bank_seconds,
            "concepts": list(bank.names),
            "concepts_failed": dict(bank_report.failed),
        },
        "segment_seconds": seg_seconds,
        "seconds_per_image": float(np.mean([r["seconds"] for r in ok])) if ok else None,
        "total_seconds": time.perf_counter() - t_start,
        "retrieval": retrieval,
    }
    report.update(_voc_floors(data_root, [r["id"] for r in ok], encoders, seg_cfg, bank, background_concepts))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    resolved = {
        "bank": to_dict(bank_cfg),
        "segmenter": to_dict(seg_cfg),
        "encoders": to_dict(encoders),
        "cluster": to_dict(cluster_cfg),
        "args": vars(args),
    }
    (out / "config.yaml").write_text(yaml.safe_dump(redact(resolved), sort_keys=False))
    _write_html(out, report, rows, classes)
    logger.info("mode: archives=%s; inference=%s", archive_mode, mode)
    logger.info("protocol: %s", protocol)
    logger.info(
        "mIoU %.2f%%  pixel accuracy %.2f%%  (%d images, %d skipped, %d failed: rerun to retry)",
        100 * metrics.miou,
        100 * metrics.pixel_accuracy,
        len(ok),
        len(skipped),
        len(failed),
    )
    for label, b in [("ceiling: supervised prototypes (leave one image out)", report["ceiling"])] + [
        ("floor: " + k, v) for k, v in report["baselines"].items()
    ]:
        logger.info("%-70s mIoU %6.2f%%  pixel accuracy %6.2f%%", label, 100 * b["miou"], 100 * b["pixel_accuracy"])
    logger.info("report: %s  |  page: %s", out / "report.json", out / "index.html")
    return 0


def _voc_floors(
    data_root: Path,
    ids: Sequence[str],
    encoders: EncoderSpec,
    seg_cfg: SegmenterConfig,
    bank,
    background_concepts: Sequence[str],
) -> Dict:
    """Floors (all-background, majority class and per-pixel prior of the other images) and the
    supervised-prototype ceiling (the other images' labels, same features) of the VOC demo."""
    from cluster.evaluate import Protocol
    from cluster.evaluation_floors import baselines, ceiling_loo
    from index.datasets import open_dataset

    spec, items = open_dataset("voc", str(data_root / "voc-sample"))
    items = [it for it in items if it.id in set(ids) or it.id.split("/")[-1] in set(ids)]
    dense, _, _ = replace(encoders, clip_model=None).load()
    full = Protocol("full")
    return {
        "baselines": baselines(spec, None, items, full, None, loo=True),
        "ceiling": ceiling_loo(
            spec, items, dense, None, replace(seg_cfg, crf=None), full, list(background_concepts), {}, None, bank
        ),
    }


def _calibrate(bank, bank_dir: Path, archive: Sequence[str], n: int, encoders: EncoderSpec, cluster_cfg):
    """Per-concept score statistics over ``n`` random unlabelled archive images (one actor)."""
    import ray

    from cluster.bank import BankWorker
    from index.storage import save_bank

    pool = random.Random(0).sample(list(archive), min(n, len(archive)))
    worker = (
        ray.remote(BankWorker)
        .options(num_cpus=cluster_cfg.bank.cpus_per_actor)
        .remote(encoders, BankConfig(), cluster_cfg.bank.torch_threads)
    )
    try:
        feats = ray.get(worker.features.remote(pool))
    finally:
        ray.kill(worker)
    bank.calibrate(feats)
    save_bank(bank, str(bank_dir))
    return bank


def _exemplars(mapping_path: Path, archive_dir: Path, targets: Sequence[str]):
    if not mapping_path.is_file():
        raise FileNotFoundError(f"exemplar mapping {mapping_path} not found")
    spec = yaml.safe_load(mapping_path.read_text()) or {}
    classes = spec.get("classes") or {}
    missing = [t for t in targets if t not in classes]
    if missing:
        raise ConfigError(f"{mapping_path}: no exemplars for {missing}")
    archives = {t: [str(archive_dir / f) for f in classes[t]] for t in targets}
    background = spec.get("background") or {}
    for name, files in background.items():
        archives[name] = [str(archive_dir / f) for f in files]
    absent = [u for uris in archives.values() for u in uris if not Path(u).is_file()]
    if absent:
        logger.warning("%d exemplar files missing (they are skipped and counted): %s", len(absent), absent[:3])
    return archives, list(background)


def _retrieve(archive_dir, targets, encoders, bank_cfg, cluster_cfg, out: Path, index_dir: Optional[str]):
    """CLIP mode: the archive is embedded into a store and indexed (or an existing index is used),
    then each concept's top-k images are retrieved with its prompt-ensembled text embedding."""

    from cluster.embed import run_embed
    from index.catalog import build_index_dir, open_retriever
    from index.sources import list_folder
    from index.store import EmbeddingStore

    if index_dir is None:
        store = EmbeddingStore(out / "store")
        run_embed(list_folder(str(archive_dir)), store, encoders, cluster_cfg.embed, shard_size=10_000)
        skipped = store.skipped()
        index_dir = str(out / "store" / "index")
        build_index_dir(store, index_dir)
    else:
        skipped = {}
    retriever, uris, _ = open_retriever(index_dir)
    background = [c for c in CLIP_BACKGROUND_CONCEPTS if c not in targets]
    context = list(bank_cfg.context_concepts) if bank_cfg.context_elimination else []
    queries = list(dict.fromkeys(list(targets) + background + context))

    from cluster.bank_inputs import text_embeddings_remote

    texts = text_embeddings_remote(encoders, {q: () for q in queries})
    text = np.stack([texts[q].numpy() for q in queries])
    hits = retriever.search(text, bank_cfg.k)
    by_name = {n: [uris[i] for i in h.ids] for n, h in zip(queries, hits)}
    archives = {n: by_name[n] for n in list(targets) + background}
    ctx = {n: by_name[n] for n in context}
    info = {
        "archive_images": len(retriever),
        "skipped": skipped,
        "index": index_dir,
        "k": bank_cfg.k,
        "top": {n: [Path(u).name for u in by_name[n][:5]] for n in queries},
    }
    return archives, background, ctx, info, texts


def _write_html(out: Path, report: Dict, rows, classes: Sequence[str]) -> None:
    esc = html.escape
    iou_rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{'-' if v is None else f'{100 * v:.1f}'}</td></tr>" for c, v in report["iou"].items()
    )
    imgs = "".join(
        f"<figure><img src='{esc(str(r['overlay']))}' loading='lazy'><figcaption>{esc(Path(str(r['uri'])).name)}"
        " &mdash; image | prediction | ground truth</figcaption></figure>"
        for r in rows
        if r["status"] == "ok" and r["overlay"]
    )
    mode = "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in report["mode"].items())
    from reco.visualize import legend_html

    legend = legend_html(list(classes))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>reco demo</title>
<style>body{{font-family:sans-serif;margin:2em}}img{{max-width:100%}}figure{{margin:1em 0}}
table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:2px 8px}}</style></head><body>
<h1>reco-cluster demo</h1>
<p><b>mIoU {100 * report["miou"]:.2f}%</b>, pixel accuracy {100 * report["pixel_accuracy"]:.2f}%
(ceiling, supervised prototypes: {100 * report["ceiling"]["miou"]:.2f}% / {
        100 * report["ceiling"]["pixel_accuracy"]:.2f}%;
floors: {
        esc(
            ", ".join(
                f"{k} {100 * v['miou']:.2f}% / {100 * v['pixel_accuracy']:.2f}%" for k, v in report["baselines"].items()
            )
        )
    })</p>
<p>Protocol: {esc(report["protocol"])}</p><ul>{mode}</ul>
<table><tr><th>class</th><th>IoU %</th></tr>{iou_rows}</table>
<h2>Colour legend</h2>{legend}{imgs}</body></html>"""
    (out / "index.html").write_text(page)
