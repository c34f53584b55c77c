"""FAISS index benchmark on 1M synthetic clustered vectors (issue #3 goal: recall@10 >= 0.95 at
<= 10 ms/query; issue #8: re-ranked PQ, honest recall and latency, streaming store build).

    .venv/bin/python -m bench.bench_index [--n 1000000] [--dim 512] [--rows "auto@8;auto@1.5;Flat"]
                                          [--store-sizes 200000,400000] [--parts index,store]

Part ``index``: each row (``FACTORY[@BUDGET_GIB]``, ``auto`` = ``choose_factory``'s choice for
the budget) runs in a fresh process over an in-memory float32 corpus. Search parameters are
tuned on 1000 corpus queries and recall is measured on 1000 other ones (self excluded), with a
target of recall@10 >= 0.95 (a miss is recorded as ``target met: no``, not hidden). Throughput
is one batched search of the 1000 evaluation queries; latency is the median of 100 one-query
searches. Build peak = the process's peak RSS during the build minus its RSS once the vectors
exist (the peak is reset with /proc/self/clear_refs after the data is generated and after a tiny
warm-up build, so lazily allocated BLAS/OpenMP buffers are not counted). ``--threads 1`` runs the
measured processes single-threaded, which is what gives stable figures on a shared machine.

Part ``store``: the same data written as an EmbeddingStore (float16 shards of 50k rows) at two
sizes, each indexed in a fresh process (a) by ``build_index_dir`` (streaming: training sample +
one shard at a time) and (b) by ``store.load_all()`` + in-memory build (the pre-#8 path). Peak
RSS above the process's RSS before the build (after the same warm-up) shows what grows with the
corpus.

A part left out of ``--parts`` keeps its rows from the previous ``bench/results/index.json``;
``--merge`` adds the ``--rows`` measured now to the previous index rows (same factory and budget:
replaced).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from bench.common import RESULTS_DIR, run_isolated, write_results

logging.basicConfig(level=logging.WARNING)

PRELUDE = """
import json, os, time, numpy as np
def rss_mb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
from index.report import reset_peak_memory as reset_peak
def warm_up(d):
    # one tiny build first, so that lazily allocated BLAS/OpenMP buffers and imports are not counted as build memory
    from index.faiss_index import build_index
    w = np.random.default_rng(1).standard_normal((4000, d)).astype(np.float32)
    build_index(w / np.linalg.norm(w, axis=1, keepdims=True), "IVF16,PQ8x4,Refine(SQ8)", num_queries=50,
                allow_low_recall=True)
def clustered(n, d, seed=0, c=1000):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        x = centres[rng.integers(0, c, m)] + 0.7 * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)
"""

CODE_INDEX = (
    PRELUDE
    + """
from dataclasses import asdict
import faiss
from index.faiss_index import build_index, choose_factory, estimate_index_bytes
n, d = {n}, {dim}
x = np.empty((n, d), np.float32)
s = 0
for blk in clustered(n, d):
    x[s:s + len(blk)] = blk
    s += len(blk)
budget = int({budget_gib} * 2**30)
factory = {factory!r} or choose_factory(n, d, budget)
warm_up(d)
exact_peak = reset_peak()
base = rss_mb('VmRSS')
index, rep = build_index(x, factory, memory_budget_bytes=budget, target_recall=0.95, num_queries=1000,
                         allow_low_recall=True)
peak = rss_mb('VmHWM')
try:
    est = estimate_index_bytes(factory, n, d) / 2**20
except ValueError:
    est = None
print(json.dumps(dict(asdict(rep), auto=not {factory!r}, budget_gib={budget_gib}, index_mb=rep.index_bytes / 2**20,
    estimated_mb=est, build_peak_mb=peak - base, peak_reset=exact_peak, vectors_mb=x.nbytes / 2**20,
    date=time.strftime('%Y-%m-%d %H:%M:%S'), loadavg=os.getloadavg(), threads=faiss.omp_get_max_threads())))
"""
)

CODE_WRITE_STORE = (
    PRELUDE
    + """
