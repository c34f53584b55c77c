"""Saving and loading an index folder or URL: ``index.faiss`` + ``index.json`` (see
:mod:`index.faiss_index`; an index kept as parts is loaded as one ``IndexShards``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from reco.errors import ConfigError, ReCoError

from .faiss_index import INDEX_FILE, META_FILE, IndexReport, _apply_params, _faiss, index_params


def save_index(
    index,
    report: IndexReport,
    directory: os.PathLike | str,
    extra: Optional[Dict[str, Any]] = None,
    storage_options: Optional[Dict[str, Any]] = None,
) -> Path | str:
    """Write ``index.faiss`` then ``index.json`` (each atomically) into a folder or an fsspec URL.

    For a URL, the index is written to a local temporary file and uploaded (one PUT, or a
    multipart upload that becomes visible only when complete), and ``index.json``, written last,
    records the sha256 and size of every file of the index (``files``: this one and those given
    in ``extra["files"]``); readers fetch the files into the node cache by those digests, so a
    reader racing a rebuild gets an error and retries, never a mix of two builds."""
    faiss = _faiss()
    from .storage import is_url

    if is_url(str(directory)):
        return _save_index_url(index, report, str(directory).rstrip("/"), extra, storage_options)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, d / INDEX_FILE)
    meta = {"report": asdict(report), **(extra or {})}
    (d / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2))
    os.replace(d / (META_FILE + ".tmp"), d / META_FILE)
    return d


def _save_index_url(
    index, report: IndexReport, uri: str, extra: Optional[Dict[str, Any]], storage_options: Optional[Dict[str, Any]]
) -> str:
    import tempfile

    from .storage import file_sha256, join, upload_file, write_bytes

    faiss = _faiss()
    files = dict((extra or {}).get("files") or {})
    with tempfile.TemporaryDirectory(prefix="reco-index-") as tmp:
        local = Path(tmp) / INDEX_FILE
        faiss.write_index(index, str(local))
        files[INDEX_FILE] = {"sha256": file_sha256(local), "bytes": local.stat().st_size}
        upload_file(local, join(uri, INDEX_FILE), storage_options)
    meta = {"report": asdict(report), **(extra or {}), "files": files}
    write_bytes(join(uri, META_FILE), json.dumps(meta, indent=2).encode(), storage_options)
    return uri


def fetch_index_file(
    uri: str, name: str, meta: Dict[str, Any], storage_options: Optional[Dict[str, Any]] = None
) -> Path:
    """A local copy of the file ``name`` of the index at URL ``uri``, in this node's cache keyed by
    the digest ``index.json`` records (by the object's ETag for an index copied there by hand), so
    a rebuilt index is fetched again; :class:`index.storage.ObjectChangedError` when the file no
    longer matches ``meta`` (a rebuild is under way: read ``index.json`` again)."""
    from .storage import fetch_to_cache, join, object_version

    rec = (meta.get("files") or {}).get(name)
    furi = join(uri, name)
    try:
        if rec and rec.get("sha256"):
            return fetch_to_cache(furi, storage_options, sha256=rec["sha256"])
        return fetch_to_cache(furi, storage_options, version=object_version(furi, storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri} holds no index (needs {INDEX_FILE}, {META_FILE} and the row table; "
            f"{name} is missing); run `reco build-index`"
        ) from None


class IndexFileError(ReCoError):
    """An index file that cannot be read (truncated, not FAISS, corrupt ``index.json``)."""


def _parse_meta(text, where) -> Dict[str, Any]:
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{where} is not valid JSON ({exc}): rebuild the index with `reco build-index`") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("report"), dict) or "factory" not in meta["report"]:
        raise IndexFileError(
            f"{where} is not an index description (no report.factory): rebuild the index with `reco build-index`"
        )
    return meta


def _read_faiss(path):
    faiss = _faiss()
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise IndexFileError(
            f"{path} cannot be read by FAISS (truncated or not an index: {first}): rebuild it with `reco build-index`"
        ) from None


def load_index(
    directory: os.PathLike | str, storage_options: Optional[Dict[str, Any]] = None, load_parts: bool = True
) -> Tuple[Any, Dict[str, Any]]:
    """(index with its tuned search parameters set, ``index.json``) of a folder or fsspec URL (the
    latter fetched into the node cache, see :func:`fetch_index_file`). An index kept as parts
    (``layout: shards``, :mod:`index.parts`) is loaded as one ``IndexShards`` of them, or not at
    all (None) with ``load_parts=False`` (its parts are then served elsewhere)."""
    from .storage import is_url, join, read_versioned

    url = is_url(str(directory))
    uri = str(directory).rstrip("/") if url else str(directory)
    try:
        text = read_versioned(join(uri, META_FILE), storage_options)[0] if url else Path(uri, META_FILE).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri} holds no index (needs {INDEX_FILE} and {META_FILE}); run `reco build-index`"
        ) from None
    meta = _parse_meta(text, join(uri, META_FILE))
    if meta.get("layout") == "shards":
        if not load_parts:
            return None, meta
        from . import parts as P
        from .storage import read_bytes

        index = P.as_shards(
            [
                P.from_bytes(read_bytes(join(uri, P.PARTS_DIR, f"part-{p['name']}.faiss"), storage_options))
                for p in meta["parts"]
            ]
        )
    elif url:
        index = _read_faiss(fetch_index_file(uri, INDEX_FILE, meta, storage_options))
    else:
        if not Path(uri, INDEX_FILE).is_file():
            raise FileNotFoundError(
                f"{uri} holds no index (needs {INDEX_FILE} and {META_FILE}); run `reco build-index`"
            )
        index = _read_faiss(Path(uri, INDEX_FILE))
    _apply_params(index, index_params(meta["report"].get("search_params") or {}, meta["report"]["factory"]))
    return index, meta


def read_text_queries(uri: str, dim: int, storage=None):
    """The ``--text-queries`` array of ``reco build-index`` (T x E text embeddings, a .npy file at a storage
    URI), L2-normalised as float32; a one-line :class:`ConfigError` when it is unusable."""
    import io

    import numpy as np

    from index.storage import read_bytes

    try:
        q = np.load(io.BytesIO(read_bytes(uri, storage)), allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"--text-queries {uri}: no such file") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--text-queries {uri}: not a .npy array ({exc})") from None
    if q.ndim != 2 or q.shape[1] != dim or len(q) < 2:
        raise ConfigError(f"--text-queries {uri}: expected (T >= 2, {dim}) text embeddings, got {q.shape}")
    q = q.astype(np.float32)
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
