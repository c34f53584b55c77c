"""The embedding store: shards of L2-normalised float16 embeddings + Parquet metadata + manifest.

Layout (the clip-retrieval / autofaiss convention, so their users can read it)::

    STORE/manifest.json                      what is committed (the only source of truth)
    STORE/img_emb/img_emb_00000.npy          (n, E) float16, rows L2-normalised
    STORE/metadata/metadata_00000.parquet    id, uri, width, height, shard, row
    STORE/skipped/skipped_00000.parquet      id, uri, reason (inputs that could not be decoded)

A shard is committed atomically: its files are written under temporary names, renamed into
place, then the manifest is replaced (write + rename). A crash at any point leaves either the
old manifest (the shard is redone on the next run, its stray files overwritten) or the new one.
Ids already committed (embedded or skipped) are never processed again, so reruns and
incremental additions give every id exactly once.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """The store is missing, corrupt, or incompatible with the request."""


@dataclass(frozen=True)
class ShardRecord:
    index: int
    count: int
    skipped: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EmbeddingStore:
    """A local embedding store (see module docstring)."""

    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)
        self._manifest: Optional[Dict[str, Any]] = None

    # -- manifest ------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def manifest(self) -> Dict[str, Any]:
        if self._manifest is None:
            path = self.root / MANIFEST
            if not path.is_file():
                raise StoreError(f"{self.root} is not an embedding store (no {MANIFEST})")
            try:
                self._manifest = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise StoreError(f"{path} is corrupt: {exc}") from exc
            if self._manifest.get("format_version") != FORMAT_VERSION:
                raise StoreError(f"{path}: unsupported format {self._manifest.get('format_version')}")
        return self._manifest

    def create_or_check(self, model: Dict[str, Any], dim: int) -> None:
        """Create an empty store for ``model``, or check an existing one was made by the same model."""
        if self.exists:
            m = self.manifest()
            if m["model"] != model or m["dim"] != dim:
                raise StoreError(
                    f"{self.root} holds embeddings of {m['model']} (dim {m['dim']}); refusing to add "
                    f"embeddings of {model} (dim {dim}): use another store"
                )
            return
        for sub in ("img_emb", "metadata", "skipped"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_manifest({"format_version": FORMAT_VERSION, "model": model, "dim": dim, "shards": [],
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _write_manifest(self, m: Dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        m = dict(m, total=sum(s["count"] for s in m["shards"]), skipped=sum(s["skipped"] for s in m["shards"]))
        _atomic_write_bytes(self.root / MANIFEST, json.dumps(m, indent=2).encode())
        self._manifest = m

    @property
    def shards(self) -> List[ShardRecord]:
        return [ShardRecord(s["index"], s["count"], s["skipped"]) for s in self.manifest()["shards"]]

    @property
    def dim(self) -> int:
        return int(self.manifest()["dim"])

    def __len__(self) -> int:
        return int(self.manifest().get("total", 0))

    def next_shard_index(self) -> int:
        return max((s.index for s in self.shards), default=-1) + 1

    # -- writing -------------------------------------------------------------------------
    def commit_shard(
        self,
        index: int,
        ids: Sequence[str],
        uris: Sequence[str],
        embeddings: np.ndarray,
        widths: Sequence[int],
        heights: Sequence[int],
        skipped: Sequence[Tuple[str, str, str]] = (),
    ) -> ShardRecord:
        """Write one shard atomically and record it in the manifest.

        ``embeddings`` (n, E) are L2-normalised here and stored as float16; ``skipped`` holds
        (id, uri, reason) of inputs that could not be decoded.
        """
        import pyarrow as pa

        m = self.manifest()
        if any(s["index"] == index for s in m["shards"]):
            raise StoreError(f"shard {index} is already committed")
        emb = np.asarray(embeddings, dtype=np.float32).reshape(len(ids), -1) if len(ids) else np.zeros((0, self.dim), np.float32)
        if emb.shape[1] != self.dim:
            raise StoreError(f"embedding dim {emb.shape[1]} != store dim {self.dim}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = (emb / np.maximum(norms, 1e-12)).astype(np.float16)
        name = f"{index:05d}"
        buf = _npy_bytes(emb)
        _atomic_write_bytes(self.root / "img_emb" / f"img_emb_{name}.npy", buf)
        meta = pa.table({
            "id": pa.array(list(ids), pa.string()),
            "uri": pa.array(list(uris), pa.string()),
            "width": pa.array(list(widths), pa.int32()),
            "height": pa.array(list(heights), pa.int32()),
            "shard": pa.array([index] * len(ids), pa.int32()),
            "row": pa.array(list(range(len(ids))), pa.int32()),
        })
        _atomic_write_parquet(meta, self.root / "metadata" / f"metadata_{name}.parquet")
        sk = pa.table({
            "id": pa.array([s[0] for s in skipped], pa.string()),
            "uri": pa.array([s[1] for s in skipped], pa.string()),
            "reason": pa.array([s[2] for s in skipped], pa.string()),
        })
        _atomic_write_parquet(sk, self.root / "skipped" / f"skipped_{name}.parquet")
        rec = {"index": index, "count": len(ids), "skipped": len(skipped)}
        self._write_manifest(dict(m, shards=m["shards"] + [rec]))
        return ShardRecord(index, len(ids), len(skipped))

    # -- reading -------------------------------------------------------------------------
    def shard_embeddings(self, shard: ShardRecord, mmap: bool = True) -> np.ndarray:
        return np.load(self.root / "img_emb" / f"img_emb_{shard.name}.npy", mmap_mode="r" if mmap else None)

    def shard_metadata(self, shard: ShardRecord):
        import pyarrow.parquet as pq

        return pq.read_table(self.root / "metadata" / f"metadata_{shard.name}.parquet")

    def iter_shards(self) -> Iterator[Tuple[ShardRecord, np.ndarray, Any]]:
        for s in self.shards:
            yield s, self.shard_embeddings(s), self.shard_metadata(s)

    def load_all(self) -> Tuple[np.ndarray, List[str], List[str]]:
        """(N, E) float32 embeddings, ids, uris in shard order (fine up to a few million rows)."""
        embs, ids, uris = [], [], []
        for _, e, meta in self.iter_shards():
            embs.append(np.asarray(e, dtype=np.float32))
            ids += meta.column("id").to_pylist()
            uris += meta.column("uri").to_pylist()
        if not embs:
            return np.zeros((0, self.dim), np.float32), [], []
        return np.concatenate(embs), ids, uris

    def committed_ids(self) -> Set[str]:
        """Every id already handled: embedded or recorded as skipped."""
        import pyarrow.parquet as pq

        done: Set[str] = set()
        for s in self.shards:
            done.update(pq.read_table(self.root / "metadata" / f"metadata_{s.name}.parquet", columns=["id"]).column(0).to_pylist())
            done.update(pq.read_table(self.root / "skipped" / f"skipped_{s.name}.parquet", columns=["id"]).column(0).to_pylist())
        return done

    def skipped(self) -> Dict[str, str]:
        import pyarrow.parquet as pq

        out: Dict[str, str] = {}
        for s in self.shards:
            t = pq.read_table(self.root / "skipped" / f"skipped_{s.name}.parquet")
            out.update(zip(t.column("id").to_pylist(), t.column("reason").to_pylist()))
        return out


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


def _atomic_write_parquet(table, path: Path) -> None:
    import io

    import pyarrow.parquet as pq

    b = io.BytesIO()
    pq.write_table(table, b)
    _atomic_write_bytes(path, b.getvalue())
