"""The embedding store: shards of L2-normalised float16 embeddings + Parquet metadata + manifest.

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

**Writer lock.** Every write happens under an exclusive lock, ``STORE/writer.lock``, created
atomically (``os.open(O_CREAT | O_EXCL)``) and holding its owner (host, pid, job, start time,
token). Its heartbeat is the file's modification time, refreshed every ``heartbeat_s`` by a daemon
thread and at every commit with ``os.utime`` (the file is never rewritten, so a refresh can never
clobber another owner's lock). A second writer gets :class:`StoreLockedError` naming the owner.
A lock is stale, and broken with a WARNING, when its heartbeat is older than ``stale_after_s`` or
when its owner ran on this host and its pid is gone (pids are compared per host name: two
containers sharing a host name and pid namespace-less pids could confuse this; the heartbeat
timeout still applies). The owner checks its token before every manifest write, so a job whose
lock was broken (e.g. it was frozen for longer than the timeout) fails instead of writing.
:meth:`EmbeddingStore.writer` is the API (``with store.writer(job="embed"): ...``, reentrant on
one store object); :meth:`~EmbeddingStore.commit_shard` and :meth:`~EmbeddingStore.create_or_check`
take the lock for themselves when called outside it. The manifest is re-read whenever the lock is
taken: a manifest read before is never trusted. The lock needs a local or POSIX shared file
system with atomic exclusive create (local disks, NFSv3+); object-store stores are not supported.

Format 1 stores (files named ``img_emb_00003.npy`` etc., no token, no lock) are read as they are;
the first commit to one rewrites its manifest as format 2 (older code then refuses it clearly).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from reco.errors import ReCoError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SHARD_DIRS = (("img_emb", "img_emb_", ".npy"), ("metadata", "metadata_", ".parquet"),
              ("skipped", "skipped_", ".parquet"))
# a shard file: group "name" is set for a finished file, unset for a temporary one (always garbage)
_SHARD_FILE = re.compile(
    r"^(?:img_emb|metadata|skipped)_(?:\d{5,}(?:\.[0-9a-f]+)?)\.(?:npy|parquet)(?:\.[0-9a-f]+)?\.tmp$"
    r"|^(?:img_emb|metadata|skipped)_(?P<name>\d{5,}(?:\.[0-9a-f]+)?)\.(?:npy|parquet)$")


class StoreError(ReCoError, RuntimeError):
    """The store is missing, corrupt, or incompatible with the request."""


class StoreLockedError(StoreError):
    """Another job holds the store's writer lock (or this job lost it)."""


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


# -- the writer lock ---------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):  # no /proc (macOS): trust kill(0)
        return True


def _describe_owner(owner: Optional[Dict[str, Any]], age: Optional[float]) -> str:
    if not owner:
        who = "an unknown writer (lock file empty or unreadable)"
    else:
        who = (f"job {owner.get('job', '?')!r} on host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
               f"since {owner.get('since', '?')}")
    if age is not None:
        who += f" (last heartbeat {age:.0f}s ago)"
    return who


