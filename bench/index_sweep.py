"""Operating points of one built index: recall and batched latency over a grid of nprobe x k_factor.

``reco build-index`` reports the one setting its tuner picked; this maps the curve around it, on the
same queries the scale benchmark uses (``bench.bench_index_scale``: text-like queries of the
synthetic modality gap, and corpus rows as image queries, each excluded from its own results).
Latency is one batched ``search`` per query set: image queries at k=10 (as ``index.json``
reports) and text-like queries at k=50 (a bank's archive is a top-50 list).

    python -m bench.index_sweep --store /tmp/reco-index-scale/store_1000000_512_10 \\
        --index /tmp/reco-index-scale/idx-1m --build "IVF2048,PQ256x4fs,Refine(store)" \\
        --nprobe 512,640,768,1024 --k-factor 16,32,64 --results index_sweep_1m

``--build`` builds the index first (layout shards, one Ray worker, parts of ``--part-rows``) and
keeps it at ``--index``; without it an existing index folder is swept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from typing import Any, Dict, List

import numpy as np

from bench.common import write_results
from bench.synth_modality import ModalityGap

logger = logging.getLogger(__name__)


def _timed(index, q: np.ndarray, k: int, repeats: int = 1):
    """(ids, median ms per query over ``repeats`` batched searches)."""
    ms = []
    for _ in range(repeats):
        t = time.perf_counter()
        _, ids = index.search(q, k)
        ms.append((time.perf_counter() - t) * 1000 / len(q))
    return ids, float(np.median(ms))


def sweep(
    index, source, text: np.ndarray, rows: np.ndarray, nprobes, k_factors, repeats: int = 1
) -> List[Dict[str, Any]]:
    """One row per (nprobe, k_factor): text-like and image recall@10/@50, ms/query batched (the
    median of ``repeats`` searches)."""
    from index.faiss_index import _set_search_param, recall_at
    from index.vectors import exact_topk

    img = source.take(rows)
    _, img_truth = exact_topk(source, img, 50, exclude_rows=rows)
    _, text_truth = exact_topk(source, text, 50)
    out = []
    for nprobe in nprobes:
        for kf in k_factors:
            _set_search_param(index, "nprobe", nprobe)
            _set_search_param(index, "k_factor", kf)
            t_ids, t_ms = _timed(index, text, 50, repeats)
            i_ids10, i_ms = _timed(index, img, 11, repeats)
            i_ids50, _ = _timed(index, img, 51)
            strip = lambda ids, k: np.stack([f[f != r][:k] for f, r in zip(ids, rows)])  # noqa: E731
            row = {
                "nprobe": nprobe,
                "k_factor": kf,
                "text_r10": round(recall_at(t_ids, text_truth, 10), 3),
                "text_r50": round(recall_at(t_ids, text_truth, 50), 3),
                "image_r10": round(recall_at(strip(i_ids10, 10), img_truth, 10), 3),
                "image_r50": round(recall_at(strip(i_ids50, 50), img_truth, 50), 3),
                "text_ms_k50": round(t_ms, 3),
                "image_ms_k10": round(i_ms, 3),
            }
            logger.info("%s", row)
            out.append(row)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--build", default="", help="factory to build at --index first (layout shards)")
    p.add_argument("--part-rows", type=int, default=500_000)
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--nprobe", default="512,768,1024")
    p.add_argument("--k-factor", default="16,64")
    p.add_argument("--queries", type=int, default=500, help="text-like and image queries each")
    p.add_argument("--repeats", type=int, default=1, help="timed searches per setting (the median is reported)")
    p.add_argument("--results", default="index_sweep")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from index.rerank import StoreRefine
    from index.store import EmbeddingStore
    from index.vectors import VectorSource

    store = EmbeddingStore(args.store)
    gap = ModalityGap(dim=store.dim, rank=48)
    text_all = gap.texts(gap.concepts(1000))  # the scale benchmark's text-like queries
    build_s = None
    if args.build:
        from cluster.config import RayRuntimeConfig
        from cluster.index_build import build_index_parts
        from cluster.index_config import IndexClusterConfig
        from cluster.runtime import init_ray

        init_ray(RayRuntimeConfig(num_cpus=2, object_store_memory_mb=1024))
        t = time.perf_counter()
        build_index_parts(
            store,
            args.index,
            args.build,
            allow_low_recall=True,
            num_queries=500,
            train_size=min(len(store), args.train_size),
            text_queries=text_all,
            cfg=IndexClusterConfig(part_rows=args.part_rows, workers=1, cpus_per_task=1, train_cpus=2, layout="shards"),
        )
        build_s = round(time.perf_counter() - t, 1)
    from index.index_files import load_index

    base, meta = load_index(args.index)
    source = VectorSource.from_store(store)
    index = StoreRefine(base, source)
    rng = np.random.default_rng(7)
    text = text_all[rng.permutation(len(text_all))[: args.queries]]
    rows = np.sort(rng.choice(source.n, size=args.queries, replace=False))
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    table = sweep(index, source, text, rows, ints(args.nprobe), ints(args.k_factor), args.repeats)
    rep = meta["report"]
    head = {
        "store": args.store,
        "n": source.n,
        "factory": rep["factory"],
        "layout": meta.get("layout"),
        "parts": len(meta.get("parts") or []),
        "tuned": rep.get("search_params"),
        "tuned_on": rep.get("tuned_on"),
        "report": {
            key: rep.get(key)
            for key in (
                "recall_text_at_10",
                "recall_text_at_50",
                "recall_at_10",
                "recall_image_at_50",
                "batched_ms_per_query",
                "rerank_bytes_per_query",
                "index_bytes",
            )
        },
        "build_stages": meta.get("build_stages"),
        "build_s": build_s,
        "repeats": args.repeats,
        "load_avg": os.getloadavg()[0],
    }
    lines = [
        "Command: `python -m bench.index_sweep " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])) + "`",
        "",
        f"Index: `{json.dumps(head)}`",
        "",
        "| nprobe | k_factor | text r@10 | text r@50 | image r@10 | image r@50 | text ms/query (k=50) "
        "| image ms/query (k=10) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['nprobe']} | {r['k_factor']} | {r['text_r10']} | {r['text_r50']} | {r['image_r10']} "
            f"| {r['image_r50']} | {r['text_ms_k50']} | {r['image_ms_k10']} |"
        )
    write_results(args.results, {"head": head, "rows": table}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
