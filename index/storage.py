"""The one storage URI rule: every artifact a Ray worker reads or writes is named by a URI.

A URI is either a **local path** (valid on every node only when it is on a shared file system,
or when the cluster is one machine) or an **fsspec URL** (``s3://bucket/prefix``, ``gs://...``,
``file:///...``), reached with the caller's ``storage_options`` (endpoint, credentials: from the
environment or the standard AWS chain; never logged). Workers are never handed a path that only
exists on the driver: banks travel to actors as bytes, weights named by URL are fetched into each
node's cache, outputs are written to the output URI.

Writes are atomic: a local file is written under a temporary name in its folder and renamed; an
object-store PUT is atomic by itself (readers see the old object or the new one).
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from pathlib import Path
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

StorageOptions = Optional[Mapping[str, Any]]


def is_url(uri: str) -> bool:
    """True for fsspec URLs other than ``file://`` (which is a local path)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str) -> Path:
    """The local path of a non-URL URI (``file://`` prefix and ``~`` resolved)."""
    if is_url(uri):
        raise ValueError(f"{uri} is not a local path")
    return Path(str(uri).removeprefix("file://")).expanduser()


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI (``/`` separators for URLs)."""
    if is_url(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(local_path(uri).joinpath(*parts))


def _fs(uri: str, storage_options: StorageOptions):
    import fsspec

    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


def exists(uri: str, storage_options: StorageOptions = None) -> bool:
    if is_url(uri):
        fs, path = _fs(uri, storage_options)
        return bool(fs.exists(path))
    return local_path(uri).exists()


def read_bytes(uri: str, storage_options: StorageOptions = None) -> bytes:
    """The bytes at ``uri``; ``FileNotFoundError`` when absent, ``OSError`` naming the URI otherwise."""
    if is_url(uri):
        fs, path = _fs(uri, storage_options)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} does not exist") from None
        except Exception as exc:  # object stores raise many types
            raise OSError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    p = local_path(uri)
    if not p.is_file():
        raise FileNotFoundError(f"{uri} does not exist")
    return p.read_bytes()


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write ``data`` to ``uri`` atomically (parent folders are created)."""
    if is_url(uri):
        fs, path = _fs(uri, storage_options)
        try:
            with fs.open(path, "wb") as fh:
                fh.write(data)
        except Exception as exc:
            raise OSError(f"cannot write {uri}: {type(exc).__name__}: {exc}") from exc
        return
    p = local_path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def save_bank(bank, uri: str, storage_options: StorageOptions = None) -> str:
    """Save a :class:`reco.ConceptBank` to a directory URI (``bank.safetensors`` is the commit
    point; ``bank.json`` is a readable copy written after it)."""
    if not is_url(uri):
        bank.save(local_path(uri))
        return uri
    from reco.bank import bank_json_bytes

    write_bytes(join(uri, "bank.safetensors"), bank.to_bytes(), storage_options)
    write_bytes(join(uri, "bank.json"), bank_json_bytes(bank), storage_options)
    return uri


def load_bank(uri: str, storage_options: StorageOptions = None):
    """Load a :class:`reco.ConceptBank` from a directory URI."""
    from reco.bank import ConceptBank

    if not is_url(uri):
        return ConceptBank.load(local_path(uri))
    try:
        data = read_bytes(join(uri, "bank.safetensors"), storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} is not a concept bank (needs bank.safetensors)") from None
    return ConceptBank.from_bytes(data, uri)


def cache_dir() -> Path:
    base = os.environ.get("RECO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "reco-cluster")
    return Path(base)


def fetch_to_cache(uri: str, storage_options: StorageOptions = None) -> Path:
    """A local copy of the file at ``uri`` in this node's cache (downloaded once, atomically);
    local paths are returned as they are. For weights named by URL on a cluster."""
    if not is_url(uri):
        return local_path(uri)
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache_dir() / "remote" / key / posixpath.basename(uri.rstrip("/"))
    if not dest.is_file():
        logger.info("fetching %s into %s", uri, dest)
        write_bytes(str(dest), read_bytes(uri, storage_options))
    return dest


def list_files(prefix: str, storage_options: StorageOptions = None, suffix: str = "") -> list:
    """Sorted URIs of the files directly under the folder ``prefix`` whose names end in ``suffix``
    ([] when the folder does not exist)."""
    if is_url(prefix):
        fs, path = _fs(prefix, storage_options)
        scheme = str(prefix).split("://", 1)[0]
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise OSError(f"cannot list {prefix}: {type(exc).__name__}: {exc}") from exc
        return sorted(f"{scheme}://{n}" for n in names if n.endswith(suffix) and not posixpath.basename(n).startswith("."))
    p = local_path(prefix)
    if not p.is_dir():
        return []
    return sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.endswith(suffix) and not f.name.startswith("."))


def writer_lock(uri: str, job: str):
    """A context manager holding the exclusive writer lock of the output folder ``uri``
    (``URI/writer.lock``, :class:`index.store.StoreLock`). Object stores cannot be locked this
    way: there it logs a warning and holds nothing (run one job per output)."""
    import contextlib

    if is_url(uri):
        logger.warning("%s is an object store: no writer lock is possible there; run one %s job per output "
                       "at a time", uri, job)
        return contextlib.nullcontext()
    from index.store import StoreLock

    root = local_path(uri)
    root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def held():
        lock = StoreLock(root / "writer.lock", job=job).acquire()
        try:
            yield lock
        finally:
            lock.release()

    return held()


def remove_files(uris, storage_options: StorageOptions = None) -> int:
    """Delete the given files (local or object store); returns how many were removed."""
    n = 0
    for uri in uris:
        if is_url(uri):
            fs, path = _fs(uri, storage_options)
            fs.rm(path)
        else:
            local_path(uri).unlink(missing_ok=True)
        n += 1
    return n