class StoreLock:
    """The exclusive writer lock of one store (see the module docstring)."""

    def __init__(self, path: Path, job: str, heartbeat_s: float = 10.0, stale_after_s: float = 120.0):
        if heartbeat_s <= 0 or stale_after_s <= heartbeat_s:
            raise ValueError("need 0 < heartbeat_s < stale_after_s")
        self.path = Path(path)
        self.job = job
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = secrets.token_hex(8)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "since_epoch": time.time(),
                      "token": self.token}
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- reading someone's lock ----------------------------------------------------------
    def _read(self) -> Tuple[Optional[Dict[str, Any]], Optional[float]]:
        """(owner or None when unreadable, heartbeat age in seconds); FileNotFoundError if absent."""
        st = os.stat(self.path)
        age = max(0.0, time.time() - st.st_mtime)
        try:
            owner = json.loads(self.path.read_text())
            if not isinstance(owner, dict):
                owner = None
        except (OSError, ValueError):
            owner = None
        return owner, age

    def _stale_reason(self, owner: Optional[Dict[str, Any]], age: float) -> Optional[str]:
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s (timeout {self.stale_after_s:.0f}s)"
        if owner and owner.get("host") == self.owner["host"] and isinstance(owner.get("pid"), int) \
                and owner["pid"] != os.getpid() and not _pid_alive(owner["pid"]):
            return f"its process (pid {owner['pid']} on this host) is gone"
        return None

    def _break(self, owner: Optional[Dict[str, Any]], why: str) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale (another
        breaker replaced it meanwhile), put it back."""
        aside = self.path.with_name(f"{self.path.name}.broken-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it: just try again
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        moved_token = moved.get("token") if isinstance(moved, dict) else None
        if moved_token != (owner or {}).get("token"):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # fails if yet another lock was taken: fine, its owner holds it
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return
        logger.warning("breaking the stale writer lock %s held by %s: %s",
                       self.path, _describe_owner(owner, None), why)
        with contextlib.suppress(OSError):
            os.unlink(aside)

    # -- taking and holding --------------------------------------------------------------
    def acquire(self) -> "StoreLock":
        data = json.dumps(self.owner, indent=1).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner, age = self._read()
                except FileNotFoundError:
                    continue  # released meanwhile
                why = self._stale_reason(owner, age)
                if why is None:
                    raise StoreLockedError(
                        f"{self.path.parent} is locked by another writer: {_describe_owner(owner, age)}. "
                        f"Wait for it to finish; a dead writer's lock is broken automatically "
                        f"(after {self.stale_after_s:.0f}s without heartbeat, or at once on its host)"
                    ) from None
                self._break(owner, why)
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.path.parent)
            self._thread = threading.Thread(target=self._beat, name=f"store-lock-heartbeat:{self.path}",
                                            daemon=True)
            self._thread.start()
            return self
        raise StoreLockedError(f"could not take the writer lock {self.path}: it keeps changing hands")

    def verify(self) -> None:
        """Raise :class:`StoreLockedError` unless this lock still holds the lock file."""
        if self.lost:
            raise StoreLockedError(self.lost)
        try:
            owner, age = self._read()
        except FileNotFoundError:
            owner, age = {}, None
        if not owner or owner.get("token") != self.token:
            self.lost = (f"lost the writer lock on {self.path.parent}: it is now held by "
                         f"{_describe_owner(owner, age) if owner else 'nobody (lock file removed)'}; "
                         f"nothing more is committed by this job")
            raise StoreLockedError(self.lost)

    def touch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.verify()
                self.touch()
            except StoreLockedError as exc:
                logger.error("%s", exc)
                return
            except OSError as exc:  # a flaky shared file system: try again next beat
                logger.warning("writer lock heartbeat on %s failed: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            owner, _ = self._read()
        except FileNotFoundError:
            return
        if owner and owner.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        elif not self.lost:
            logger.warning("writer lock %s is no longer ours at release: left in place", self.path)


# -- the store ---------------------------------------------------------------------------

class EmbeddingStore:
    """A local embedding store (see module docstring)."""

    #: writer-lock timings (seconds); instances or subclasses may override them
    lock_heartbeat_s: float = 10.0
    lock_stale_after_s: float = 120.0

    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)
        self._manifest: Optional[Dict[str, Any]] = None
        self._lock: Optional[StoreLock] = None

    # -- manifest ------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def check_location(self) -> None:
        """Raise :class:`StoreError` when ``root`` cannot be a store (a file, or inside a file)."""
        for p in (self.root, *self.root.parents):
            if p.exists():
                if not p.is_dir():
                    raise StoreError(f"store {self.root}: {p} is a file, not a directory")
                break

    def manifest(self) -> Dict[str, Any]:
        if self._manifest is None:
            path = self.root / MANIFEST
            if not path.is_file():
                raise StoreError(f"{self.root} is not an embedding store (no {MANIFEST})")
            try:
                m = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise StoreError(f"{path} is corrupt: {exc}") from exc
            if m.get("format_version") not in READABLE_FORMATS:
                raise StoreError(f"{path}: unsupported store format {m.get('format_version')} "
                                 f"(this version reads formats {READABLE_FORMATS})")
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
        for sub, _, _ in SHARD_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_manifest({"format_version": FORMAT_VERSION, "model": model, "dim": dim, "shards": [],
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _write_manifest(self, m: Dict[str, Any]) -> None:
        assert self._lock is not None, "manifest written without the writer lock"
        self._lock.verify()
        self._lock.touch()
        self.root.mkdir(parents=True, exist_ok=True)
        m = dict(m, format_version=FORMAT_VERSION, total=sum(s["count"] for s in m["shards"]),
                 skipped=sum(s["skipped"] for s in m["shards"]))
        _atomic_write_bytes(self.root / MANIFEST, json.dumps(m, indent=2).encode())
        self._manifest = m

    @property
    def shards(self) -> List[ShardRecord]:
        return [ShardRecord(s["index"], s["count"], s["skipped"], s.get("token", ""))
                for s in self.manifest()["shards"]]

    @property
    def dim(self) -> int:
        return int(self.manifest()["dim"])

    def __len__(self) -> int:
        return int(self.manifest().get("total", 0))

    def next_shard_index(self) -> int:
        return max((s.index for s in self.shards), default=-1) + 1

    # -- the writer lock -----------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, job: str = "writer", heartbeat_s: Optional[float] = None,
               stale_after_s: Optional[float] = None) -> Iterator["EmbeddingStore"]:
        """Hold the store's exclusive writer lock for the block (reentrant on this object).

        Raises :class:`StoreLockedError` naming the owner when another job holds it. On entry the
        manifest is re-read and orphan shard files of crashed commits are deleted."""
        if self._lock is not None:
            yield self
            return
        self.check_location()
        self.root.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(self.root / LOCK_FILE, job,
                         heartbeat_s if heartbeat_s is not None else self.lock_heartbeat_s,
                         stale_after_s if stale_after_s is not None else self.lock_stale_after_s).acquire()
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
        for f in self.root.glob(f"{MANIFEST}*.tmp"):
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
                raise StoreError(f"{text!r} is not valid UTF-8 and cannot be stored; list inputs with "
                                 f"index.sources (it escapes such names)") from exc
        emb = np.asarray(embeddings, dtype=np.float32).reshape(len(ids), -1) if len(ids) else np.zeros((0, self.dim), np.float32)
        if emb.shape[1] != self.dim:
            raise StoreError(f"embedding dim {emb.shape[1]} != store dim {self.dim}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = (emb / np.maximum(norms, 1e-12)).astype(np.float16)
        rec = ShardRecord(index, len(ids), len(skipped), secrets.token_hex(4))
        for sub, _, _ in SHARD_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self._path("img_emb", rec), _npy_bytes(emb))
        meta = pa.table({
            "id": pa.array([str(i) for i in ids], pa.string()),
            "uri": pa.array([str(u) for u in uris], pa.string()),
            "width": pa.array(list(widths), pa.int32()),
            "height": pa.array(list(heights), pa.int32()),
            "shard": pa.array([index] * len(ids), pa.int32()),
            "row": pa.array(list(range(len(ids))), pa.int32()),
        })
        _atomic_write_parquet(meta, self._path("metadata", rec))
        sk = pa.table({
            "id": pa.array([str(s[0]) for s in skipped], pa.string()),
            "uri": pa.array([str(s[1]) for s in skipped], pa.string()),
            "reason": pa.array([str(s[2]) for s in skipped], pa.string()),
        })
        _atomic_write_parquet(sk, self._path("skipped", rec))
        self._write_manifest(dict(m, shards=m["shards"] + [rec.as_dict()]))  # the commit
        return rec

    # -- reading -------------------------------------------------------------------------
    def _path(self, kind: str, shard: ShardRecord) -> Path:
        ext = ".npy" if kind == "img_emb" else ".parquet"
        return self.root / kind / f"{kind}_{shard.name}{ext}"

    def shard_embeddings(self, shard: ShardRecord, mmap: bool = True) -> np.ndarray:
        return np.load(self._path("img_emb", shard), mmap_mode="r" if mmap else None)

    def shard_metadata(self, shard: ShardRecord):
        import pyarrow.parquet as pq

        return pq.read_table(self._path("metadata", shard))

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
        import pyarrow.parquet as pq

        done: Set[str] = set()
        for s in self.shards:
            done.update(pq.read_table(self._path("metadata", s), columns=["id"]).column(0).to_pylist())
            done.update(pq.read_table(self._path("skipped", s), columns=["id"]).column(0).to_pylist())
        return done

    def skipped(self) -> Dict[str, str]:
        import pyarrow.parquet as pq

        out: Dict[str, str] = {}
        for s in self.shards:
            t = pq.read_table(self._path("skipped", s))
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
