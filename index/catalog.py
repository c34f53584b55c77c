"""Index directories: a FAISS index + the row->(id, uri) table + provenance, and opening them
as a :class:`Retriever` (FAISS, or exact search over the same store for checking).

:func:`build_index_dir` streams the store: it never loads the corpus as a whole. The FAISS build
reads a training sample and then one shard at a time from the float16 shard files (see
:mod:`index.faiss_index`), and the row table is written shard by shard. Only the shards committed
when the build starts are indexed (a snapshot of the manifest), so embeddings committed during
the build are left for the next one.

Both the store and the index directory may be fsspec URLs (``s3://...``, with
``storage_options``): FAISS reads and writes local files only, so an index bound for a URL is
built in a local temporary folder and uploaded file by file (``index.json`` last, recording the
sha256 of the others), and an index read from a URL is fetched into the node cache
(``$RECO_CACHE_DIR``) keyed by those digests: a rebuilt index is fetched again, an unchanged one
never.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .faiss_factory import split_refine
from .faiss_index import (
    FaissRetriever,
    IndexReport,
    VectorSource,
    build_index_from_source,
    fetch_index_file,
    load_index,
    save_index,
)
from .rerank import STORE
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
    storage_options: Optional[Dict[str, Any]] = None,
    text_queries=None,
    max_nprobe: Optional[int] = None,
) -> IndexReport:
    """Build an index over every committed embedding of ``store`` into ``out_dir`` (a folder or
    an fsspec URL reached with ``storage_options``).

    Raises ``FileNotFoundError`` if the store does not exist, ``ValueError`` if it is empty and
    :class:`index.faiss_index.LowRecallError` if the recall target is missed (unless
    ``allow_low_recall``); nothing is written to ``out_dir`` in these cases.
    """
    from .storage import is_url

    if store.is_url:
        root: Any = store.root
        if not store.exists:
            raise FileNotFoundError(f"{root} is not an embedding store (no manifest.json): run `reco embed` first")
    else:
        root = Path(store.root)
        if not root.is_dir() or not store.exists:
            raise FileNotFoundError(f"{root} is not an embedding store (no manifest.json): run `reco embed` first")
    shards = list(store.shards)
    if sum(s.count for s in shards) == 0:
        raise ValueError(f"{root} holds no embeddings: run `reco embed` first")
    build = dict(
        factory=factory,
        memory_budget_bytes=memory_budget_bytes,
        target_recall=target_recall,
        num_queries=num_queries,
        train_size=train_size,
        seed=seed,
        allow_low_recall=allow_low_recall,
        use_gpu=use_gpu,
        text_queries=text_queries,
        max_nprobe=max_nprobe,
    )
    remote = is_url(str(out_dir))
    if remote:  # FAISS writes local files: build in a staging folder, upload when done
        import shutil
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="reco-index-"))
        try:
            return _build_and_upload(store, root, shards, str(out_dir).rstrip("/"), d, storage_options, build)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)

    # row table first (cheap, and checks every shard's metadata against the manifest)
    tmp_rows = d / (ROWS_FILE + ".tmp")
    try:
        index, report = _rows_and_index(store, root, shards, tmp_rows, build)
    except BaseException:
        tmp_rows.unlink(missing_ok=True)
        raise
    os.replace(tmp_rows, d / ROWS_FILE)
    save_index(index, report, d, _index_meta(store, root, report))
    return report


def _index_meta(store: EmbeddingStore, root: Any, report: IndexReport) -> Dict[str, Any]:
    """The store fields of ``index.json``: the store's root, its model and the rows indexed."""
    return {
        "store": str(root.resolve()) if isinstance(root, Path) else root,
        "model": store.manifest()["model"],
        "store_total": report.n,
    }


def _rows_and_index(
    store: EmbeddingStore, root: Any, shards, rows: Path, build: Dict[str, Any]
) -> Tuple[Any, IndexReport]:
    """Write the row table to ``rows`` (it checks every shard's metadata against the manifest),
    then build the index over the same shards: ``build`` holds build_index_from_source's options."""
    _write_rows(store, root, shards, rows)
    return build_index_from_source(VectorSource.from_store(store, shards), **build)


