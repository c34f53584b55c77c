"""The index as a cluster (#17.8): a synthetic store with the modality gap, built in parts with 1
and 2 Ray workers, store re-rank vs Refine(SQfp16), text-like and image recall, exact pass rate.

    .venv/bin/python -m bench.bench_index_scale --sizes 1000000,10000000 --builds store:1,store:2,SQfp16:2 \
        --nlist 2048 --shard-rows 100000 --part-rows 500000 --exact-size 1000000 [--data DIR]

For each corpus size: a store of float16 shards (``bench.synth_modality``: a continuum corpus
whose text-like queries sit apart from the images, see ``bench/README.md``) is written under
``--data`` (kept between runs: not committed), then ``reco build-index --parts`` is run through
:func:`cluster.index_build.build_index_parts` on an embedded Ray (``num_cpus`` 2) with the
part workers each ``--builds`` entry names (``REFINE:WORKERS``), for ``IVF{nlist},PQ32,Refine(store)`` (PQ codes in RAM, re-rank from the
store) and ``...,Refine(SQfp16)`` (re-rank codes in RAM), tuned on text-like queries (``--opq
OPQ32,`` adds the rotation, whose training is slow on 2 cores). Each build reports the
peak RSS of its training task and of its largest part task (Ray workers: flat in corpus size when
``--part-rows`` is fixed) and the load average around it. Exact retrieval:
:func:`cluster.retrieval.exact_search_store` with 1k and 10k text-like concepts over the
``--exact-size`` store, as (rows x concepts) per second per core. Writes
``bench/results/index_scale.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from bench.common import write_results
from bench.synth_modality import ModalityGap

logging.basicConfig(level=logging.WARNING)


def make_store(root: Path, n: int, gap: ModalityGap, n_concepts: int, shard_rows: int):
    from index.store import EmbeddingStore

    st = EmbeddingStore(root)
    if st.exists and len(st) == n:
        return st
    st.create_or_check({"clip_model": "synthetic-modality-gap"}, gap.dim)
    cons = gap.concepts(n_concepts)
    for i, a in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - a)
        x = gap.images(m, cons, seed=100 + i)[0]
        ids = [f"r{j}" for j in range(a, a + m)]
        st.commit_shard(i, ids, ids, x, [1] * m, [1] * m)
    return st


def build_row(
    store,
    out: Path,
    factory: str,
    workers: int,
    part_rows: int,
    text: np.ndarray,
    train_size: int,
    train_cpus: int,
    max_nprobe: int = 0,
    layout: str = "merged",
) -> Dict[str, Any]:
    import json

    from cluster.index_build import build_index_parts
    from cluster.index_config import IndexClusterConfig

    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    rep = build_index_parts(
        store,
        str(out),
        factory,
        target_recall=0.95,
        allow_low_recall=True,
        num_queries=500,
        train_size=min(len(store), train_size),
        text_queries=text,
        cfg=IndexClusterConfig(
            part_rows=part_rows, workers=workers, cpus_per_task=1, train_cpus=train_cpus, layout=layout
        ),
        max_nprobe=max_nprobe or None,
    )
    stages = json.loads((out / "index.json").read_text())["build_stages"]
    mb = 2**20
    return {
        "factory": factory,
        "layout": layout,
        "n": rep.n,
        "workers": workers,
        "wall_s": round(time.perf_counter() - t, 1),
        "train_s": round(stages["train_s"], 1),
        "parts_s": round(stages["parts_s"], 1),
        "train_size": min(len(store), train_size),
        "train_peak_mb": round(stages["train_peak_rss"] / mb),
        "part_peak_mb": round(stages["part_peak_rss"] / mb),
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # cumulative
        "load_before_after": [round(load0, 1), round(os.getloadavg()[0], 1)],
        "index_mb": round(rep.index_bytes / 2**20, 1),
        "params": rep.search_params,
        "text_r10": round(rep.recall_text_at_10, 3),
        "text_r50": round(rep.recall_text_at_50, 3),
        "image_r10": round(rep.recall_at_10, 3),
        "image_r50": round(rep.recall_image_at_50, 3),
        "ms_per_query": round(rep.batched_ms_per_query, 3),
        "rerank_kb_per_query": round(rep.rerank_bytes_per_query / 1024, 1),
    }


def exact_row(store, gap: ModalityGap, n_concepts: int) -> Dict[str, Any]:
    from cluster.retrieval import exact_search_store

    text = gap.texts(gap.concepts(n_concepts))
    _, _, st = exact_search_store(store, text, 50, use_gpu=False)
    cores = 2
    return {
        "n": st.rows,
        "concepts": n_concepts,
        "seconds": round(st.seconds, 1),
        "pairs_per_s_per_core": float(f"{st.pairs_per_second / cores:.3g}"),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--concepts", default="1000,10000")
    p.add_argument(
        "--builds",
        default="store:1,store:2,SQfp16:2",
        help="REFINE:WORKERS[@SIZE], comma separated: every size, or only SIZE",
    )
    p.add_argument("--pq", type=int, default=0, help="PQ sub-quantisers (0: 32)")
    p.add_argument(
        "--pq-bits",
        type=int,
        default=8,
        choices=(8, 4),
        help="bits per PQ code: 8 (PQm, m bytes per vector) or 4 (PQmx4fs: FAISS's SIMD fast-scan, m/2 bytes)",
    )
    p.add_argument("--results", default="index_scale", help="bench/results/NAME.{md,json}")
    p.add_argument(
        "--layout", default="merged", choices=("merged", "shards"), help="index.layout (fast-scan PQ: shards only)"
    )
    p.add_argument("--max-nprobe", type=int, default=0, help="tuning probes at most this many lists (0: nlist)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 sqrt(n) rounded to a power of 2)")
    p.add_argument("--train-size", type=int, default=0, help="quantiser sample rows (0: max(100k, 40 nlist))")
    p.add_argument("--train-cpus", type=int, default=2, help="CPUs (FAISS threads) of the training task")
    p.add_argument("--exact-size", type=int, default=0, help="store size of the exact pass (0: the smallest)")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "reco-index-scale"))
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--part-rows", type=int, default=50_000)
    p.add_argument(
        "--images-per-concept",
        type=int,
        default=10,
        help="corpus images per concept: at 100 an IVF list holds about one concept and nprobe 1 suffices "
        "(a clustered corpus); at 10 lists hold many concepts (the gap shows)",
    )
    p.add_argument(
        "--opq", default="", help='e.g. "OPQ32," (its training took 220 s for 20k x 64 here: off by default)'
    )
    args = p.parse_args(argv)

    import ray

    from cluster.config import RayRuntimeConfig
    from cluster.runtime import init_ray

    init_ray(RayRuntimeConfig(num_cpus=2, object_store_memory_mb=1024))
    gap = ModalityGap(dim=args.dim, rank=48)
    text = gap.texts(gap.concepts(1000))  # text-like queries: the first 1000 concepts of the corpus
    sizes = [int(s) for s in args.sizes.split(",")]
    builds: List[Dict[str, Any]] = []
    stores = {}
    for n in sizes:
        t = time.perf_counter()
        stores[n] = make_store(
            Path(args.data) / f"store_{n}_{args.dim}_{args.images_per_concept}",
            n,
            gap,
            max(1000, n // args.images_per_concept),
            args.shard_rows,
        )
        print(f"store {n} x {args.dim}: {time.perf_counter() - t:.1f} s", flush=True)
        nlist = args.nlist or 1 << max(4, int(round(math.log2(4 * math.sqrt(n)))))
        m = args.pq or (32 if args.dim % 32 == 0 else 16)
        ts = args.train_size or max(100_000, 40 * nlist)
        with tempfile.TemporaryDirectory(dir=args.data) as tmp:
            for spec in args.builds.split(","):
                spec, _, only = spec.partition("@")
                if only and int(only) != n:
                    continue
                refine, w = spec.split(":")
                pq = f"PQ{m}x4fs" if args.pq_bits == 4 else f"PQ{m}"
                f = f"{args.opq}IVF{nlist},{pq},Refine({refine})"
                # builds of one factory share one output folder: the second finds the trained quantiser of
                # the same configuration there and reuses it (as a rerun would); its parts are rebuilt
                out = Path(tmp) / refine
                shutil.rmtree(out / "parts", ignore_errors=True)
                row = build_row(
                    stores[n], out, f, int(w), args.part_rows, text, ts, args.train_cpus, args.max_nprobe, args.layout
                )
                print(row, flush=True)
                builds.append(row)
    exact_n = args.exact_size or sizes[0]
    exact = [exact_row(stores[exact_n], gap, int(c)) for c in args.concepts.split(",") if c]
    for r in exact:
        print(r, flush=True)
    ray.shutdown()
    md = [
        "| n | factory | Ray workers | wall s | train s (rows) | parts s | index MB | search params | text r@10 "
        "| text r@50 | image r@10 | image r@50 | ms/query (batched) | re-rank KB/query | peak RSS MB: train task "
        "/ part task / driver (cumulative) | load avg before / after |",
        "|" + "---|" * 16,
    ]
    for r in builds:
        md.append(
            f"| {r['n']:,} | `{r['factory']}` ({r.get('layout', 'merged')}) | {r['workers']} | {r['wall_s']} | {r['train_s'] or 'reused'} ({r['train_size']:,}) "
            f"| {r['parts_s']} | {r['index_mb']} | {r['params']} | {r['text_r10']} | {r['text_r50']} "
            f"| {r['image_r10']} | {r['image_r50']} | {r['ms_per_query']} | {r['rerank_kb_per_query']} "
            f"| {r['train_peak_mb'] or '-'} / {r['part_peak_mb']} / {r['driver_peak_mb']} "
            f"| {r['load_before_after'][0]} / {r['load_before_after'][1]} |"
        )
    if exact:
        md += ["", "| store rows | concepts | seconds | (rows x concepts)/s per core |", "|---|---|---|---|"]
        md += [f"| {r['n']:,} | {r['concepts']:,} | {r['seconds']} | {r['pairs_per_s_per_core']:.3g} |" for r in exact]
    md += [
        "",
        f"Command: `python -m bench.bench_index_scale --sizes {args.sizes} --dim {args.dim} "
        f"--concepts '{args.concepts}' --builds {args.builds} --pq {args.pq} --pq-bits {args.pq_bits} "
        f"--results {args.results} --layout {args.layout} --max-nprobe {args.max_nprobe} --nlist {args.nlist} --train-size {args.train_size} "
        f"--train-cpus {args.train_cpus} --exact-size {args.exact_size} --shard-rows {args.shard_rows} "
        f"--part-rows {args.part_rows} --images-per-concept {args.images_per_concept}`; "
        f"data generated under {args.data} (not committed).",
    ]
    path = write_results(args.results, {"builds": builds, "exact": exact, "args": vars(args)}, "\n".join(md))
    print(path)


if __name__ == "__main__":
    main()
