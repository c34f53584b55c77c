"""FAISS index benchmark on 1M synthetic clustered vectors (issue #3 goal: recall@10 >= 0.95 at
<= 10 ms/query), with build time, index size and the build's peak memory.

    .venv/bin/python -m bench.bench_index [--n 1000000] [--dim 512]

Each factory runs in a fresh process; peak memory = peak RSS minus the RSS after the vectors
exist, i.e. what the build itself adds. Latency is reported both batched (1000 queries in one
call, per query) and one query at a time.
"""
from __future__ import annotations

import argparse
import logging

from bench.common import run_isolated, write_results

logging.basicConfig(level=logging.WARNING)

CODE = """
import json, resource, time, numpy as np
from index.faiss_index import build_index, choose_factory
rng = np.random.default_rng(0)
n, d, c = {n}, {dim}, 1000
centres = rng.standard_normal((c, d), dtype=np.float32)
centres /= np.linalg.norm(centres, axis=1, keepdims=True)
x = np.empty((n, d), np.float32)
for s in range(0, n, 100_000):
    m = min(100_000, n - s)
    x[s:s + m] = centres[rng.integers(0, c, m)] + 0.7 * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
x /= np.linalg.norm(x, axis=1, keepdims=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
factory = {factory!r} or choose_factory(n, d)
index, rep = build_index(x, factory, target_recall=0.95, num_queries=1000)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q = x[rng.choice(n, 100, replace=False)]
t = time.perf_counter()
for i in range(100):
    index.search(q[i:i + 1], 10)
single_ms = (time.perf_counter() - t) * 10
print(json.dumps(dict(factory=factory, auto=not {factory!r}, recall_at_1=rep.recall_at_1, recall_at_10=rep.recall_at_10,
    batched_ms_per_query=rep.ms_per_query, single_query_ms=single_ms, build_seconds=rep.build_seconds,
    index_mb=rep.index_bytes / 2**20, search_params=rep.search_params,
    build_peak_mb=(peak - base) / 1024, vectors_mb=x.nbytes / 2**20)))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--factories", default="auto;OPQ64,IVF4096,PQ64;Flat",
                    help="';'-separated FAISS factory strings; 'auto' = choose_factory's choice")
    args = ap.parse_args()
    rows = []
    for f in args.factories.split(";"):
        f = "" if f.strip() == "auto" else f.strip()
        try:
            rows.append(run_isolated(CODE.format(n=args.n, dim=args.dim, factory=f)))
        except Exception as exc:  # report a failed build, do not hide it
            rows.append({"factory": f or "auto", "error": str(exc)[-300:]})
        print(rows[-1], flush=True)
    md = [f"{args.n:,} vectors, dim {args.dim}, 1000 Gaussian clusters (noise 0.7), L2-normalised, inner product. "
          "Recall vs exact search on 1000 corpus queries (self excluded); search parameter tuned to recall@10 >= 0.95.", "",
          "| factory | params | recall@1 | recall@10 | ms/query batched | ms/query single | build s | index MB | build peak MB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['factory']} | failed: {r['error']} |||||||")
            continue
        name = r["factory"] + (" (auto)" if r["auto"] else "")
        md.append(f"| {name} | {r['search_params']} | {r['recall_at_1']:.3f} | {r['recall_at_10']:.3f} | "
                  f"{r['batched_ms_per_query']:.3f} | {r['single_query_ms']:.2f} | {r['build_seconds']:.1f} | "
                  f"{r['index_mb']:.0f} | {r['build_peak_mb']:.0f} |")
    path = write_results("index", {"n": args.n, "dim": args.dim, "rows": rows}, "\n".join(md))
    print(path.read_text())


if __name__ == "__main__":
    main()
