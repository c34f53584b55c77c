"""FAISS index over an embedding store: automatic choice, build, recall report, save/load.

Choice by corpus size and memory budget (inner product on L2-normalised vectors = cosine):

* ``Flat`` (exact) while n <= ``flat_max`` and the raw vectors fit the budget;
* ``IVF{nlist},Flat`` (nlist ~ 4 sqrt(n)) while the raw vectors fit: measured on 1M clustered
  512-d vectors at recall@10 0.96 with 0.5 ms per single query (``bench/results/index.md``);
  ``HNSW32,Flat`` is a good override when build time on many cores is cheap;
* ``OPQ{m},IVF{nlist},PQ{m}`` (``IVF{nlist}_HNSW32`` coarse quantiser from 10M on) when only
  compressed codes fit: ``m`` bytes per vector chosen from the budget (100M+ corpora).

Any FAISS factory string can be given instead. IVF ``nprobe`` / HNSW ``efSearch`` are tuned on a
held-out sample of the corpus until recall@10 against exact search reaches the target; every
build records recall@1/@10, latency, index size and build time in ``index.json``.
faiss-gpu is used for training/adding/search of IVF/Flat indexes when GPUs are visible
(``faiss.get_num_gpus()``); HNSW stays on the CPU (FAISS has no GPU HNSW).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .retriever import ExactRetriever, Retriever, SearchResult

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"


def _faiss():
    try:
        import faiss  # faiss-cpu or faiss-gpu, never both
    except ImportError as exc:  # pragma: no cover - faiss-cpu is pinned
        raise ImportError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on GPU hosts)") from exc
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _pow2(x: float) -> int:
    return 1 << max(4, int(round(math.log2(max(x, 16)))))


def choose_factory(n: int, dim: int, memory_budget_bytes: int = 8 << 30, flat_max: int = 100_000) -> str:
    """A FAISS factory string for ``n`` vectors of ``dim`` within ``memory_budget_bytes``."""
    if n <= 0:
        raise ValueError("cannot index an empty corpus")
    raw = n * dim * 4
    if n <= flat_max and raw <= memory_budget_bytes:
        return "Flat"
    nlist = _pow2(4 * math.sqrt(n))
    if raw * 1.1 <= memory_budget_bytes:
        return f"IVF{nlist},Flat"
    per_vector = memory_budget_bytes / n - 8  # ids are 8 bytes
    m = next((m for m in (64, 48, 32, 16, 8) if m <= per_vector and dim % m == 0), None)
    if m is None:
        raise ValueError(f"{n} vectors cannot fit {memory_budget_bytes / 2**30:.1f} GiB even as 8-byte PQ codes")
    coarse = f"IVF{nlist}_HNSW32" if n >= 10_000_000 else f"IVF{nlist}"
    return f"OPQ{m},{coarse},PQ{m}"


@dataclass
class IndexReport:
    factory: str
    n: int
    dim: int
    build_seconds: float
    index_bytes: int
    recall_at_1: float
    recall_at_10: float
    ms_per_query: float
    queries: int
    search_params: Dict[str, int] = field(default_factory=dict)
    gpu: bool = False


def _set_search_param(index, name: str, value: int) -> None:
    faiss = _faiss()
    faiss.ParameterSpace().set_index_parameter(index, name, value)


def _search_param_name(factory: str) -> Optional[str]:
    if "HNSW" in factory and "IVF" not in factory:
        return "efSearch"
    if "IVF" in factory:
        return "nprobe"
    return None


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k over queries."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def build_index(
    embeddings: np.ndarray,
    factory: Optional[str] = None,
    memory_budget_bytes: int = 8 << 30,
    target_recall: float = 0.95,
    num_queries: int = 1000,
    train_size: Optional[int] = None,
    use_gpu: Optional[bool] = None,
    seed: int = 0,
) -> Tuple[Any, IndexReport]:
    """Build an inner-product index over (N, E) L2-normalised embeddings and report its quality.

    The evaluation queries are a random sample of the corpus itself; each query's own row is
    removed from both the exact and the approximate result lists before recall is computed.
    """
    faiss = _faiss()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    factory = factory or choose_factory(n, dim, memory_budget_bytes)
    use_gpu = (gpu_count() > 0) if use_gpu is None else use_gpu
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    gpu_index = None
    if use_gpu and "HNSW" not in factory:
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    work = gpu_index if gpu_index is not None else index
    if not work.is_trained:
        ts = train_size or min(n, max(256 * _nlist(factory), 100_000))
        sample = x[rng.choice(n, size=min(ts, n), replace=False)] if ts < n else x
        work.train(sample)
    for start in range(0, n, 1_000_000):
        work.add(x[start:start + 1_000_000])
    if gpu_index is not None:
        index = faiss.index_gpu_to_cpu(gpu_index)
    build_s = time.perf_counter() - t0

    q_idx = rng.choice(n, size=min(num_queries, n), replace=False)
    queries = x[q_idx]
    k_eval = min(10, n - 1) if n > 1 else 1
    truth = _drop_self(ExactRetriever(x, [str(i) for i in range(n)]).search(queries, k_eval + 1), q_idx, k_eval)
    param = _search_param_name(factory)
    params: Dict[str, int] = {}
    search_index = gpu_index if gpu_index is not None else index
    value = 1
    cap = _nlist(factory) if param == "nprobe" else 4096
    while True:
        if param:
            _set_search_param(search_index, param, value)
            params = {param: value}
        t = time.perf_counter()
        _, found = search_index.search(queries, k_eval + 1)
        ms = (time.perf_counter() - t) * 1000 / len(queries)
        found = np.stack([_strip(f, qi, k_eval) for f, qi in zip(found, q_idx)])
        r10 = recall_at(found, truth, k_eval)
        if not param or r10 >= target_recall or value >= cap:
            break
        value = min(value * 2, cap)
    if param:
        _set_search_param(index, param, value)
    r1 = recall_at(found, truth, 1)
    rep = IndexReport(factory, n, dim, build_s, _index_bytes(index), r1, r10, ms, len(queries), params, gpu_index is not None)
    logger.info("index %s: n=%d recall@1 %.3f recall@10 %.3f %.2f ms/query (%s) built in %.1fs, %.1f MB",
                factory, n, r1, r10, ms, params or "exact", build_s, rep.index_bytes / 2**20)
    return index, rep


def _nlist(factory: str) -> int:
    import re

    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 1


def _strip(row: np.ndarray, self_row: int, k: int) -> np.ndarray:
    r = [int(v) for v in row if v != self_row and v >= 0][:k]
    return np.array(r + [-1] * (k - len(r)), dtype=np.int64)


def _drop_self(results: List[SearchResult], q_idx: np.ndarray, k: int) -> np.ndarray:
    return np.stack([_strip(r.rows, qi, k) for r, qi in zip(results, q_idx)])


def _index_bytes(index) -> int:
    faiss = _faiss()
    return int(faiss.serialize_index(index).nbytes)


def save_index(index, report: IndexReport, directory: os.PathLike | str, extra: Optional[Dict[str, Any]] = None) -> Path:
    faiss = _faiss()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, d / INDEX_FILE)
    meta = {"report": asdict(report), **(extra or {})}
    (d / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2))
    os.replace(d / (META_FILE + ".tmp"), d / META_FILE)
    return d


def load_index(directory: os.PathLike | str) -> Tuple[Any, Dict[str, Any]]:
    faiss = _faiss()
    d = Path(directory)
    if not (d / INDEX_FILE).is_file() or not (d / META_FILE).is_file():
        raise FileNotFoundError(f"{d} holds no index (needs {INDEX_FILE} and {META_FILE}); run `reco build-index`")
    index = faiss.read_index(str(d / INDEX_FILE))
    meta = json.loads((d / META_FILE).read_text())
    for name, value in (meta["report"].get("search_params") or {}).items():
        _set_search_param(index, name, int(value))
    return index, meta


class FaissRetriever(Retriever):
    """FAISS-backed :class:`Retriever`; row r of the index is ``ids[r]``."""

    def __init__(self, index, ids: Sequence[str]):
        if index.ntotal != len(ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index = index
        self.ids = list(ids)

    def search(self, queries: np.ndarray, k: int) -> List[SearchResult]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.ids))
        scores, rows = self.index.search(q, k)
        out = []
        for s, r in zip(scores, rows):
            keep = r >= 0
            out.append(SearchResult([self.ids[i] for i in r[keep]], s[keep], r[keep]))
        return out
