"""The index in parts side by side with autofaiss (#17.8) at the same memory budget, on the same
text-like and image queries of a synthetic store of ``bench.bench_index_scale``.

Three steps (autofaiss lives in its own virtual environment: it pins numpy < 2, which the
project's pyarrow does not accept)::

    # 1. project venv: queries, exact truth, and our index (store re-rank, tuned on text-like queries)
    PYTHONPATH=$PWD .venv/bin/python -m bench.bench_autofaiss ours --store /tmp/reco-index-scale/store_1000000_512_10 \\
        --work /tmp/reco-autofaiss --factory "IVF2048,PQ64,Refine(store)" --max-nprobe 512
    # 2. a venv with autofaiss (python -m venv /tmp/afvenv; /tmp/afvenv/bin/pip install autofaiss faiss-cpu==1.15.1
    #    "pyarrow<18"), patched for faiss 1.15 (see bench/README.md), at our index's bytes as its budget:
    /tmp/afvenv/bin/python bench/bench_autofaiss.py autofaiss --store ... --work /tmp/reco-autofaiss
    # 3. project venv: bench/results/autofaiss.{md,json}
    PYTHONPATH=$PWD .venv/bin/python -m bench.bench_autofaiss report --work /tmp/reco-autofaiss

Queries: 500 text-like queries (concepts 500-999 of the generator, never used to tune either
index) and 500 image queries (random store rows, the row itself excluded from truth and results);
truth by exact search over the store. Ours is tuned on text-like queries of other concepts
(0-499); autofaiss tunes itself (on corpus rows, for ``max_index_query_time_ms`` 10 ms).
Step 2 imports only numpy, faiss and autofaiss.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

K, K50 = 10, 50


def _recalls(found: np.ndarray, truth: np.ndarray, self_rows: np.ndarray) -> Tuple[float, float]:
    """recall@10 and @50 of ``found`` (searched with k = 51; the query's own row dropped)."""
    out = []
    for k in (K, K50):
        hits = 0
        for f, t, s in zip(found, truth, self_rows):
            f = [r for r in f if r != s and r >= 0][:k]
            hits += len(set(f) & set(t[:k].tolist()))
        out.append(hits / (k * len(found)))
    return out[0], out[1]


def _measure(search, work: Path) -> Dict[str, Any]:
    """Recall@10/@50 and batched ms/query of ``search(queries, k) -> ids`` on the saved queries."""
    res: Dict[str, Any] = {}
    for name in ("text", "image"):
        q = np.load(work / f"{name}_queries.npy")
        truth = np.load(work / f"{name}_truth.npy")
        self_rows = np.load(work / f"{name}_self.npy")
        r10, _ = _recalls(search(q, K + 1), truth, self_rows)
        t = time.perf_counter()
        found = search(q, K50 + 1)
        ms = (time.perf_counter() - t) * 1000 / len(q)
        _, r50 = _recalls(found, truth, self_rows)
        res[name] = {"r10": round(r10, 3), "r50": round(r50, 3), "ms_per_query_k51": round(ms, 3)}
    return res


def ours(args) -> None:
    from bench.synth_modality import ModalityGap
    from index.store import EmbeddingStore
    from index.vectors import VectorSource, exact_topk

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = EmbeddingStore(args.store)
    source = VectorSource.from_store(store, list(store.shards))
    gap = ModalityGap(dim=store.dim, rank=48)
    texts = gap.texts(gap.concepts(1000))
    rows = np.sort(np.random.default_rng(7).choice(source.n, 500, replace=False))
    sets = {"text": (texts[500:], np.full(500, -1)), "image": (source.take(rows), rows)}
    for name, (q, self_rows) in sets.items():
        if not (work / f"{name}_truth.npy").exists():
            t = time.perf_counter()
            _, truth = exact_topk(source, np.ascontiguousarray(q, np.float32), K50, exclude_rows=self_rows)
            print(f"{name} truth: {time.perf_counter() - t:.1f} s", flush=True)
            np.save(work / f"{name}_queries.npy", np.ascontiguousarray(q, np.float32))
            np.save(work / f"{name}_truth.npy", truth)
            np.save(work / f"{name}_self.npy", self_rows)
    import index.faiss_index as fi

    t = time.perf_counter()
    index, rep = fi.build_index_from_source(
        source,
        args.factory,
        target_recall=0.95,
        allow_low_recall=True,
        num_queries=500,
        train_size=min(source.n, args.train_size),
        text_queries=texts[:500],
        max_nprobe=args.max_nprobe or None,
        use_gpu=False,
    )
    build_s = time.perf_counter() - t
    search_index = fi.store_refined(index, args.factory, source)
    fi._apply_params(search_index, rep.search_params)

    def search(q, k):
        return search_index.search(q, k)[1]

    row = {
        "system": "reco build-index (one process; --parts builds the same index)",
        "factory": args.factory,
        "build_s": round(build_s, 1),
        "index_bytes": rep.index_bytes,
        "params": rep.search_params,
        "tuned_on": "text-like queries (concepts 0-499)",
        **_measure(search, work),
    }
    (work / "ours.json").write_text(json.dumps(row, indent=2))
    print(row)


def autofaiss(args) -> None:
    import faiss
    from autofaiss import build_index

    work = Path(args.work)
    budget = args.budget or json.loads((work / "ours.json").read_text())["index_bytes"]
    budget_mb = max(1, int(np.ceil(budget / 2**20)))
    path = work / "autofaiss.index"
    t = time.perf_counter()
    _, infos = build_index(
        embeddings=str(Path(args.store) / "img_emb"),
        index_path=str(path),
        index_infos_path=str(work / "autofaiss_infos.json"),
        max_index_memory_usage=f"{budget_mb}MB",
        current_memory_available=args.memory,
        metric_type="ip",
        nb_cores=os.cpu_count(),
    )
    build_s = time.perf_counter() - t
    index = faiss.read_index(str(path))
    params = infos["index_param"] if infos else ""
    faiss.ParameterSpace().set_index_parameters(index, params)

    def search(q, k):
        return index.search(q, k)[1]

    row = {
        "system": "autofaiss 2.18.0 (build_index, its own choice and tuning)",
        "factory": infos.get("index_key") if infos else "",
        "build_s": round(build_s, 1),
        "index_bytes": path.stat().st_size,
        "budget": f"{budget_mb}MB",
        "params": params,
        "tuned_on": "autofaiss: corpus rows, max_index_query_time_ms 10",
        **_measure(search, work),
    }
    (work / "autofaiss.json").write_text(json.dumps(row, indent=2))
    print(row)


def report(args) -> None:
    from bench.common import write_results

    work = Path(args.work)
    rows = [json.loads((work / f"{n}.json").read_text()) for n in ("ours", "autofaiss")]
    md = [
        "| system | factory | build s | index MB | params | text r@10 | text r@50 | image r@10 | image r@50 "
        "| ms/query (batched, k 51) text / image |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        md.append(
            f"| {r['system']} | `{r['factory']}` | {r['build_s']} | {r['index_bytes'] / 2**20:.1f} | {r['params']} "
            f"| {r['text']['r10']} | {r['text']['r50']} | {r['image']['r10']} | {r['image']['r50']} "
            f"| {r['text']['ms_per_query_k51']} / {r['image']['ms_per_query_k51']} |"
        )
    md += ["", f"Commands: see the docstring of `bench/bench_autofaiss.py` (work folder {work})."]
    print(write_results("autofaiss", {"rows": rows}, "\n".join(md)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("ours", "autofaiss", "report"))
    p.add_argument("--store", default="/tmp/reco-index-scale/store_1000000_512_10")
    p.add_argument("--work", default="/tmp/reco-autofaiss")
    p.add_argument("--factory", default="IVF2048,PQ64,Refine(store)")
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--max-nprobe", type=int, default=512)
    p.add_argument("--budget", type=int, default=0, help="autofaiss memory budget in bytes (0: our index's bytes)")
    p.add_argument("--memory", default="8G", help="autofaiss current_memory_available")
    args = p.parse_args(argv)
    {"ours": ours, "autofaiss": autofaiss, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
