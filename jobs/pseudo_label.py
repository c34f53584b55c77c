"""``reco pseudo-label SOURCE --bank BANK --out OUT``: label a folder, Parquet set or s3:// prefix.

Ray Data actors segment every image with the bank (reference matching, x dense CLIP when the
bank has text embeddings and CLIP weights are given, optional CRF) and write per image a label
PNG (ids into the class list in ``OUT/pseudo_label.json``; palette PNG, 16-bit beyond 256
classes), optionally a confidence PNG and a colour overlay, and one manifest row (id, uri, output
paths, size, classes present with pixel shares, mean confidence, seconds). Resumable and exactly
once: rerunning the same command processes only what is not committed yet; corrupt images are
skipped with a reason; transient I/O failures are retried by the next run (exit status 3).
Arguments, the bank, the vocabulary, the output location and the encoders are checked before
Ray starts (a mistake is one line, exit 2).
"""

from __future__ import annotations

import logging
from typing import List, Optional

from .common import (
    JobParser,
    add_cluster_args,
    add_encoder_args,
    encoder_overrides,
    nonneg_int,
    parse_storage_options,
    parse_vocab,
    positive_int,
    segmenter_config,
)

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco pseudo-label", __doc__)
    p.add_argument("source", help="image folder, fsspec URL (s3://bucket/prefix) or Parquet file/folder")
    p.add_argument("--bank", required=True, help="concept bank URI (reco build-bank / demo output)")
    p.add_argument("--out", required=True, help="output URI (local folder or s3://...)")
    p.add_argument("--kind", default="auto", choices=("auto", "folder", "parquet"))
    p.add_argument("--overlays", type=nonneg_int, default=0, help="colour overlays for the first N images + index.html")
    p.add_argument("--confidence-maps", action="store_true", help="also write per-pixel confidence PNGs")
    p.add_argument("--commit-every", type=positive_int, default=256, help="manifest rows per atomic commit")
    p.add_argument("--overwrite", action="store_true", help="start afresh when OUT holds another configuration")
    add_encoder_args(p)
    add_cluster_args(p)
    args = p.parse_args(argv)

    from cluster.config import resolve_cluster_config
    from cluster.drivers import pseudo_label_job

    return pseudo_label_job(
        args.source,
        args.kind,
        args.bank,
        args.out,
        parse_vocab(args.vocab),
        segmenter_config(args),
        encoder_overrides(args),
        resolve_cluster_config(args.ray_config),
        parse_storage_options(args.storage_options),
        overlays=args.overlays,
        confidence_maps=args.confidence_maps,
        commit_every=args.commit_every,
        overwrite=args.overwrite,
        config=vars(args),
    )
