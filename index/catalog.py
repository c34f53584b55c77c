"""Index directories: a FAISS index + the row->(id, uri) table + provenance, and opening them
as a :class:`Retriever` (FAISS, or exact search over the same store for checking).

:func:`build_index_dir` streams the store: it never loads the corpus as a whole. The FAISS build
reads a training sample and then one shard at a time from the float16 shard files (see
:mod:`index.faiss_index`), and the row table is written shard by shard. Only the shards committed
when the build starts are indexed (a snapshot of the manifest), so embeddings committed during
the build are left for the next one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .faiss_index import (
    FaissRetriever,
    IndexReport,
    VectorSource,
    build_index_from_source,
    load_index,
    save_index,
)
from .retriever import ExactRetriever, Retriever
from .store import EmbeddingStore

logger = logging.getLogger(__name__)

ROWS_FILE = "rows.parquet"


def build_index_dir(
    store: EmbeddingStore,
    out_dir: os.PathLike | str,
    factory: Optional[str] = None,
    memory_budget_bytes: int = 8 << 30,
    target_recall: float = 0.95,
    allow_low_recall: bool = False,
    num_queries: int = 1000,
    train_size: Optional[int] = None,
    seed: int = 0,
    use_gpu: Optional[bool] = None,
) -> IndexReport:
    """Build an index over every committed embedding of ``store`` into ``out_dir``.

    Raises ``FileNotFoundError`` if the store does not exist, ``ValueError`` if it is empty and
    :class:`index.faiss_index.LowRecallError` if the recall target is missed (unless
    ``allow_low_recall``); nothing is written to ``out_dir`` in these cases.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(store.root)
    if not root.is_dir() or not store.exists:
        raise FileNotFoundError(f"{root} is not an embedding store (no manifest.json): run `reco embed` first")
    shards = list(store.shards)
    if sum(s.count for s in shards) == 0:
        raise ValueError(f"{root} holds no embeddings: run `reco embed` first")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)

    # row table first (cheap, and checks every shard's metadata against the manifest)
    schema = pa.schema([("id", pa.string()), ("uri", pa.string())])
    tmp_rows = d / (ROWS_FILE + ".tmp")
    try:
        with pq.ParquetWriter(tmp_rows, schema) as w:
            for s in shards:
                t = store.shard_metadata(s).select(["id", "uri"])
                if t.num_rows != s.count:
                    raise ValueError(f"shard {s.name} of {root}: {t.num_rows} metadata rows, manifest says {s.count}")
                w.write_table(t.cast(schema))
        index, report = build_index_from_source(
            VectorSource.from_store(store, shards), factory, memory_budget_bytes, target_recall,
            num_queries=num_queries, train_size=train_size, seed=seed, allow_low_recall=allow_low_recall,
            use_gpu=use_gpu)
    except BaseException:
        tmp_rows.unlink(missing_ok=True)
        raise
    os.replace(tmp_rows, d / ROWS_FILE)
    save_index(index, report, d, {"store": str(root.resolve()), "model": store.manifest()["model"],
                                  "store_total": report.n})
    return report


def open_retriever(index_dir: os.PathLike | str, exact: bool = False) -> Tuple[Retriever, Dict[str, str], Dict[str, Any]]:
    """(retriever, {id: uri}, index metadata) of an index directory."""
    import pyarrow.parquet as pq

    d = Path(index_dir)
    index, meta = load_index(d)
    rows = pq.read_table(d / ROWS_FILE)
    ids = rows.column("id").to_pylist()
    uris = dict(zip(ids, rows.column("uri").to_pylist()))
    if exact:
        emb, sids, _ = EmbeddingStore(meta["store"]).load_all()
        if sids != ids:
            raise ValueError(f"store {meta['store']} changed since the index was built: rebuild it")
        return ExactRetriever(emb, ids), uris, meta
    return FaissRetriever(index, ids), uris, meta
