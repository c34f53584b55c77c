"""Sharded serving (#17.3): an index kept as parts (``index.layout: shards``) searched by Ray
actors that each hold some parts, with the per-actor top-k lists merged on the caller.

Each :class:`PartServer` actor loads its parts from the index URI (never from the driver),
searches them as one ``IndexShards`` (ids are store rows already) with the tuned search
parameters, and returns its (Q, k) lists; the caller merges them in the order of
:mod:`index.topk`. Each actor declares the memory of its parts as a Ray ``memory`` resource and
actors are spread over the nodes (``SPREAD``), so an index larger than any node is served by the
cluster. The results equal those of the parts merged into one index (same codes, same probes).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from index import topk
from index.faiss_factory import estimate_index_bytes
from index.faiss_index import index_params
from index.retriever import Retriever, SearchResult

logger = logging.getLogger(__name__)

#: memory declared per actor on top of its parts (FAISS search buffers, the Python worker)
ACTOR_OVERHEAD_BYTES = 256 << 20


class PartServer:
    """Holds some parts of one index and searches them (a Ray actor: see :func:`serve_parts`)."""

    def __init__(
        self, uri: str, names: Sequence[str], params: Dict[str, Any], storage_options: Optional[Dict[str, Any]] = None
    ):
        from index import parts as P
        from index import storage
        from index.faiss_index import _apply_params

        self.index = P.as_shards(
            [
                P.from_bytes(storage.read_bytes(storage.join(uri, P.PARTS_DIR, f"part-{n}.faiss"), storage_options))
                for n in names
            ]
        )
        _apply_params(self.index, params)
        self.names = list(names)

    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int):
        s, r = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return topk.order(s, r, k)


def assign_parts(parts: Sequence[Dict[str, Any]], actors: int) -> List[List[Dict[str, Any]]]:
    """Parts spread over ``actors`` groups, largest first onto the lightest group (by rows)."""
    groups: List[List[Dict[str, Any]]] = [[] for _ in range(max(1, min(actors, len(parts))))]
    load = [0] * len(groups)
    for p in sorted(parts, key=lambda p: -p["rows"]):
        i = int(np.argmin(load))
        groups[i].append(p)
        load[i] += p["rows"]
    return groups


class ShardedRetriever(Retriever):
    """:class:`Retriever` over an index kept as parts, fanned out over :class:`PartServer` actors."""

    def __init__(
        self,
        uri: str,
        meta: Dict[str, Any],
        ids: Sequence[str],
        actors: int = 2,
        storage_options: Optional[Dict[str, Any]] = None,
        cpus_per_actor: float = 0.5,
    ):
        import ray

        self.ids = list(ids)
        rep = meta["report"]
        groups = assign_parts(meta["parts"], actors)
        remote = ray.remote(PartServer)
        self.actors = []
        for g in groups:
            need = estimate_index_bytes(rep["factory"], sum(p["rows"] for p in g), rep["dim"]) + ACTOR_OVERHEAD_BYTES
            self.actors.append(
                remote.options(
                    num_cpus=cpus_per_actor,
                    memory=int(need),
                    max_restarts=3,
                    max_task_retries=3,
                    scheduling_strategy="SPREAD",
                ).remote(
                    uri,
                    [p["name"] for p in g],
                    index_params(rep.get("search_params") or {}, rep["factory"]),
                    storage_options,
                )
            )
        held = sum(ray.get([a.ntotal.remote() for a in self.actors]))
        if held != len(self.ids):
            raise ValueError(f"the parts of {uri} hold {held} vectors but its row table {len(self.ids)}: rebuild it")
        logger.info("serving %s: %d parts on %d actors", uri, len(meta["parts"]), len(self.actors))

    def search_rows(self, queries: np.ndarray, k: int):
        import ray

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.ids))
        qref = ray.put(q)
        best = topk.empty(len(q), k)
        for part in ray.get([a.search.remote(qref, k) for a in self.actors]):
            best = topk.merge(best, part, k)
        return best

    def search(self, queries: np.ndarray, k: int) -> List[SearchResult]:
        scores, rows = self.search_rows(queries, k)
        out = []
        for s, r in zip(scores, rows):
            keep = r >= 0
            out.append(SearchResult([self.ids[i] for i in r[keep]], s[keep], r[keep]))
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
