"""Exact retrieval for a whole vocabulary in one Ray Data pass over an embedding store (#17.1).

Each Ray Data block is one store shard: its worker reads the shard's float16 embeddings (memory
mapped locally, one GET on S3), scores every query (the concepts' prompt-ensembled text
embeddings) against them block by block (one (Q, E) @ (E, rows) matmul each) and keeps a top-k
list per query (:mod:`index.topk`); the driver merges the partial lists as they stream in. Recall
is 1.0 by construction and the whole vocabulary costs one read of the store. The order is that of
:class:`index.retriever.ExactRetriever` (score, then lower store row), so the result equals it.

Where the cluster has GPUs, each block is scored on one (bf16 matmul, candidates re-scored in
float32 at the top-k boundary: :func:`index.topk.block_topk_torch`); elsewhere in float32 numpy.
A lost worker's shard is re-run by Ray Data's task retries (partial lists are pure functions of a
shard, so a retried shard contributes once).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from index import topk
from index.retriever import Retriever, SearchResult
from index.store import EmbeddingStore, ShardRecord

from . import faults

logger = logging.getLogger(__name__)

#: corpus rows scored per matmul inside a shard: bounds the (Q, rows) float32 score block
SCORE_BYTES = 256 << 20


@dataclass(frozen=True)
class ExactPassStats:
    shards: int
    rows: int
    queries: int
    seconds: float
    device: str

    @property
    def pairs_per_second(self) -> float:
        return self.rows * self.queries / self.seconds if self.seconds > 0 else float("inf")


def _rows_per_block(nq: int, cap: int = 65536) -> int:
    return int(max(256, min(cap, SCORE_BYTES // (4 * max(1, nq)))))


def shard_topk(
    store: EmbeddingStore, shard: ShardRecord, first_row: int, queries: np.ndarray, k: int, device: Optional[str] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` over one shard whose first row is corpus row ``first_row``."""
    emb = store.shard_embeddings(shard)
    best = topk.empty(len(queries), k)
    step = _rows_per_block(len(queries))
    for a in range(0, shard.count, step):
        part = topk.block_topk(queries, emb[a : a + step], first_row + a, k, device)
        best = topk.merge(best, part, k)
    return best


def _score_batch(
    batch: Dict[str, np.ndarray], root: str, storage_options: Dict[str, Any], qref: list, k: int, device: Optional[str]
) -> Dict[str, np.ndarray]:
    """Ray Data map_batches function: one row per shard in, one (Q, k) partial list per shard out."""
    import ray

    faults.fire("exact.block", len(batch["index"]))
    queries = ray.get(qref[0])
    store = EmbeddingStore(root, storage_options=storage_options)
    scores, rows = [], []
    for i in range(len(batch["index"])):
        shard = ShardRecord(int(batch["index"][i]), int(batch["count"][i]), 0, str(batch["token"][i]))
        s, r = shard_topk(store, shard, int(batch["offset"][i]), queries, k, device)
        scores.append(s)
        rows.append(r)
    return {"scores": np.stack(scores), "rows": np.stack(rows)}


def _store_root(store: EmbeddingStore) -> str:
    return store.root if store.is_url else str(store.root)


def exact_search_store(
    store: EmbeddingStore,
    queries: np.ndarray,
    k: int,
    shards: Optional[Sequence[ShardRecord]] = None,
    use_gpu: Optional[bool] = None,
) -> Tuple[np.ndarray, np.ndarray, ExactPassStats]:
    """(scores (Q, k'), store rows (Q, k'), stats) with k' = min(k, rows in the store), exact, in
    :mod:`index.topk` order, over the committed shards (a snapshot: ``shards`` or the manifest's)."""
    import ray

    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != store.dim:
        raise ValueError(
            f"queries have dimension {q.shape[1]} but the store {store.root} holds {store.dim}-d "
            "embeddings: use the CLIP the store was embedded with"
        )
    shards = [s for s in (store.shards if shards is None else shards)]
    offsets = np.concatenate([[0], np.cumsum([s.count for s in shards])]).astype(np.int64)
    n = int(offsets[-1])
    if n == 0:
        raise ValueError(f"{store.root} holds no embeddings: run `reco embed` first")
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    device = "cuda" if use_gpu else None
    t0 = time.perf_counter()
    items = [
        {"index": s.index, "count": s.count, "token": s.token, "offset": int(o)}
        for s, o in zip(shards, offsets[:-1])
        if s.count
    ]
    qref = ray.put(q)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _score_batch,
        batch_size=1,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
        fn_kwargs={
            "root": _store_root(store),
            "storage_options": dict(store.storage_options),
            "qref": [qref],
            "k": k,
            "device": device,
        },
    )
    best = topk.empty(len(q), k)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for s, r in zip(batch["scores"], batch["rows"]):
            best = topk.merge(best, (s, r), k)
    stats = ExactPassStats(len(items), n, len(q), time.perf_counter() - t0, device or "cpu")
    logger.info(
        "exact pass: %d queries x %d rows in %d shards, %.1f s (%.3g pairs/s, %s)",
        len(q),
        n,
        len(items),
        stats.seconds,
        stats.pairs_per_second,
        stats.device,
    )
    return best[0], best[1], stats


