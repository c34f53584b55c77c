"""The one storage URI rule: every artifact a Ray worker reads or writes is named by a URI.

A URI is either a **local path** (valid on every node only when it is on a shared file system,
or when the cluster is one machine) or an **fsspec URL** (``s3://bucket/prefix``, ``gs://...``,
``file:///...``), reached with the caller's ``storage_options`` (endpoint, credentials: from the
environment or the standard AWS chain; never logged). Workers are never handed a path that only
exists on the driver: banks travel to actors as bytes, weights named by URL are fetched into each
node's cache, outputs are written to the output URI.

Writes are atomic: a local file is written under a temporary name in its folder, fsynced and
renamed; an object-store PUT is atomic by itself (readers see the old object or the new one).
Reads of an object are one GET, so a reader sees one version of it even while a writer replaces
it. This module is the one place that opens fsspec (:func:`filesystem`), writes atomically
(:func:`write_bytes`), hashes content (:func:`sha256_bytes`, :func:`file_sha256`) and tells a URL
from a path (:func:`is_url`). Writer locks are in :mod:`index.lock`, resumable job outputs in
:mod:`index.output`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import secrets
import shutil
import time
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


def absolute(uri: str) -> str:
    """A URI every worker can use: URLs unchanged, local paths made absolute (a relative path
    means something else in a Ray worker, whose working directory is not the driver's)."""
    return str(uri) if is_url(uri) else os.path.abspath(local_path(uri))


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI (``/`` separators for URLs)."""
    if is_url(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(local_path(uri).joinpath(*parts))


def filesystem(uri: str, storage_options: StorageOptions = None):
    """``(fsspec file system, path inside it)`` of a URI: the one fsspec entry point."""
    import fsspec

    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: os.PathLike) -> str:
    """The hex sha256 of a local file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
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


def _temp_name(p: Path) -> Path:
    """A fresh temporary name beside ``p``: hidden, ``.NAME.<hex>.tmp`` (never a finished file's
    name; listings skip it)."""
    return p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")


def _replace_atomically(p: Path, fill) -> None:
    """Write ``p`` as ``fill(temp path)`` then fsync and rename (the temp file never stays)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(p)
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(p.parent)


def exists(uri: str, storage_options: StorageOptions = None) -> bool:
    if is_url(uri):
        fs, path = filesystem(uri, storage_options)
        return bool(fs.exists(path))
    return local_path(uri).exists()


#: attempts of a read whose object was replaced under it (a ranged or ETag-pinned read)
READ_ATTEMPTS = 4


def _replaced_under_reader(exc: BaseException) -> bool:
    """The object changed between two requests of one read (s3fs ``FileExpired``, an ETag
    precondition answered 412): reading again gives the new version whole."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is not None and (type(e).__name__ == "FileExpired" or _condition_failed(e)):
            return True
    return False


def read_bytes(uri: str, storage_options: StorageOptions = None) -> bytes:
    """The bytes at ``uri``; ``FileNotFoundError`` when absent, ``OSError`` naming the URI otherwise.

    An object is read with one GET (``cat_file``; on S3 without concurrent ranges), so it is one
    version even while another process replaces it; an object replaced between requests of a read
    (a file system that pins versions) is read again."""
    if not is_url(uri):
        p = local_path(uri)
        if not p.is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        return p.read_bytes()
    fs, path = filesystem(uri, storage_options)
    one_get = {"max_concurrency": 1} if conditional_writes(uri) else {}
    for attempt in range(READ_ATTEMPTS):
        try:
            return fs.cat_file(path, **one_get)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} does not exist") from None
        except Exception as exc:  # object stores raise many types
            if _replaced_under_reader(exc) and attempt + 1 < READ_ATTEMPTS:
                logger.debug("%s was replaced while being read: reading it again", uri)
                fs.invalidate_cache(path)
                time.sleep(0.05 * (attempt + 1))
                continue
            raise OSError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write ``data`` to ``uri`` atomically (parent folders are created): the one atomic writer
    (local: temporary name, fsync, rename, fsync of the folder; URL: one PUT)."""
    if is_url(uri):
        fs, path = filesystem(uri, storage_options)
        try:
            with fs.open(path, "wb") as fh:
                fh.write(data)
        except Exception as exc:
            raise OSError(f"cannot write {uri}: {type(exc).__name__}: {exc}") from exc
        return
    _replace_atomically(local_path(uri), lambda tmp: tmp.write_bytes(data))


def save_bank(bank, uri: str, storage_options: StorageOptions = None) -> str:
    """Save a :class:`reco.ConceptBank` to a directory URI (``bank.safetensors`` is the commit
    point; ``bank.json`` is a readable copy written after it), each atomically, local or URL."""
    from reco.bank import bank_json_bytes

    write_bytes(join(uri, "bank.safetensors"), bank.to_bytes(), storage_options)
    write_bytes(join(uri, "bank.json"), bank_json_bytes(bank), storage_options)
    return uri


def load_bank(uri: str, storage_options: StorageOptions = None):
    """Load a :class:`reco.ConceptBank` from a directory URI. Only ``bank.safetensors`` is read
    (``bank.json`` is a copy), except for format-1 banks, whose header lived in ``bank.json`` alone."""
    from reco.bank import ConceptBank, needs_bank_json

    try:
        data = read_bytes(join(uri, "bank.safetensors"), storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} is not a concept bank (needs bank.safetensors)") from None
    bank_json = None
    if needs_bank_json(data, uri):
        try:
            bank_json = read_bytes(join(uri, "bank.json"), storage_options)
        except FileNotFoundError:
            pass  # from_bytes reports the missing header
    return ConceptBank.from_bytes(data, uri, bank_json)


def cache_dir() -> Path:
    base = os.environ.get("RECO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "reco-cluster")
    return Path(base)


def fetch_to_cache(
    uri: str, storage_options: StorageOptions = None, sha256: Optional[str] = None, version: Optional[str] = None
) -> Path:
    """A local copy of the file at ``uri`` in this node's cache (downloaded once, atomically);
    local paths are returned as they are. For weights named by URL on a cluster.

    ``sha256`` (the content's digest) and/or ``version`` (e.g. the object's ETag) are part of
    the cache key, so a changed object is fetched again; a download whose content does not match
    ``sha256`` raises ``OSError`` (the object changed while it was read) and is not kept."""
    if not is_url(uri):
        return local_path(uri)
    if sha256 is not None or version is not None:
        return _fetch_versioned(uri, storage_options, sha256, version)
    key = sha256_bytes(uri.encode())[:16]
    dest = cache_dir() / "remote" / key / posixpath.basename(uri.rstrip("/"))
    if not dest.is_file():
        logger.info("fetching %s into %s", uri, dest)
        write_bytes(str(dest), read_bytes(uri, storage_options))
    return dest


class ObjectChangedError(OSError):
    """A file fetched by content digest did not have that content: it was replaced meanwhile."""


def object_version(uri: str, storage_options: StorageOptions = None) -> str:
    """A string that changes whenever the file at ``uri`` is replaced (ETag, else mtime and size),
    fresh from the server; ``FileNotFoundError`` when absent."""
    if not is_url(uri):
        st = local_path(uri).stat()
        return f"{st.st_mtime_ns}-{st.st_size}"
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None
    for k in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(k):
            return str(info[k])
    return f"{info.get('mtime') or info.get('LastModified') or info.get('updated') or ''}-{info.get('size')}"


def _fetch_versioned(uri: str, storage_options: StorageOptions, sha256: Optional[str], version: Optional[str]) -> Path:
    key = sha256_bytes(f"{uri}\0{sha256 or ''}\0{version or ''}".encode())[:16]
    dest = cache_dir() / "remote" / key / posixpath.basename(uri.rstrip("/"))
    if dest.is_file():
        return dest
    logger.info("fetching %s into %s", uri, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    fs, path = filesystem(uri, storage_options)
    try:
        fs.invalidate_cache(path)
        try:
            fs.get_file(path, str(tmp))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} does not exist") from None
        except Exception as exc:
            raise OSError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
        if sha256 is not None and file_sha256(tmp) != sha256:
            raise ObjectChangedError(
                f"{uri} does not have the expected content (sha256 {sha256[:12]}...): it was replaced while being read"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dest


def list_files(prefix: str, storage_options: StorageOptions = None, suffix: str = "", refresh: bool = False) -> list:
    """Sorted URIs of the files directly under the folder ``prefix`` whose names end in ``suffix``
    ([] when the folder does not exist); ``refresh``: list afresh, not from fsspec's listing cache."""
    if is_url(prefix):
        fs, path = filesystem(prefix, storage_options)
        if refresh:
            fs.invalidate_cache(path)
        scheme = str(prefix).split("://", 1)[0]
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise OSError(f"cannot list {prefix}: {type(exc).__name__}: {exc}") from exc
        return sorted(
            f"{scheme}://{n}" for n in names if n.endswith(suffix) and not posixpath.basename(n).startswith(".")
        )
    p = local_path(prefix)
    if not p.is_dir():
        return []
    return sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.endswith(suffix) and not f.name.startswith("."))


