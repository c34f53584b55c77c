"""Row-ordered access to a corpus stored in chunks (store shards) and exact streaming top-k."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from .faiss_factory import _faiss

#: rows converted to float32 at a time when adding / computing exact ground truth
BLOCK_ROWS = 32768


def chunk_runs(
    rows: np.ndarray, offsets: np.ndarray, block: Optional[int] = None
) -> Iterator[Tuple[int, Any, np.ndarray]]:
    """Runs of ``rows`` (global row numbers, any order) that fall in one chunk, chunk by chunk, at
    most ``block`` rows each: (chunk index, positions of the run in ``rows`` (a slice when ``rows``
    ascend, as the re-rank's sorted unique candidates do: no scatter), the rows local to the
    chunk). ``offsets``: each chunk's first row, then the total."""
    order = None if bool(np.all(rows[1:] >= rows[:-1])) else np.argsort(rows, kind="stable")
    srt = rows if order is None else rows[order]
    bounds = np.searchsorted(srt, offsets)
    for i in range(len(offsets) - 1):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        step = block or max(1, hi - lo)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            yield i, (slice(a, b) if order is None else order[a:b]), srt[a:b] - offsets[i]


class VectorSource:
    """Row-ordered (n, dim) vectors stored in chunks (e.g. store shards), opened one at a time.

    ``open_chunk(i)`` returns chunk i as an array (typically a float16 memory map); it is dropped
    as soon as the chunk has been read, so no more than one chunk is mapped at a time and the
    corpus is never materialised in float32 as a whole.
    """

    def __init__(self, sizes: Sequence[int], dim: int, open_chunk: Callable[[int], np.ndarray]):
        self.sizes = [int(s) for s in sizes]
        self.dim = int(dim)
        self._open = open_chunk
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> "VectorSource":
        arrays = list(arrays)
        if not arrays:
            raise ValueError("no arrays given")
        dims = {a.shape[1] for a in arrays}
        if len(dims) != 1 or any(a.ndim != 2 for a in arrays):
            raise ValueError(f"arrays must all be (n_i, E), got {[a.shape for a in arrays]}")
        return cls([len(a) for a in arrays], dims.pop(), lambda i: arrays[i])

    @classmethod
    def from_array(cls, x: np.ndarray) -> "VectorSource":
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (N, E), got {x.shape}")
        return cls.from_arrays([x])

    @classmethod
    def from_store(cls, store, shards: Optional[Sequence[Any]] = None) -> "VectorSource":
        """The committed shards of an :class:`index.store.EmbeddingStore` (a snapshot of ``shards``)."""
        shards = list(store.shards if shards is None else shards)
        return cls([s.count for s in shards], store.dim, lambda i: store.shard_embeddings(shards[i]))

    def _chunk(self, i: int) -> np.ndarray:
        arr = self._open(i)
        if arr.ndim != 2 or arr.shape != (self.sizes[i], self.dim):
            raise ValueError(f"chunk {i} has shape {arr.shape}, expected ({self.sizes[i]}, {self.dim})")
        return arr

    def blocks(self, rows: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 C-contiguous block of at most ``rows`` rows), in row order."""
        rows = rows or BLOCK_ROWS
        for i, size in enumerate(self.sizes):
            if size == 0:
                continue
            arr = self._chunk(i)
            off = int(self.offsets[i])
            for s in range(0, size, rows):
                yield off + s, np.ascontiguousarray(arr[s : s + rows], dtype=np.float32)
            del arr

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim) copy of the given rows (any order), reading only those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError("row out of range")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        arr: Any = None
        opened = -1
        for i, dest, local in chunk_runs(rows, self.offsets, BLOCK_ROWS):  # bounded temporaries
            if i != opened:
                arr, opened = self._chunk(i), i
            out[dest] = arr[local]
        return out


def exact_topk(
    source: VectorSource,
    queries: np.ndarray,
    k: int,
    exclude_rows: Optional[np.ndarray] = None,
    block_rows: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` over ``source``, streaming it block by block.

    Each block's top-k comes from FAISS brute force (``faiss.knn``, exact) and is merged into the
    running top-k, so memory is one float32 block plus (Q, k) lists whatever the corpus size.
    Returns (scores, rows), both (Q, k), best first; rows are -1 where fewer than k exist.
    ``exclude_rows[q]`` (a corpus row, or -1) is never returned for query q.
    """
    faiss = _faiss()
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    nq = q.shape[0]
    excl = np.full(nq, -1, np.int64) if exclude_rows is None else np.asarray(exclude_rows, np.int64)
    kk = k + 1  # one spare for the excluded row
    best_s = np.full((nq, kk), -np.inf, dtype=np.float32)
    best_i = np.full((nq, kk), -1, dtype=np.int64)
    for off, blk in source.blocks(block_rows):
        s, i = faiss.knn(q, blk, min(kk, blk.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
        i = np.where(i >= 0, i + off, -1)
        cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :kk]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    drop = (best_i == excl[:, None]) | (best_i < 0)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :k]  # the rows to keep, in score order
    best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    gone = np.take_along_axis(drop, keep, 1)
    best_s[gone], best_i[gone] = -np.inf, -1
    return best_s, best_i