def row_metadata(
    store: EmbeddingStore,
    rows: np.ndarray,
    shards: Optional[Sequence[ShardRecord]] = None,
) -> Dict[int, Tuple[str, str]]:
    """{store row: (id, uri)} for the given rows, reading only the metadata of shards holding them."""
    shards = list(store.shards if shards is None else shards)
    offsets = np.concatenate([[0], np.cumsum([s.count for s in shards])]).astype(np.int64)
    want = np.unique(np.asarray(rows, np.int64).ravel())
    want = want[want >= 0]
    out: Dict[int, Tuple[str, str]] = {}
    where = np.searchsorted(offsets, want, side="right") - 1
    for si in np.unique(where):
        t = store.shard_metadata(shards[int(si)])
        ids, uris = t.column("id").to_pylist(), t.column("uri").to_pylist()
        for r in want[where == si]:
            j = int(r - offsets[si])
            out[int(r)] = (ids[j], uris[j])
    return out


class StoreExactRetriever(Retriever):
    """:class:`Retriever` over a store by the Ray Data exact pass (no index)."""

    def __init__(self, store: EmbeddingStore, use_gpu: Optional[bool] = None):
        self.store = store
        self.shards = list(store.shards)
        self.use_gpu = use_gpu
        self.uris: Dict[str, str] = {}
        self.last_stats: Optional[ExactPassStats] = None

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> List[SearchResult]:
        s, r, self.last_stats = exact_search_store(self.store, queries, k, self.shards, self.use_gpu)
        meta = row_metadata(self.store, r, self.shards)
        self.uris.update(meta.values())
        out = []
        for sq, rq in zip(s, r):
            keep = rq >= 0
            out.append(SearchResult([meta[int(i)][0] for i in rq[keep]], sq[keep], rq[keep]))
        return out


def index_lag(meta: Dict[str, Any], storage_options: Optional[Dict[str, Any]] = None) -> Optional[int]:
    """Store rows committed since the index was built (None when the store cannot be read)."""
    try:
        store = EmbeddingStore(meta["store"], storage_options=storage_options)
        return len(store) - int(meta.get("store_total", 0))
    except Exception as exc:  # the index is still usable without its store
        logger.debug("cannot read the store of the index: %s", exc)
        return None


def open_index(
    index: str,
    storage_options: Optional[Dict[str, Any]] = None,
    exact: bool = False,
    serve_actors: Optional[int] = None,
    ray_config: Optional[str] = None,
) -> Tuple[Retriever, Dict[str, str], Dict[str, Any]]:
    """:func:`index.catalog.open_retriever`, with an index kept as parts served by Ray actors
    (:class:`cluster.index_serve.ShardedRetriever`; ``serve_actors`` of them, default
    ``index.serve_actors`` of configs/cluster.yaml, Ray started if needed); logs how many store rows
    the index lacks."""
    from index.catalog import open_retriever

    from .index_serve import ShardedRetriever

    def serve(uri: str, meta: Dict[str, Any], ids: List[str]) -> Retriever:
        import ray

        from .config import resolve_cluster_config
        from .runtime import init_ray

        cluster = resolve_cluster_config(ray_config)
        if not ray.is_initialized():
            init_ray(cluster.ray)
        return ShardedRetriever(
            uri, meta, ids, actors=serve_actors or cluster.index.serve_actors, storage_options=storage_options
        )

    retriever, uris, meta = open_retriever(index, exact=exact, storage_options=storage_options, serve_parts=serve)
    lag = index_lag(meta, storage_options)
    if lag:
        logger.warning(
            "the index %s lacks %d store row(s) committed since it was built (%d indexed): "
            "reco build-index --update adds them",
            index,
            lag,
            meta.get("store_total", 0),
        )
    return retriever, uris, meta


def retrieve_archives(
    todo: Sequence[str],
    texts: Mapping[str, Any],
    k: int,
    index: str,
    exact_store: bool = False,
    storage_options: Optional[Dict[str, Any]] = None,
    serve_actors: Optional[int] = None,
) -> Dict[str, List[str]]:
    """{concept: top-k image URIs} for ``build-bank``: exact over the store ``index`` (one Ray Data
    pass) when ``exact_store``, else from the FAISS index ``index`` (parts served by Ray actors)."""
    if not todo:
        return {}
    q = np.stack([np.asarray(texts[n], dtype=np.float32) for n in todo])
    if exact_store:
        store = EmbeddingStore(index, storage_options=storage_options)
        if not store.exists:
            raise FileNotFoundError(f"--store {index} is not an embedding store (no manifest.json): run `reco embed`")
        retriever: Retriever = StoreExactRetriever(store)
        hits = retriever.search(q, k)
        uris = retriever.uris
    else:
        retriever, uris, _ = open_index(index, storage_options, serve_actors=serve_actors)
        hits = retriever.search(q, k)
    return {n: [uris[i] for i in h.ids] for n, h in zip(todo, hits)}
