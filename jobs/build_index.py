"""``reco build-index --store DIR``: FAISS index over a store, with a recall report."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco build-index", description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--index", help="output directory (default: STORE/index)")
    p.add_argument("--factory", help="FAISS factory string (default: chosen from corpus size and memory budget)")
    p.add_argument("--memory-budget-gb", type=float, default=8.0)
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the search parameters are tuned to")
    args = p.parse_args(argv)

    from index.catalog import build_index_dir
    from index.store import EmbeddingStore

    out = args.index or str(Path(args.store) / "index")
    rep = build_index_dir(EmbeddingStore(args.store), out, args.factory, int(args.memory_budget_gb * 2**30),
                          args.target_recall)
    logger.info("index %s over %d vectors: recall@1 %.3f, recall@10 %.3f (vs exact, %d held-out queries), "
                "%.2f ms/query %s, %.1f MB, built in %.1f s -> %s", rep.factory, rep.n, rep.recall_at_1,
                rep.recall_at_10, rep.queries, rep.ms_per_query, rep.search_params or "", rep.index_bytes / 2**20,
                rep.build_seconds, out)
    return 0