def remove_files(uris, storage_options: StorageOptions = None) -> int:
    """Delete the given files (local or object store); returns how many were removed."""
    n = 0
    for uri in uris:
        if is_url(uri):
            fs, path = filesystem(uri, storage_options)
            fs.rm(path)
        else:
            local_path(uri).unlink(missing_ok=True)
        n += 1
    return n


# -- conditional object-store requests (the embedding store's commit point and writer lock) --------

#: ``if_version`` value of :func:`write_conditional` that means "only if the object does not exist"
CREATE = "*"


class ConditionFailedError(OSError):
    """A conditional write or delete was refused: the object is not in the state its condition named
    (S3 ``412 PreconditionFailed``, or ``409 ConditionalRequestConflict`` for a concurrent one)."""


def conditional_writes(uri: str) -> bool:
    """True where :func:`write_conditional` is atomic on the server: S3 (``If-None-Match: *`` /
    ``If-Match: ETAG`` PUTs; AWS S3, MinIO, moto). Elsewhere (other fsspec URLs) it is a
    check-then-write, which cannot exclude a concurrent writer."""
    return is_url(uri) and str(uri).split("://", 1)[0] in ("s3", "s3a")


def _condition_failed(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = (resp.get("Error") or {}).get("Code")
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
    return False


def _s3(uri: str, storage_options: StorageOptions):
    fs, path = filesystem(uri, storage_options)
    bucket, key, _ = fs.split_path(path)
    return fs, path, bucket, key


def read_versioned(uri: str, storage_options: StorageOptions = None):
    """``(bytes, version, age_s)`` of the object at ``uri``, read in one request that bypasses any
    listing cache. ``version`` is what :func:`write_conditional` / :func:`delete_conditional`
    take as ``if_version`` (the ETag on S3, a sha256 of the content elsewhere); ``age_s`` is the
    seconds since the object was last written by the server's own clock (``Date`` minus
    ``Last-Modified``; None where unknown). ``FileNotFoundError`` when absent."""
    if not conditional_writes(uri):
        data = read_bytes(uri, storage_options)
        return data, sha256_bytes(data), None
    from email.utils import parsedate_to_datetime

    from fsspec.asyn import sync

    fs, path, bucket, key = _s3(uri, storage_options)

    async def get():
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = resp["Body"]
        try:
            return await body.read(), resp
        finally:
            body.close()

    try:
        data, resp = sync(fs.loop, get)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None
    except Exception as exc:
        raise OSError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    age = None
    try:
        now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = max(0.0, (now - resp["LastModified"]).total_seconds())
    except (KeyError, TypeError, ValueError):
        pass
    return data, resp.get("ETag"), age


def write_conditional(
    uri: str, data: bytes, storage_options: StorageOptions = None, if_version: Optional[str] = None
) -> str:
    """Write ``data`` to ``uri`` in one PUT, only if the object is absent (``if_version=CREATE``)
    or still at ``if_version`` (a version from :func:`read_versioned` or from an earlier call);
    ``None``: unconditionally. Returns the new version; raises :class:`ConditionFailedError`
    when the condition does not hold. Atomic on S3 (see :func:`conditional_writes`); elsewhere a
    best-effort check-then-write."""
    if not conditional_writes(uri):
        if if_version is not None:
            try:
                _, current, _ = read_versioned(uri, storage_options)
            except FileNotFoundError:
                current = None
            if (if_version == CREATE and current is not None) or (if_version != CREATE and current != if_version):
                raise ConditionFailedError(f"{uri}: precondition failed ({'exists' if current else 'changed'})")
        write_bytes(uri, data, storage_options)
        return sha256_bytes(data)
    fs, path, bucket, key = _s3(uri, storage_options)
    cond = {} if if_version is None else ({"IfNoneMatch": "*"} if if_version == CREATE else {"IfMatch": if_version})
    try:
        resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
    except Exception as exc:
        if _condition_failed(exc):
            raise ConditionFailedError(
                f"{uri}: precondition failed ({'exists' if if_version == CREATE else 'changed'})"
            ) from exc
        raise OSError(f"cannot write {uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        fs.invalidate_cache(path)
    return resp.get("ETag")


def delete_conditional(uri: str, storage_options: StorageOptions = None, if_version: Optional[str] = None) -> None:
    """Delete the object at ``uri`` only if it is still at ``if_version`` (:class:`ConditionFailedError`
    otherwise; nothing when it is absent). Endpoints that reject conditional deletes get a plain
    delete after a read that checks the version (a short race)."""
    if if_version is None or not conditional_writes(uri):
        if if_version is not None:
            try:
                _, current, _ = read_versioned(uri, storage_options)
            except FileNotFoundError:
                return
            if current != if_version:
                raise ConditionFailedError(f"{uri}: precondition failed (changed)")
        if exists(uri, storage_options):
            remove_files([uri], storage_options)
        return
    fs, path, bucket, key = _s3(uri, storage_options)
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=if_version)
    except FileNotFoundError:
        return
    except Exception as exc:
        if _condition_failed(exc):
            raise ConditionFailedError(f"{uri}: precondition failed (changed)") from exc
        logger.debug("conditional delete of %s refused (%s): checking, then deleting", uri, exc)
        try:
            _, current, _ = read_versioned(uri, storage_options)
        except FileNotFoundError:
            return
        if current != if_version:
            raise ConditionFailedError(f"{uri}: precondition failed (changed)") from None
        fs.call_s3("delete_object", Bucket=bucket, Key=key)
    finally:
        fs.invalidate_cache(path)


def write_new(uri: str, data: bytes, storage_options: StorageOptions = None) -> bool:
    """Create ``uri`` holding ``data`` only if it does not exist, atomically: True when written,
    False when it already existed (left as it was). Local: a finished temporary file hard-linked
    to the name (``link`` fails on an existing name); S3: ``PUT If-None-Match: *``; other URLs:
    check-then-write (see :func:`conditional_writes`)."""
    if is_url(uri):
        try:
            write_conditional(uri, data, storage_options, if_version=CREATE)
        except ConditionFailedError:
            return False
        return True
    p = local_path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(p)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(p.parent)
    return True


def is_file(uri: str, storage_options: StorageOptions = None) -> bool:
    """True when ``uri`` names an existing file (object), fresh from the server."""
    if not is_url(uri):
        return local_path(uri).is_file()
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    try:
        return bool(fs.isfile(path))
    except FileNotFoundError:
        return False


def upload_file(local: os.PathLike, uri: str, storage_options: StorageOptions = None) -> None:
    """Copy a local file to ``uri`` atomically (one PUT, or a multipart upload that becomes visible
    only when complete); a local ``uri`` is written under a temporary name and renamed."""
    if not is_url(uri):
        _replace_atomically(local_path(uri), lambda tmp: shutil.copyfile(local, tmp))
        return
    fs, path = filesystem(uri, storage_options)
    try:
        fs.put_file(str(local), path)
    except Exception as exc:
        raise OSError(f"cannot write {uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        fs.invalidate_cache(path)
