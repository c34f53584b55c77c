"""The embedding store: shards of L2-normalised float16 embeddings + Parquet metadata + manifest,
in a local folder or under an fsspec URL (``s3://bucket/prefix``; see "Object stores" below).

Layout (format 2; the clip-retrieval / autofaiss convention, each shard's files named
``<index>.<commit token>`` so that sorting the folders still pairs them)::

    STORE/manifest.json                              what is committed (the only source of truth)
    STORE/img_emb/img_emb_00003.9f1c2a7b.npy         (n, E) float16, rows L2-normalised
    STORE/metadata/metadata_00003.9f1c2a7b.parquet   id, uri, width, height, shard, row
    STORE/skipped/skipped_00003.9f1c2a7b.parquet     id, uri, reason (bad inputs, skipped for good)
    STORE/writer.lock                                held by the one writing job (see below)

**Commit.** The manifest is the only commit point. A shard's three files are written under
names carrying a fresh random commit token (each file under a temporary name, fsynced, renamed),
then the manifest, which records the shard's index, counts and token, is replaced (write, fsync,
rename). Files are never overwritten: a crash at any point leaves either the old manifest (the
new files are unreferenced orphans, deleted the next time a writer takes the lock, and ignored by
this class's readers meanwhile; tools that glob the folders, like autofaiss, should read a store
after a run that finished) or the new one, and no reader can ever pair one commit's tensors with
another commit's metadata. Ids already committed (embedded or skipped as bad input) are never
processed again, so reruns and incremental additions give every id exactly once; inputs that
failed transiently are not committed and are picked up by the next run.

**Writer lock.** Every write happens under the exclusive lock ``STORE/writer.lock`` of
:mod:`index.lock` (local ``O_EXCL`` with an mtime heartbeat; S3 conditional requests); a second
writer gets :class:`StoreLockedError` naming the owner, a stale lock is broken with a WARNING, and
the owner checks its token before every manifest write, so a job whose lock was broken fails
instead of writing. :meth:`EmbeddingStore.writer` is the API (``with store.writer(job="embed"):
...``, reentrant on one store object); :meth:`~EmbeddingStore.commit_shard` and
:meth:`~EmbeddingStore.create_or_check` take the lock for themselves when called outside it. The
manifest is re-read whenever the lock is taken: a manifest read before is never trusted.

**Object stores.** ``EmbeddingStore("s3://bucket/store", storage_options={...})`` keeps the same
layout and rules through fsspec (:mod:`index.storage`): shard files are written first (one PUT
each, under never-reused token names), then the manifest in one PUT, the commit point; on S3 that
PUT is conditional on the manifest being the very version read under the lock (``If-Match``;
``If-None-Match: *`` when creating), so a writer that lost its lock cannot replace another's
commit. Orphans are listed and deleted when a writer takes the lock, as locally. Shard files are
read as bytes (no memory map). The writer lock is :class:`ObjectStoreLock`: on S3 it is made of
conditional requests (create ``If-None-Match: *``, heartbeat and stale-lock takeover ``If-Match``,
release ``DELETE If-Match``), as exclusive as the local one, with ages by the server's clock; on
other fsspec file systems it is best effort (check-then-write, one writer per store).

Format 1 stores (files named ``img_emb_00003.npy`` etc., no token, no lock) are read as they are;
the first commit to one rewrites its manifest as format 2 (older code then refuses it clearly).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from . import storage
from .lock import LOCK_FILE, ObjectStoreLock, StoreError, StoreLock, StoreLockedError, make_lock

__all__ = [
    "EmbeddingStore",
    "ShardRecord",
    "StoreError",
    "StoreLockedError",
    "StoreLock",
    "ObjectStoreLock",
    "LOCK_FILE",
    "MANIFEST",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SHARD_DIRS = (
    ("img_emb", "img_emb_", ".npy"),
    ("metadata", "metadata_", ".parquet"),
    ("skipped", "skipped_", ".parquet"),
)
# a shard file: group "name" is set for a finished file, unset for a temporary one (always garbage)
_SHARD_FILE = re.compile(
    r"^\.?(?:img_emb|metadata|skipped)_(?:\d{5,}(?:\.[0-9a-f]+)?)\.(?:npy|parquet)(?:\.[0-9a-f]+)?\.tmp$"
    r"|^(?:img_emb|metadata|skipped)_(?P<name>\d{5,}(?:\.[0-9a-f]+)?)\.(?:npy|parquet)$"
)


@dataclass(frozen=True)
class ShardRecord:
    index: int
    count: int
    skipped: int
    token: str = ""  # commit token of the shard's files; "" for a format-1 shard

    @property
    def name(self) -> str:
        return f"{self.index:05d}.{self.token}" if self.token else f"{self.index:05d}"

    def as_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"index": self.index, "count": self.count, "skipped": self.skipped}
        if self.token:
            d["token"] = self.token
        return d


# -- the store ---------------------------------------------------------------------------


class EmbeddingStore:
    """An embedding store in a local folder or under an fsspec URL (see module docstring).

    ``root`` is a :class:`~pathlib.Path` for a local store and the URL string (no trailing ``/``)
    for an object-store one; ``storage_options`` are the fsspec options of a URL (endpoint,
    credentials), unused for local stores."""

    #: writer-lock timings (seconds); instances or subclasses may override them
    lock_heartbeat_s: float = 10.0
    lock_stale_after_s: float = 120.0

    def __init__(self, root: os.PathLike | str, storage_options: Optional[Mapping[str, Any]] = None):
        self.is_url = storage.is_url(str(root))
        self.root: Any  # Path (local) or str (URL)
        if self.is_url:
            self.root = str(root).rstrip("/")
        elif str(root).startswith("file://"):
            self.root = storage.local_path(str(root))
        else:
            self.root = Path(root)
        self.storage_options = dict(storage_options or {})
        self._manifest: Optional[Dict[str, Any]] = None
        self._manifest_version: Optional[str] = None  # object version of the manifest read (URL stores)
        self._lock: Optional[StoreLock] = None

    def _uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _read(self, uri: str) -> bytes:
        return storage.read_bytes(uri, self.storage_options)

    # -- manifest ------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        if self.is_url:
            return storage.is_file(self._uri(MANIFEST), self.storage_options)
        return (self.root / MANIFEST).is_file()

    def check_location(self) -> None:
        """Raise :class:`StoreError` when ``root`` cannot be a store (a file, or inside a file)."""
        if self.is_url:
            try:
                if storage.is_file(self.root, self.storage_options):
                    raise StoreError(f"store {self.root}: {self.root} is a file, not a directory")
            except StoreError:
                raise
            except Exception as exc:  # unreachable endpoint, no such bucket, bad credentials
                raise StoreError(f"store {self.root}: cannot reach it: {type(exc).__name__}: {exc}") from exc
            return
        for p in (self.root, *self.root.parents):
            if p.exists():
                if not p.is_dir():
                    raise StoreError(f"store {self.root}: {p} is a file, not a directory")
                break

    def manifest(self) -> Dict[str, Any]:
        if self._manifest is None:
            if self.is_url:
                path = self._uri(MANIFEST)
                try:
                    text, self._manifest_version, _ = storage.read_versioned(path, self.storage_options)
                except FileNotFoundError:
                    raise StoreError(f"{self.root} is not an embedding store (no {MANIFEST})") from None
            else:
                path = self.root / MANIFEST
                if not path.is_file():
                    raise StoreError(f"{self.root} is not an embedding store (no {MANIFEST})")
                text = path.read_text()
            try:
                m = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StoreError(f"{path} is corrupt: {exc}") from exc
            if m.get("format_version") not in READABLE_FORMATS:
                raise StoreError(
                    f"{path}: unsupported store format {m.get('format_version')} "
                    f"(this version reads formats {READABLE_FORMATS})"
                )
            self._manifest = m
        return self._manifest

    def check_compatible(self, model: Dict[str, Any], dim: Optional[int] = None) -> None:
        """Raise :class:`StoreError` if this (existing) store was made by another model or dim."""
        if not self.exists:
            return
        m = self.manifest()
        if m["model"] != model or (dim is not None and m["dim"] != dim):
            raise StoreError(
                f"{self.root} holds embeddings of {m['model']} (dim {m['dim']}); refusing to add "
                f"embeddings of {model}{'' if dim is None else f' (dim {dim})'}: use another store"
            )

    def create_or_check(self, model: Dict[str, Any], dim: int) -> None:
        """Create an empty store for ``model``, or check an existing one was made by the same model."""
        if self._lock is None:
            with self.writer(job="create"):
                return self.create_or_check(model, dim)
        if self.exists:
            self.check_compatible(model, dim)
            return
        if not self.is_url:  # object stores have no folders
            for sub, _, _ in SHARD_DIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_manifest(
            {
                "format_version": FORMAT_VERSION,
                "model": model,
                "dim": dim,
                "shards": [],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )

    def _write_manifest(self, m: Dict[str, Any]) -> None:
        assert self._lock is not None, "manifest written without the writer lock"
        self._lock.verify()
        self._lock.touch()
        m = dict(
            m,
            format_version=FORMAT_VERSION,
            total=sum(s["count"] for s in m["shards"]),
            skipped=sum(s["skipped"] for s in m["shards"]),
        )
        if self.is_url:
            self._put_manifest(json.dumps(m, indent=2).encode())
            self._manifest = m
            return
        self.root.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(str(self.root / MANIFEST), json.dumps(m, indent=2).encode())
        self._manifest = m

    def _put_manifest(self, data: bytes) -> None:
        """The commit on an object store: one PUT of the manifest, conditional on it being the very
        version read under the lock (``If-Match``; ``If-None-Match: *`` for a new store), so a
        writer that lost its lock can never replace a manifest another writer committed."""
        uri = self._uri(MANIFEST)
        expected = self._manifest_version if self._manifest is not None else None
        try:
            self._manifest_version = storage.write_conditional(
                uri, data, self.storage_options, if_version=expected or storage.CREATE
            )
        except storage.ConditionFailedError:
            try:  # our own PUT, answered late and retried by the client?
                current, version, _ = storage.read_versioned(uri, self.storage_options)
            except FileNotFoundError:
                current, version = None, None
            if current != data:
                self._manifest = None
                raise StoreLockedError(
                    f"{uri} was replaced by another writer while this job held the writer "
                    f"lock: nothing more is committed by this job"
                ) from None
            self._manifest_version = version

    @property
    def shards(self) -> List[ShardRecord]:
        return [
            ShardRecord(s["index"], s["count"], s["skipped"], s.get("token", "")) for s in self.manifest()["shards"]
        ]

    @property
    def dim(self) -> int:
        return int(self.manifest()["dim"])

    def __len__(self) -> int:
        return int(self.manifest().get("total", 0))

    def next_shard_index(self) -> int:
        return max((s.index for s in self.shards), default=-1) + 1

    # -- the writer lock -----------------------------------------------------------------
    @contextlib.contextmanager
    def writer(
        self, job: str = "writer", heartbeat_s: Optional[float] = None, stale_after_s: Optional[float] = None
    ) -> Iterator["EmbeddingStore"]:
        """Hold the store's exclusive writer lock for the block (reentrant on this object).

        Raises :class:`StoreLockedError` naming the owner when another job holds it. On entry the
        manifest is re-read and orphan shard files of crashed commits are deleted."""
        if self._lock is not None:
            yield self
            return
        self.check_location()
        hb = heartbeat_s if heartbeat_s is not None else self.lock_heartbeat_s
        stale = stale_after_s if stale_after_s is not None else self.lock_stale_after_s
        lock = make_lock(str(self.root), job, self.storage_options, hb, stale).acquire()
        self._lock = lock
        self._manifest = None  # never trust a manifest read before the lock
        try:
            if self.exists:
                self.manifest()
                self._clean_orphans()
            yield self
        finally:
            self._lock = None
            lock.release()

    @property
    def locked(self) -> bool:
        """True while this object holds the writer lock."""
        return self._lock is not None

    def _clean_orphans(self) -> None:
        """Delete shard files no manifest entry references (crashed commits); under the lock only."""
        referenced = {s.name for s in self.shards}
        removed = 0
        if self.is_url:
            for sub, _, _ in SHARD_DIRS:
                for uri in storage.list_files(self._uri(sub), self.storage_options, refresh=True):
                    mt = _SHARD_FILE.match(uri.rsplit("/", 1)[-1])
                    if mt is None or (mt.group("name") is not None and mt.group("name") in referenced):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        removed += storage.remove_files([uri], self.storage_options)
            if removed:
                logger.info("removed %d orphan shard file(s) of interrupted commits from %s", removed, self.root)
            return
        for sub, _, _ in SHARD_DIRS:
            d = self.root / sub
            if not d.is_dir():
                continue
            for f in d.iterdir():
                mt = _SHARD_FILE.match(f.name)
                if mt is None:
                    continue
                if mt.group("name") is not None and mt.group("name") in referenced:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    removed += 1
        for f in [*self.root.glob(f"{MANIFEST}*.tmp"), *self.root.glob(f".{MANIFEST}*.tmp")]:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        if removed:
            logger.info("removed %d orphan shard file(s) of interrupted commits from %s", removed, self.root)

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
        """Write one shard and commit it by replacing the manifest (the only commit point).

        ``embeddings`` (n, E) are L2-normalised here and stored as float16; ``skipped`` holds
        (id, uri, reason) of bad inputs. Takes the writer lock for itself when not already held."""
        import pyarrow as pa

        if self._lock is None:
            with self.writer(job="commit_shard"):
                return self.commit_shard(index, ids, uris, embeddings, widths, heights, skipped)
        m = self.manifest()
        if any(s["index"] == index for s in m["shards"]):
            raise StoreError(f"shard {index} is already committed")
        if not (len(ids) == len(uris) == len(widths) == len(heights)):
            raise StoreError("ids, uris, widths and heights must have the same length")
        for text in [*ids, *uris, *(x for s in skipped for x in s)]:
            try:
                str(text).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise StoreError(
                    f"{text!r} is not valid UTF-8 and cannot be stored; list inputs with "
                    f"index.sources (it escapes such names)"
                ) from exc
        emb = (
            np.asarray(embeddings, dtype=np.float32).reshape(len(ids), -1)
            if len(ids)
            else np.zeros((0, self.dim), np.float32)
        )
        if emb.shape[1] != self.dim:
            raise StoreError(f"embedding dim {emb.shape[1]} != store dim {self.dim}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = (emb / np.maximum(norms, 1e-12)).astype(np.float16)
        rec = ShardRecord(index, len(ids), len(skipped), secrets.token_hex(4))
        if not self.is_url:
            for sub, _, _ in SHARD_DIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_file(self._path("img_emb", rec), _npy_bytes(emb))
        meta = pa.table(
            {
                "id": pa.array([str(i) for i in ids], pa.string()),
                "uri": pa.array([str(u) for u in uris], pa.string()),
                "width": pa.array(list(widths), pa.int32()),
                "height": pa.array(list(heights), pa.int32()),
                "shard": pa.array([index] * len(ids), pa.int32()),
                "row": pa.array(list(range(len(ids))), pa.int32()),
            }
        )
        self._write_table(meta, self._path("metadata", rec))
        sk = pa.table(
            {
                "id": pa.array([str(s[0]) for s in skipped], pa.string()),
                "uri": pa.array([str(s[1]) for s in skipped], pa.string()),
                "reason": pa.array([str(s[2]) for s in skipped], pa.string()),
            }
        )
        self._write_table(sk, self._path("skipped", rec))
        self._write_manifest(dict(m, shards=m["shards"] + [rec.as_dict()]))  # the commit
        return rec

    # shard files are written under names never used before, so a plain write (local: temporary
    # name + rename; object store: one PUT) is enough; they become visible with the manifest
    def _write_file(self, path, data: bytes) -> None:
        storage.write_bytes(str(path), data, self.storage_options)

    def _write_table(self, table, path) -> None:
        if self.is_url:
            _atomic_write_parquet(table, path, self.storage_options)
        else:
            _atomic_write_parquet(table, path)

    # -- reading -------------------------------------------------------------------------
    def _path(self, kind: str, shard: ShardRecord) -> Any:
        """A shard file: a Path (local store) or a URL string (object-store store)."""
        ext = ".npy" if kind == "img_emb" else ".parquet"
        if self.is_url:
            return self._uri(kind, f"{kind}_{shard.name}{ext}")
        return self.root / kind / f"{kind}_{shard.name}{ext}"

    def _table(self, kind: str, shard: ShardRecord, columns: Optional[List[str]] = None):
        import pyarrow.parquet as pq

        if self.is_url:
            return pq.read_table(io.BytesIO(self._read(self._path(kind, shard))), columns=columns)
        return pq.read_table(self._path(kind, shard), columns=columns)

    def shard_embeddings(self, shard: ShardRecord, mmap: bool = True) -> np.ndarray:
        """(n, E) float16 embeddings of one shard: memory-mapped from a local store (unless
        ``mmap=False``), read into memory from an object store."""
        if self.is_url:
            return np.load(io.BytesIO(self._read(self._path("img_emb", shard))), allow_pickle=False)
        return np.load(self._path("img_emb", shard), mmap_mode="r" if mmap else None)

    def shard_metadata(self, shard: ShardRecord):
        return self._table("metadata", shard)

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
        """Every id already handled: embedded or recorded as skipped (bad input). Inputs that
        failed transiently are never committed, so they are not here and a rerun retries them."""
        done: Set[str] = set()
        for s in self.shards:
            done.update(self._table("metadata", s, ["id"]).column(0).to_pylist())
            done.update(self._table("skipped", s, ["id"]).column(0).to_pylist())
        return done

    def skipped(self) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for s in self.shards:
            t = self._table("skipped", s)
            out.update(zip(t.column("id").to_pylist(), t.column("reason").to_pylist()))
        return out


def _npy_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


def _atomic_write_parquet(table, path, storage_options: Optional[Mapping[str, Any]] = None) -> None:
    import pyarrow.parquet as pq

    b = io.BytesIO()
    pq.write_table(table, b)
    storage.write_bytes(str(path), b.getvalue(), storage_options)
