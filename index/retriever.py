"""Retriever interface: top-k corpus items for query embeddings (cosine = inner product)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np


@dataclass(frozen=True)
class SearchResult:
    """Top-k hits of one query: ``ids`` (k,) corpus ids, ``scores`` (k,) cosine, best first."""

    ids: List[str]
    scores: np.ndarray
    rows: np.ndarray


class Retriever(ABC):
    """Searches L2-normalised embeddings with L2-normalised queries."""

    ids: Sequence[str]

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> List[SearchResult]:
        """queries (Q, E) -> Q results of min(k, corpus size) hits each."""

    def __len__(self) -> int:
        return len(self.ids)


class ExactRetriever(Retriever):
    """Brute-force inner-product search in numpy (the ground truth FAISS must agree with)."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str], block: int = 65536):
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"embeddings must be (N={len(ids)}, E), got {emb.shape}")
        if emb.shape[0] == 0:
            raise ValueError("cannot search an empty corpus")
        self.embeddings = emb
        self.ids = list(ids)
        self.block = block

    def search(self, queries: np.ndarray, k: int) -> List[SearchResult]:
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self.ids))
        best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((q.shape[0], 0), dtype=np.int64)
        for start in range(0, len(self.ids), self.block):
            s = q @ self.embeddings[start : start + self.block].T
            idx = np.arange(start, start + s.shape[1])[None].repeat(q.shape[0], 0)
            cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, idx], 1)
            top = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
        return [SearchResult([self.ids[j] for j in r], s, r) for s, r in zip(best_s, best_i)]
