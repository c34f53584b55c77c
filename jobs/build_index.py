"""``reco build-index --store DIR``: FAISS index over a store, with a recall report.

Every argument is checked before any work starts (missing / non-store / empty store, bad
factory string, a budget nothing fits, ``--target-recall`` outside (0, 1]) and reported as one
line with exit code 2. Search parameters are tuned on one sample of corpus queries and recall is
reported on another, disjoint one; a missed target is an error unless ``--allow-low-recall``.
``--store`` and ``--index`` may be fsspec URLs (``s3://...``, reached with ``--storage-options``):
the index is built locally and uploaded, ``index.json`` last.

``--parts`` builds an IVF index with Ray tasks in parts (``index:`` section of the Ray config:
part_rows, workers, layout merged | ondisk | shards; :mod:`cluster.index_build`); a rerun
redoes only the missing parts. ``--update`` adds the shards committed since such a build as new
parts with the same trained quantiser (a store whose indexed shards were removed or replaced
must be rebuilt). ``--layout`` overrides ``index.layout``.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from .common import JobParser, add_cluster_args, finite_float, parse_storage_options, positive_float, positive_int

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser(prog="reco build-index", description=__doc__)
    p.add_argument("--store", required=True, help="embedding store directory or fsspec URL (s3://...)")
    p.add_argument("--index", help="output directory or fsspec URL (default: STORE/index)")
    p.add_argument("--factory", help="FAISS factory string (default: chosen from corpus size and memory budget)")
    p.add_argument("--memory-budget-gb", type=positive_float, default=8.0, help="memory the index may take (default 8)")
    p.add_argument(
        "--target-recall",
        type=finite_float(0, 1, lo_open=True),
        default=0.95,
        help="recall@10 the search parameters are tuned to",
    )
    p.add_argument(
        "--allow-low-recall",
        action="store_true",
        help="keep an index that misses --target-recall (a WARNING, target_met: false in index.json)",
    )
    p.add_argument(
        "--num-queries",
        type=positive_int,
        default=1000,
        help="evaluation queries; as many other corpus rows are used to tune the search parameters",
    )
    p.add_argument("--train-size", type=positive_int, help="training sample (default max(100k, 50 nlist) rows)")
    p.add_argument(
        "--text-queries",
        help="(T, E) .npy of text-like queries (the vocabulary's CLIP text embeddings): search parameters "
        "are tuned on half of them, text-like and image recall@10/@50 reported in index.json",
    )
    p.add_argument(
        "--max-nprobe",
        type=positive_int,
        help="a latency budget: tuning probes at most this many IVF lists (the target may then be missed)",
    )
    p.add_argument("--parts", action="store_true", help="build with Ray tasks in parts (IVF factories)")
    p.add_argument(
        "--update",
        action="store_true",
        help="add the shards committed since a --parts build as new parts (same quantiser)",
    )
    p.add_argument("--layout", choices=("merged", "ondisk", "shards"), help="override index.layout of --ray-config")
    add_cluster_args(p)  # --ray-config (its index: section) and --storage-options (s3:// stores and indexes)
    args = p.parse_args(argv)
    from cluster.index_job import build_index_job

    return build_index_job(args, parse_storage_options(args.storage_options))
