"""Index directories: a FAISS index + the row->(id, uri) table + provenance, and opening them
as a :class:`Retriever` (FAISS, or exact search over the same store for checking)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple


from .faiss_index import FaissRetriever, IndexReport, build_index, load_index, save_index
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
) -> IndexReport:
    """Build an index over every committed embedding of ``store`` into ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb, ids, uris = store.load_all()
    if not ids:
        raise ValueError(f"{store.root} holds no embeddings: run `reco embed` first")
    index, report = build_index(emb, factory, memory_budget_bytes, target_recall)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "uri": uris}), d / ROWS_FILE)
    save_index(index, report, d, {"store": str(Path(store.root).resolve()), "model": store.manifest()["model"],
                                  "store_total": len(store)})
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
