"""Deterministic per-query top-k lists: scoring blocks of corpus rows, and merging partial lists.

One order everywhere: higher score first, and among equal scores the lower corpus row first.
:class:`index.retriever.ExactRetriever` ranks the same way (a stable sort of row-ordered blocks),
so an exact pass split over any number of blocks, workers or merge orders returns the same ids
and scores as it does. Lists are (Q, k) float32 scores and int64 rows, padded with ``-inf`` /
``-1`` where fewer than k rows exist.

:func:`block_topk` scores one block (a (Q, E) @ (E, n) matmul) in float32 with numpy, or with
torch on a GPU (:func:`block_topk_torch`): bf16 scores select candidates, which are re-scored in
float32; a bf16 score is within ``BF16_BOUND`` of the float32 one for unit vectors, so every row
whose bf16 score is above (k-th bf16 score - 2 bounds) is a candidate and the float32 top-k of the
candidates is the float32 top-k of the block.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

#: |bf16 inner product - float32 inner product| for unit vectors: inputs rounded to 8 mantissa
#: bits (relative error 2^-9 each, 2^-8 for a product) summed over |q_i x_i| <= 1 (Cauchy-Schwarz),
#: accumulated in float32; doubled for safety
BF16_BOUND = 2.0**-7
#: queries re-scored at a time on the GPU path
QUERY_CHUNK = 1024


def empty(nq: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def order(scores: np.ndarray, rows: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The first ``k`` entries of each row of (scores, rows) in the canonical order (score desc,
    row asc; padding ``-1`` last)."""
    s = np.asarray(scores, np.float32)
    r = np.asarray(rows, np.int64)
    pad = r < 0
    key_r = np.where(pad, np.iinfo(np.int64).max, r)
    key_s = np.where(pad, np.inf, -s.astype(np.float64))
    idx = np.lexsort((key_r, key_s), axis=-1)[:, :k]
    s, r = np.take_along_axis(s, idx, 1), np.take_along_axis(r, idx, 1)
    if idx.shape[1] < k:  # fewer candidates than k: pad
        es, er = empty(s.shape[0], k - idx.shape[1])
        s, r = np.concatenate([s, es], 1), np.concatenate([r, er], 1)
    s = np.where(r < 0, -np.inf, s).astype(np.float32)
    return s, r


def merge(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merge two partial top-k lists of the same queries (associative and commutative)."""
    return order(np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1), k)


def select(scores: np.ndarray, first_row: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k of a (Q, n) score block whose column j is corpus row ``first_row + j``, ties included
    exactly: every column tied with the k-th score is kept as a candidate before ordering."""
    nq, n = scores.shape
    if n <= k:
        rows = np.broadcast_to(np.arange(first_row, first_row + n, dtype=np.int64), (nq, n))
        return order(scores, rows, k)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    above = scores >= kth[:, None]
    counts = above.sum(1)
    width = int(counts.max())
    if width == k:  # no ties straddle the boundary: argpartition's k columns are the set
        cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:  # a tie at the k-th score: all tied columns (at most ``width``) become candidates
        cols = np.argsort(~above, axis=1, kind="stable")[:, :width]
    s = np.take_along_axis(scores, cols, 1)
    r = cols.astype(np.int64) + first_row
    if width != k:
        valid = np.take_along_axis(above, cols, 1)
        r = np.where(valid, r, -1)
    return order(s, r, k)


def block_topk(
    queries: np.ndarray, block: np.ndarray, first_row: int, k: int, device: Optional[str] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` (Q, E) float32 over one block of corpus rows (n, E) starting at corpus
    row ``first_row``; ``device`` "cuda" (or any torch device) takes the bf16 + float32 path."""
    if device is not None:
        return block_topk_torch(queries, block, first_row, k, device)
    x = np.ascontiguousarray(block, dtype=np.float32)
    return select(queries @ x.T, first_row, k)


def block_topk_torch(
    queries: np.ndarray, block: np.ndarray, first_row: int, k: int, device: str
) -> Tuple[np.ndarray, np.ndarray]:
    """bf16 matmul on ``device`` proposes candidates; they are re-scored in float32 (on the same
    device) and ordered like :func:`select`. Returns the same lists as the float32 path."""
    import torch

    if len(block) <= k:
        return block_topk(queries, np.asarray(block), first_row, k)
    x = torch.as_tensor(np.ascontiguousarray(block), device=device)
    xb, xf = x.to(torch.bfloat16), x.float()
    out_s, out_r = [], []
    for a in range(0, len(queries), QUERY_CHUNK):  # bounds the (Q, width, E) gather
        q = torch.as_tensor(np.ascontiguousarray(queries[a : a + QUERY_CHUNK], np.float32), device=device)
        approx = (q.to(torch.bfloat16) @ xb.T).float()
        kth = torch.topk(approx, k, dim=1).values[:, -1:]
        cand = approx >= kth - 2 * BF16_BOUND  # holds the float32 top-k (see BF16_BOUND)
        width = int(cand.sum(1).max())
        cols = torch.topk(approx, width, dim=1).indices  # each query's ``width`` best hold its candidates
        exact = torch.einsum("qe,qwe->qw", q, xf[cols])
        s, r = order(exact.cpu().numpy(), cols.cpu().numpy().astype(np.int64) + first_row, k)
        out_s.append(s)
        out_r.append(r)
    return np.concatenate(out_s), np.concatenate(out_r)
