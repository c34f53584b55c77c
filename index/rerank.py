"""Re-ranking from the store, not from RAM (#17.4): ``...,PQ64,Refine(store)``.

The index holds only the PQ stage; it proposes ``k * k_factor`` candidates per query, whose
float16 embeddings are read back from the store's shard files (memory-mapped locally: only the
pages of those rows are touched; on an object store, ranged GETs of the rows, adjacent rows
coalesced) and re-scored exactly in float32. The RAM of ``Refine(SQfp16)`` (2 bytes/dim per
vector) becomes I/O per query: ``k * k_factor`` rows x dim x 2 bytes, counted in
:attr:`StoreRefine.bytes_read` (rows read once per batch), reported per query. ``Refine(SQfp16)`` in RAM stays the choice
when it fits (:func:`index.faiss_factory.choose_factory`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import topk
from .vectors import chunk_runs

#: the refine token of a factory string whose re-ranking vectors are read from the store
STORE = "store"


def indexed_shards(store, meta: Dict[str, Any]) -> list:
    """The store shards an index was built from: those its parts list, else the first shards
    holding ``store_total`` rows (stores only grow); :class:`ValueError` if they are gone."""
    shards = list(store.shards)
    if meta.get("parts"):
        have = {(s.index, s.token): s for s in shards}
        found = [have.get((int(d["index"]), str(d.get("token", "")))) for p in meta["parts"] for d in p["shards"]]
        out = [s for s in found if s is not None]
        complete = len(out) == len(found)
    else:
        total, out = int(meta.get("store_total", 0)), []
        for s in shards:
            if sum(x.count for x in out) >= total:
                break
            out.append(s)
        complete = sum(x.count for x in out) == total
    if not complete:
        raise ValueError(
            f"the store {store.root} no longer holds the shards its index was built from: rebuild the index"
        )
    return out


class StoreRows:
    """float16 rows of an embedding store by global row number (the order of ``shards``)."""

    def __init__(self, store, shards: Optional[Sequence[Any]] = None):
        self.store = store
        self.shards = list(store.shards if shards is None else shards)
        self.offsets = np.concatenate([[0], np.cumsum([s.count for s in self.shards])]).astype(np.int64)
        self.dim = int(store.dim)
        self._maps: Dict[int, np.ndarray] = {}
        self._headers: Dict[int, int] = {}
        self.requests = 0

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim) of the given rows (any order, no -1)."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"store rows out of range [0, {self.n})")
        out = np.empty((len(rows), self.dim), np.float32)
        for si, dest, local in chunk_runs(rows, self.offsets):
            out[dest] = self._read(si, local)
        return out

    def _read(self, si: int, local: np.ndarray) -> np.ndarray:
        if not self.store.is_url:
            if si not in self._maps:
                self._maps[si] = self.store.shard_embeddings(self.shards[si])  # a memory map
            self.requests += 1
            return np.asarray(self._maps[si][local], np.float32)
        return self._ranged(si, local)

    def _ranged(self, si: int, local: np.ndarray) -> np.ndarray:
        """Ranged reads of sorted rows of one .npy shard on an object store (adjacent rows coalesced)."""
        from .storage import filesystem

        uri = self.store._path("img_emb", self.shards[si])
        fs, path = filesystem(uri, self.store.storage_options)
        if si not in self._headers:
            import io

            head = io.BytesIO(fs.cat_file(path, start=0, end=4096))
            version = np.lib.format.read_magic(head)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(head)
            assert dtype == np.float16 and not fortran and shape[1] == self.dim, (uri, shape, dtype)
            self._headers[si] = head.tell()
        row_bytes, base = self.dim * 2, self._headers[si]
        starts: List[int] = []
        ends: List[int] = []
        for r in np.unique(local):
            s = base + int(r) * row_bytes
            if ends and ends[-1] == s:
                ends[-1] += row_bytes
            else:
                starts.append(s)
                ends.append(s + row_bytes)
        blobs = fs.cat_ranges([path] * len(starts), starts, ends)
        self.requests += len(starts)
        uniq = np.unique(local)
        arr = np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(uniq), self.dim)
        return arr[np.searchsorted(uniq, local)].astype(np.float32)


def inner_products_by_idx(q: np.ndarray, vecs: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(nq, kk) float32: ``q[i] . vecs[pos[i, j]]`` (FAISS ``fvec_inner_products_by_idx``: threaded,
    no (nq, kk, dim) gather of the candidates' vectors)."""
    from .faiss_factory import _faiss

    faiss = _faiss()
    q = np.ascontiguousarray(q, np.float32)
    vecs = np.ascontiguousarray(vecs, np.float32)
    pos = np.ascontiguousarray(pos, np.int64)
    assert pos.ndim == 2 and len(pos) == len(q) and q.shape[1] == vecs.shape[1], (q.shape, vecs.shape, pos.shape)
    assert pos.size == 0 or (0 <= pos.min() and pos.max() < len(vecs)), "candidate positions out of range"
    out = np.empty(pos.shape, np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(vecs), faiss.swig_ptr(pos), q.shape[1], *pos.shape
    )
    return out


class StoreRefine:
    """A FAISS-like index (``search``, ``ntotal``, ``d``): ``base`` proposes ``k * k_factor``
    candidates (``base.search`` or ``base.search_rows``), ``rows`` (a :class:`StoreRows`, or any
    object with ``take``, ``n`` and ``dim`` such as :class:`index.vectors.VectorSource`) gives
    their vectors, re-scored exactly. ``bytes_read`` counts the float16 bytes of the rows read."""

    def __init__(self, base, rows, k_factor: float = 1):
        self.base = base
        self.rows = rows
        self.k_factor = k_factor
        self.queries = 0
        self.bytes_read = 0

    @property
    def ntotal(self) -> int:
        return int(self.rows.n)

    @property
    def d(self) -> int:
        return self.rows.dim

    def set_search_param(self, name: str, value: float) -> None:
        if name == "k_factor":
            self.k_factor = float(value)
            return
        from .faiss_index import _set_search_param

        _set_search_param(self.base, name, value)

    def _propose(self, q: np.ndarray, kk: int) -> Tuple[np.ndarray, np.ndarray]:
        if hasattr(self.base, "search_rows"):
            return self.base.search_rows(q, kk)
        return self.base.search(q, kk)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        kk = max(k, int(round(k * self.k_factor)))
        _, cand = self._propose(q, kk)
        cand = np.asarray(cand, np.int64)
        valid = cand >= 0
        uniq = np.unique(cand[valid])  # each row read once per batch
        vecs = self.rows.take(uniq)
        self.bytes_read += len(uniq) * self.rows.dim * 2
        pos = np.searchsorted(uniq, np.where(valid, cand, 0)).clip(0, max(0, len(uniq) - 1))
        scores = np.full(cand.shape, -np.inf, np.float32)
        if len(uniq):
            scores = np.where(valid, inner_products_by_idx(q, vecs, pos), np.float32(-np.inf))
        self.queries += len(q)
        return topk.order(scores, np.where(valid, cand, -1), k)

    @property
    def bytes_per_query(self) -> float:
        return self.bytes_read / self.queries if self.queries else 0.0
