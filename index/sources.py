"""Corpus sources: what to embed, as a sorted list of :class:`Item` with stable ids.

* a local folder or any fsspec URL prefix (``s3://bucket/prefix``): every image file below it,
  recursively; id = the path relative to the root;
* Parquet files (local or fsspec) holding either image bytes (a binary column, or a struct with
  a ``bytes`` field as written by HF datasets / img2dataset) or paths/URLs; id = an ``id``/``key``
  column when present, else ``<file name>#<row>``.

Items carry no pixels: workers fetch bytes themselves (:func:`fetch_bytes`), so the driver never
holds the corpus.

**Failure classification** (the one rule, used by ``reco embed``, bank building and segmentation):

* *bad input*, skipped for good with a reason: undecodable / corrupt / truncated / empty / too
  large / not an image (:class:`reco.errors.ImageDecodeError`), a broken symlink, a directory,
  a file name that is not valid UTF-8 (:class:`reco.errors.BadInputError`), malformed data
  (``ValueError``, e.g. a Parquet row out of range);
* *transient failure*, never recorded: any ``OSError`` while fetching (a listed file missing on
  this node, permission or I/O error, S3 timeout / throttling / 5xx, connection error).
  :func:`fetch_bytes` retries those with exponential back-off (:class:`RetryPolicy`, overridable
  with ``RECO_FETCH_ATTEMPTS`` / ``RECO_FETCH_BACKOFF_S`` / ``RECO_FETCH_MAX_BACKOFF_S``), then
  raises :class:`reco.errors.TransientIOError`; the caller leaves the input unprocessed so that
  a rerun retries it. An unexpected exception type is treated as transient too (never committed).

:func:`classify_failure` maps an exception to ``(kind, reason)``.

**File names that are not valid UTF-8** (e.g. ``caf\\xe9.jpg`` written in Latin-1) cannot be
stored in the Parquet metadata nor handed to Ray Data as strings. Such a file is listed with its
undecodable bytes written ``%XX`` (id ``caf%E9.jpg``) and a :attr:`Item.problem`, so it is
recorded as skipped (reason: the name is not valid UTF-8, rename it) instead of crashing the job.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from reco.errors import BadInputError, ConfigError, ImageDecodeError, TransientIOError

from .storage import filesystem, is_url

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

BYTES_COLUMNS = ("image", "jpg", "bytes", "image_bytes", "img")
PATH_COLUMNS = ("path", "uri", "url", "file", "filepath", "image_path")
ID_COLUMNS = ("id", "key", "image_id")


@dataclass(frozen=True)
class Item:
    """One corpus image. ``uri`` is a file/URL, or ``parquet://<file>#<row>`` for embedded bytes.

    ``problem``: why the item is bad input already at listing time ("" when it is not), e.g. a
    file name that is not valid UTF-8; such an item is recorded as skipped, never fetched."""

    id: str
    uri: str
    problem: str = ""


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes that ``os.fsdecode`` could not decode (lone surrogates
    U+DC80..U+DCFF) become ``%XX``, any other lone surrogate ``\\uXXXX``. Valid text is returned
    unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"%{o - 0xDC00:02X}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def is_representable(text: str) -> bool:
    """True when ``text`` can be stored as a UTF-8 string (Parquet, Arrow, JSON)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _local_item(path: Path, root: Path) -> Item:
    rel = path.relative_to(root).as_posix()
    full = str(path)
    if is_representable(rel) and is_representable(full):
        return Item(rel, full)
    raw = os.fsencode(full)
    return Item(
        printable(rel),
        printable(full),
        problem=f"file name is not valid UTF-8 ({raw!r}): rename it to UTF-8 "
        f"(e.g. convmv -f latin1 -t utf-8) and rerun",
    )