from index.store import EmbeddingStore
st = EmbeddingStore({root!r})
st.create_or_check({{"clip_model": "bench-synthetic"}}, {dim})
s = 0
for i, blk in enumerate(clustered({n}, {dim})):
    ids = [str(j) for j in range(s, s + len(blk))]
    st.commit_shard(i, ids, ids, blk, [1] * len(blk), [1] * len(blk))
    s += len(blk)
print(json.dumps(dict(n=len(st), shards=len(st.shards))))
"""
)

CODE_STORE_BUILD = (
    PRELUDE
    + """
from index.catalog import build_index_dir
from index.faiss_index import build_index
from index.store import EmbeddingStore
import faiss, pyarrow.parquet
st = EmbeddingStore({root!r})
n, d = len(st), st.dim
warm_up(d)
exact_peak = reset_peak()
base = rss_mb('VmRSS')
t = time.perf_counter()
kw = dict(target_recall=0.95, num_queries=500, train_size=50_000, allow_low_recall=True)
if {mode!r} == 'stream':
    rep = build_index_dir(st, {out!r}, {factory!r}, **kw)
else:  # the pre-#8 path: the whole store as one float32 array, then the in-memory build
    emb, ids, uris = st.load_all()
    _, rep = build_index(emb, {factory!r}, **kw)
peak = rss_mb('VmHWM')
print(json.dumps(dict(mode={mode!r}, n=n, dim=d, factory={factory!r}, build_peak_mb=peak - base, peak_reset=exact_peak,
    index_mb=rep.index_bytes / 2**20, corpus_fp32_mb=n * d * 4 / 2**20, corpus_fp16_mb=n * d * 2 / 2**20,
    recall_at_10=rep.recall_at_10, seconds=time.perf_counter() - t, date=time.strftime('%Y-%m-%d %H:%M:%S'),
    loadavg=os.getloadavg(), threads=faiss.omp_get_max_threads())))