def _write_rows(store: EmbeddingStore, root: Any, shards, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("uri", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for s in shards:
            t = store.shard_metadata(s).select(["id", "uri"])
            if t.num_rows != s.count:
                raise ValueError(f"shard {s.name} of {root}: {t.num_rows} metadata rows, manifest says {s.count}")
            w.write_table(t.cast(schema))


def write_rows_table(
    store: EmbeddingStore,
    shards,
    out: str,
    storage_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Write ``OUT/rows.parquet`` (row -> id, uri of ``shards``) atomically to a folder or URL;
    returns its ``files`` record (sha256, bytes) for ``index.json``."""
    import tempfile

    from .storage import file_sha256, is_url, join, upload_file

    if is_url(str(out)):
        with tempfile.TemporaryDirectory(prefix="reco-rows-") as tmp:
            local = Path(tmp) / ROWS_FILE
            _write_rows(store, store.root, shards, local)
            rec = {"sha256": file_sha256(local), "bytes": local.stat().st_size}
            upload_file(local, join(str(out), ROWS_FILE), storage_options)
        return {ROWS_FILE: rec}
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tmp_rows = d / (ROWS_FILE + ".tmp")
    _write_rows(store, store.root, shards, tmp_rows)
    rec = {"sha256": file_sha256(tmp_rows), "bytes": tmp_rows.stat().st_size}
    os.replace(tmp_rows, d / ROWS_FILE)
    return {ROWS_FILE: rec}


def _build_and_upload(
    store: EmbeddingStore,
    root: Any,
    shards,
    uri: str,
    staging: Path,
    storage_options,
    build: Dict[str, Any],
) -> IndexReport:
    """build_index_dir for an output URL: rows and index built in ``staging``, then uploaded: the
    row table, ``index.faiss``, and ``index.json`` (with both files' sha256) last."""
    from .storage import file_sha256, join, upload_file

    rows = staging / ROWS_FILE
    index, report = _rows_and_index(store, root, shards, rows, build)
    files = {ROWS_FILE: {"sha256": file_sha256(rows), "bytes": rows.stat().st_size}}
    upload_file(rows, join(uri, ROWS_FILE), storage_options)
    save_index(
        index,
        report,
        uri,
        {**_index_meta(store, root, report), "files": files},
        storage_options,
    )
    return report


def open_retriever(
    index_dir: os.PathLike | str,
    exact: bool = False,
    storage_options: Optional[Dict[str, Any]] = None,
    serve_parts: Optional[Callable[[str, Dict[str, Any], List[str]], Retriever]] = None,
) -> Tuple[Retriever, Dict[str, str], Dict[str, Any]]:
    """(retriever, {id: uri}, index metadata) of an index directory or URL (``storage_options``
    reach it, and the store for ``exact``); a URL's files are fetched into the node cache. An
    index kept as parts is served by ``serve_parts(uri, meta, ids)`` when given (e.g. Ray actors,
    :mod:`cluster.index_serve`), else loaded here as one ``IndexShards``."""
    import pyarrow.parquet as pq

    from .storage import ObjectChangedError, is_url

    if is_url(str(index_dir)):
        uri = str(index_dir).rstrip("/")
        for attempt in range(3):  # a rebuild replacing the files under us: read index.json again
            try:
                index, meta = load_index(uri, storage_options, load_parts=serve_parts is None)
                rows = pq.read_table(fetch_index_file(uri, ROWS_FILE, meta, storage_options))
                break
            except ObjectChangedError:
                if attempt == 2:
                    raise
                logger.warning("%s changed while it was read (rebuilt?): reading it again", uri)
    else:
        d = Path(index_dir)
        index, meta = load_index(d, load_parts=serve_parts is None)
        rows = pq.read_table(d / ROWS_FILE)
    ids = rows.column("id").to_pylist()
    uris = dict(zip(ids, rows.column("uri").to_pylist()))
    if exact:
        emb, sids, _ = EmbeddingStore(meta["store"], storage_options=storage_options).load_all()
        if sids != ids:
            raise ValueError(f"store {meta['store']} changed since the index was built: rebuild it")
        return ExactRetriever(emb, ids), uris, meta
    if index is None:  # load_index left the parts out for serve_parts to serve
        assert serve_parts is not None
        index = serve_parts(str(index_dir), meta, ids)
    if split_refine(meta["report"]["factory"])[1] == STORE:  # PQ proposes, the store re-ranks
        from .rerank import StoreRefine, StoreRows, indexed_shards

        store = EmbeddingStore(meta["store"], storage_options=storage_options)
        index = StoreRefine(
            index,
            StoreRows(store, indexed_shards(store, meta)),
            (meta["report"].get("search_params") or {}).get("k_factor", 1),
        )
    elif not hasattr(index, "is_trained"):  # parts served elsewhere: already a Retriever
        return index, uris, meta
    return FaissRetriever(index, ids), uris, meta