def list_folder(
    root: str, storage_options: Optional[Mapping[str, Any]] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> List[Item]:
    """Every image file under ``root`` (recursive), sorted by id (the relative path)."""
    exts = tuple(e.lower() for e in extensions)
    if is_url(root):
        fs, base = filesystem(root, storage_options)
        proto = root.split("://", 1)[0]
        try:
            exists = fs.exists(base)
        except Exception as exc:  # credentials, endpoint, permissions
            raise OSError(f"cannot list {root}: {type(exc).__name__}: {exc}") from exc
        if not exists:
            raise FileNotFoundError(f"{root} does not exist")
        files = [f for f in fs.find(base) if f.lower().endswith(exts)]
        base = base.rstrip("/")
        return sorted((Item(posixpath.relpath(f, base), f"{proto}://{f}") for f in files), key=lambda i: i.id)
    p = Path(root.removeprefix("file://")).expanduser().absolute()  # uris valid in any worker's directory
    if not p.is_dir():
        raise FileNotFoundError(f"image folder {p} does not exist")
    # broken symlinks are listed too (fetching them says why they are skipped)
    files = [
        f for f in p.rglob("*") if (f.is_file() or (f.is_symlink() and not f.exists())) and f.suffix.lower() in exts
    ]
    items = sorted((_local_item(f, p) for f in files), key=lambda i: i.id)
    seen = set()
    for it in items:
        if it.id in seen:  # only possible when an escaped non-UTF-8 name equals a real one
            raise ConfigError(
                f"{root}: two files have the id {it.id!r} (one of them has a name that is "
                f"not valid UTF-8, written with %XX): rename it"
            )
        seen.add(it.id)
    return items


def _pick(names: Iterable[str], wanted: Sequence[str]) -> Optional[str]:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def parquet_columns(schema) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(id column, bytes column, path column) of a Parquet schema; bytes wins over path."""
    import pyarrow as pa

    names = list(schema.names)
    id_col = _pick(names, ID_COLUMNS)
    bytes_col = None
    for name in names:
        t = schema.field(name).type
        if name.lower() in BYTES_COLUMNS and (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        ):
            bytes_col = name
            break
    path_col = _pick(names, PATH_COLUMNS)
    return id_col, bytes_col, path_col


def list_parquet(source: str, storage_options: Optional[Mapping[str, Any]] = None) -> List[Item]:
    """Items of one Parquet file or of every ``*.parquet`` under a folder/prefix."""
    import pyarrow.parquet as pq

    if source.endswith(".parquet"):
        files = [source]
    elif is_url(source):
        fs, base = filesystem(source, storage_options)
        proto = source.split("://", 1)[0]
        files = sorted(f"{proto}://{f}" for f in fs.find(base) if f.endswith(".parquet"))
    else:
        files = sorted(str(f) for f in Path(source).expanduser().rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet file at {source}")
    items: List[Item] = []
    for f in files:
        fs, path = filesystem(f, storage_options) if is_url(f) else (None, f)
        pf = pq.ParquetFile(fs.open(path, "rb") if fs is not None else path)
        id_col, bytes_col, path_col = parquet_columns(pf.schema_arrow)
        if bytes_col is None and path_col is None:
            raise ConfigError(
                f"{f}: no image column (a binary {'/'.join(BYTES_COLUMNS)} column or a "
                f"{'/'.join(PATH_COLUMNS)} column); columns are {pf.schema_arrow.names}"
            )
        cols = [c for c in (id_col, None if bytes_col else path_col) if c]
        table = pf.read(columns=cols) if cols else None
        n = pf.metadata.num_rows
        if id_col:
            assert table is not None
            ids = [str(v) for v in table.column(id_col).to_pylist()]
        else:
            ids = [f"{posixpath.basename(f)}#{r}" for r in range(n)]
        if bytes_col:
            uris = [f"parquet://{f}#{r}" for r in range(n)]
        else:
            assert table is not None and path_col is not None
            uris = [str(v) for v in table.column(path_col).to_pylist()]
        items += [Item(i, u) for i, u in zip(ids, uris)]
    dup = len(items) - len({i.id for i in items})
    if dup:
        raise ConfigError(f"{source}: {dup} duplicate ids; ids must be unique across the corpus")
    return sorted(items, key=lambda i: i.id)


def list_source(source: str, kind: str = "auto", storage_options: Optional[Mapping[str, Any]] = None) -> List[Item]:
    """Dispatch on ``kind`` ('folder', 'parquet' or 'auto': Parquet when the source ends in .parquet
    or holds Parquet files and no images)."""
    if kind == "auto":
        kind = "parquet" if source.rstrip("/").endswith(".parquet") else "folder"
        if kind == "folder" and not is_url(source):
            p = Path(source).expanduser()
            if (
                p.is_dir()
                and any(p.rglob("*.parquet"))
                and not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file())
            ):
                kind = "parquet"
    if kind == "folder":
        return list_folder(source, storage_options)
    if kind == "parquet":
        return list_parquet(source, storage_options)
    raise ConfigError(f"unknown source kind {kind!r} (folder, parquet, auto)")


class ParquetRowReader:
    """Reads embedded image bytes by ``parquet://file#row`` with a one-row-group cache."""

    def __init__(self, storage_options: Optional[Mapping[str, Any]] = None):
        self.storage_options = dict(storage_options or {})
        self._file: Optional[str] = None
        self._pf: Any = None  # pyarrow.parquet.ParquetFile of self._file
        self._bytes_col: Optional[str] = None
        self._offsets: List[int] = []
        self._group: Tuple[int, Any] = (-1, None)

    def _open(self, f: str) -> None:
        import pyarrow.parquet as pq

        if self._file == f:
            return
        if is_url(f):
            fs, path = filesystem(f, self.storage_options)
            self._pf = pq.ParquetFile(fs.open(path, "rb"))
        else:
            self._pf = pq.ParquetFile(f)
        _, self._bytes_col, _ = parquet_columns(self._pf.schema_arrow)
        if self._bytes_col is None:
            raise BadInputError(f"{f}: no image bytes column")
        offs, acc = [], 0
        for g in range(self._pf.num_row_groups):
            offs.append(acc)
            acc += self._pf.metadata.row_group(g).num_rows
        self._offsets, self._file, self._group = offs + [acc], f, (-1, None)

    def read(self, uri: str) -> bytes:
        import bisect

        f, row_text = uri[len("parquet://") :].rsplit("#", 1)
        row = int(row_text)
        self._open(f)
        g = bisect.bisect_right(self._offsets, row) - 1
        if g < 0 or row >= self._offsets[-1]:
            raise BadInputError(f"{uri}: row out of range")
        if self._group[0] != g:
            self._group = (g, self._pf.read_row_group(g, columns=[self._bytes_col]).column(0))
        value = self._group[1][row - self._offsets[g]].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        return value or b""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient fetch failures: ``attempts`` tries in all, waiting
    ``backoff_s * 2**k`` (capped at ``max_backoff_s``, with jitter in [50%, 100%]) before try k+2."""

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("retry back-off must be >= 0")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        d = min(self.max_backoff_s, self.backoff_s * (2**retry))
        return d * (0.5 + 0.5 * random.random())

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """Defaults, overridden by ``RECO_FETCH_ATTEMPTS``, ``RECO_FETCH_BACKOFF_S``, ``RECO_FETCH_MAX_BACKOFF_S``."""
        d = cls()
        try:
            return cls(
                int(os.environ.get("RECO_FETCH_ATTEMPTS", d.attempts)),
                float(os.environ.get("RECO_FETCH_BACKOFF_S", d.backoff_s)),
                float(os.environ.get("RECO_FETCH_MAX_BACKOFF_S", d.max_backoff_s)),
            )
        except ValueError as exc:
            raise ConfigError(f"bad RECO_FETCH_* environment variable: {exc}") from exc


BAD = "skipped"
TRANSIENT = "transient"


def classify_failure(exc: BaseException) -> Tuple[str, str]:
    """``(kind, reason)`` of a failure to fetch + decode one input: ``kind`` is :data:`BAD`
    (skip for good, record the reason) or :data:`TRANSIENT` (leave uncommitted, a rerun retries)."""
    if isinstance(exc, TransientIOError):
        return TRANSIENT, f"io: {exc}"
    if isinstance(exc, ImageDecodeError):
        return BAD, f"decode: {exc}"
    if isinstance(exc, BadInputError):
        return BAD, f"bad input: {exc}"
    if isinstance(exc, ValueError):  # malformed data (Arrow, row index, ...), not fixed by a retry
        return BAD, f"bad input: {type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):  # an I/O error that did not go through fetch_bytes' retries
        return TRANSIENT, f"io: {type(exc).__name__}: {exc}"
    return TRANSIENT, f"unexpected {type(exc).__name__}: {exc}"


def _fetch_local(uri: str) -> bytes:
    path = uri.removeprefix("file://")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except IsADirectoryError as exc:
        raise BadInputError(f"{uri}: is a directory, not an image file") from exc
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadInputError(f"{uri}: broken symlink (its target {os.readlink(path)} does not exist)") from None
        raise  # a listed file missing on this node: transient
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInputError(f"{uri}: symlink loop") from exc
        raise


def _fetch_once(uri: str, storage_options: Optional[Mapping[str, Any]], parquet: Optional[ParquetRowReader]) -> bytes:
    if uri.startswith("parquet://"):
        return (parquet or ParquetRowReader(storage_options)).read(uri)
    if is_url(uri):
        fs, path = filesystem(uri, storage_options)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except OSError:
            raise
        except Exception as exc:  # S3 errors surface with many types (botocore, aiohttp, ...)
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
    return _fetch_local(uri)


def fetch_bytes(
    uri: str,
    storage_options: Optional[Mapping[str, Any]] = None,
    parquet: Optional[ParquetRowReader] = None,
    retry: Optional[RetryPolicy] = None,
) -> bytes:
    """Bytes of an item's uri: a local path, an fsspec URL, or ``parquet://file#row``.

    Bad input raises :class:`BadInputError` (or ``ValueError``) at once; an ``OSError`` is retried
    per ``retry`` (default :meth:`RetryPolicy.from_env`) and then raised as
    :class:`TransientIOError` naming ``uri``, the attempts and the last error."""
    policy = retry or RetryPolicy.from_env()
    last: Optional[BaseException] = None
    for attempt in range(policy.attempts):
        if attempt:
            time.sleep(policy.delay(attempt - 1))
        try:
            return _fetch_once(uri, storage_options, parquet)
        except (BadInputError, TransientIOError):
            raise
        except OSError as exc:
            last = exc
            logger.debug("fetch %s failed (attempt %d/%d): %s", uri, attempt + 1, policy.attempts, exc)
    what = f"{type(last).__name__}: {last}" if last is not None else "unknown error"
    raise TransientIOError(f"{uri}: cannot read ({what}; {policy.attempts} attempt(s))") from last