"""
)

STORE_FACTORY = "IVF1024,PQ32,Refine(SQ8)"


def _parse_row(spec: str):
    spec = spec.strip()
    factory, _, budget = spec.partition("@")
    return ("" if factory.strip() == "auto" else factory.strip()), float(budget or 8)


def run_index_rows(args):
    rows = []
    for spec in args.rows.split(";"):
        factory, budget = _parse_row(spec)
        try:
            rows.append(run_isolated(CODE_INDEX.format(n=args.n, dim=args.dim, factory=factory, budget_gib=budget)))
        except Exception as exc:  # report a failed build, do not hide it
            err = getattr(exc, "stderr", "") or str(exc)
            rows.append({"factory": factory or "auto", "budget_gib": budget, "error": str(err)[-300:]})
        print(rows[-1], flush=True)
    return rows


def run_store_rows(args):
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_index_store_") as tmp:
        for n in [int(v) for v in args.store_sizes.split(",")]:
            root = os.path.join(tmp, f"store_{n}")
            run_isolated(CODE_WRITE_STORE.format(root=root, n=n, dim=args.dim))
            for mode in ("stream", "load_all"):
                try:
                    rows.append(
                        run_isolated(
                            CODE_STORE_BUILD.format(
                                root=root, mode=mode, factory=STORE_FACTORY, out=os.path.join(tmp, f"ix_{n}")
                            )
                        )
                    )
                except Exception as exc:
                    err = getattr(exc, "stderr", "") or str(exc)
                    rows.append({"mode": mode, "n": n, "error": str(err)[-300:]})
                print(rows[-1], flush=True)
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(res) -> str:
    md = [
        f"{res['n']:,} vectors, dim {res['dim']}, 1000 Gaussian clusters (noise 0.7), L2-normalised, inner product. "
        "Search parameters (nprobe / efSearch, and k_factor for re-ranked indexes) tuned to recall@10 >= 0.95 on 1000 "
        "corpus queries; recall measured on 1000 *other* corpus queries (self excluded). Batched = one search call "
        "with the 1000 evaluation queries; single = median of 100 one-query calls. Training sample: "
        "max(100k, 50 nlist) rows (204,800 for nlist 4096; OPQ subsamples 65,536 of them itself). Budget = "
        "`memory_budget_bytes` given to the chooser; est. = `estimate_index_bytes`.",
        "",
        "| factory | budget GiB | params | recall@1 | recall@10 | target met | ms/query batched | queries/s batched "
        "| ms single query (median) | build s | index MB (est.) | build peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            md.append(f"| {r['factory']} | {r.get('budget_gib')} | failed: {r['error']} |||||||||")
            continue
        name = r["factory"] + (" (auto)" if r["auto"] else "")
        md.append(
            f"| {name} | {r['budget_gib']:g} | {r['search_params']} | {r['recall_at_1']:.3f} | "
            f"{r['recall_at_10']:.3f} | {'yes' if r['target_met'] else 'no'} | {r['batched_ms_per_query']:.3f} | "
            f"{r['batched_qps']:.0f} | {r['single_query_ms']:.2f} | {r['build_seconds']:.1f} | "
            f"{r['index_mb']:.0f} ({_fmt(r.get('estimated_mb'), '.0f')}) | {r['build_peak_mb']:.0f} |"
        )
    md += [
        "",
        "FAISS/BLAS threads per measured process, date and 1/5/15-min load average of the (shared, 2-core) "
        "machine, since other jobs ran alongside: "
        + "; ".join(
            f"{r['factory']}: {r.get('threads')} thread(s), {r.get('date')}, load "
            f"{tuple(round(v, 1) for v in r['loadavg'])}"
            for r in res["rows"]
            if "loadavg" in r
        ),
        "",
    ]
    if res.get("store_rows"):
        md += [
            "## Streaming store build: peak memory vs corpus size",
            "",
            f"EmbeddingStore with float16 shards of 50k rows, dim {res['dim']}, factory `{STORE_FACTORY}`, "
            "training sample 50k rows, 500 tuning + 500 evaluation queries. Peak = peak RSS during the build minus "
            "the RSS before it (fresh process per row). `stream` = `build_index_dir` (training sample, then one "
            "shard at a time, exact ground truth by streaming); `load_all` = `store.load_all()` + in-memory build "
            "(the path before issue #8).",
            "",
            "| vectors | path | build peak MB | index MB | corpus float32 MB | peak - index MB | recall@10 | s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["store_rows"]:
            if "error" in r:
                md.append(f"| {r['n']:,} | {r['mode']} | failed: {r['error']} ||||||")
                continue
            md.append(
                f"| {r['n']:,} | {r['mode']} | {r['build_peak_mb']:.0f} | {r['index_mb']:.0f} | "
                f"{r['corpus_fp32_mb']:.0f} | {r['build_peak_mb'] - r['index_mb']:.0f} | "
                f"{r['recall_at_10']:.3f} | {r['seconds']:.0f} |"
            )
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument(
        "--rows",
        default="auto@8;auto@1.5;Flat",
        help="';'-separated FACTORY[@BUDGET_GIB] (default budget 8); 'auto' = choose_factory's choice",
    )
    ap.add_argument("--store-sizes", default="200000,400000")
    ap.add_argument("--parts", default="index,store", help="index, store or both; others keep their previous rows")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the measured processes (default: inherited)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the previous index rows, replacing those with the same factory and budget",
    )
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    parts = {p.strip() for p in args.parts.split(",")}
    prev = {}
    if (RESULTS_DIR / "index.json").is_file():
        prev = json.loads((RESULTS_DIR / "index.json").read_text())
    t = time.perf_counter()
    rows = run_index_rows(args) if "index" in parts else prev.get("rows", [])
    if "index" in parts and args.merge:

        def key(r):
            return (
                "auto" if r.get("auto", not r.get("factory") or r.get("factory") == "auto") else r["factory"],
                float(r.get("budget_gib", 8)),
            )

        fresh = {key(r): r for r in rows}
        old_rows = prev.get("rows", [])
        rows = [fresh.pop(key(r), r) for r in old_rows] + list(fresh.values())
    store_rows = run_store_rows(args) if "store" in parts else prev.get("store_rows", [])
    res = {
        "n": args.n,
        "dim": args.dim,
        "rows": rows,
        "store_rows": store_rows,
        "store_factory": STORE_FACTORY,
        "bench_seconds": time.perf_counter() - t,
    }
    path = write_results("index", res, markdown(res))
    print(path.read_text())


if __name__ == "__main__":
    main()
