"""Corpus sources: what to embed, as a sorted list of :class:`Item` with stable ids.

* a local folder or any fsspec URL prefix (``s3://bucket/prefix``): every image file below it,
  recursively; id = the path relative to the root;
* Parquet files (local or fsspec) holding either image bytes (a binary column, or a struct with
  a ``bytes`` field as written by HF datasets / img2dataset) or paths/URLs; id = an ``id``/``key``
  column when present, else ``<file name>#<row>``.

Items carry no pixels: workers fetch bytes themselves (:func:`fetch_bytes`), so the driver never
holds the corpus.
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

BYTES_COLUMNS = ("image", "jpg", "bytes", "image_bytes", "img")
PATH_COLUMNS = ("path", "uri", "url", "file", "filepath", "image_path")
ID_COLUMNS = ("id", "key", "image_id")


def _is_url(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@dataclass(frozen=True)
class Item:
    """One corpus image. ``uri`` is a file/URL, or ``parquet://<file>#<row>`` for embedded bytes."""

    id: str
    uri: str


def _fs(url: str, storage_options: Optional[Mapping[str, Any]] = None):
    import fsspec

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def list_folder(root: str, storage_options: Optional[Mapping[str, Any]] = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Item]:
    """Every image file under ``root`` (recursive), sorted by id (the relative path)."""
    exts = tuple(e.lower() for e in extensions)
    if _is_url(root):
        fs, base = _fs(root, storage_options)
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
    p = Path(root.removeprefix("file://")).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"image folder {p} does not exist")
    files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts]
    return sorted((Item(f.relative_to(p).as_posix(), str(f)) for f in files), key=lambda i: i.id)


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
        if name.lower() in BYTES_COLUMNS and (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                              or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):
            bytes_col = name
            break
    path_col = _pick(names, PATH_COLUMNS)
    return id_col, bytes_col, path_col


def list_parquet(source: str, storage_options: Optional[Mapping[str, Any]] = None) -> List[Item]:
    """Items of one Parquet file or of every ``*.parquet`` under a folder/prefix."""
    import pyarrow.parquet as pq

    if source.endswith(".parquet"):
        files = [source]
    elif _is_url(source):
        fs, base = _fs(source, storage_options)
        proto = source.split("://", 1)[0]
        files = sorted(f"{proto}://{f}" for f in fs.find(base) if f.endswith(".parquet"))
    else:
        files = sorted(str(f) for f in Path(source).expanduser().rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet file at {source}")
    items: List[Item] = []
    for f in files:
        fs, path = _fs(f, storage_options) if _is_url(f) else (None, f)
        pf = pq.ParquetFile(fs.open(path, "rb") if fs is not None else path)
        id_col, bytes_col, path_col = parquet_columns(pf.schema_arrow)
        if bytes_col is None and path_col is None:
            raise ValueError(
                f"{f}: no image column (a binary {'/'.join(BYTES_COLUMNS)} column or a "
                f"{'/'.join(PATH_COLUMNS)} column); columns are {pf.schema_arrow.names}"
            )
        cols = [c for c in (id_col, None if bytes_col else path_col) if c]
        table = pf.read(columns=cols) if cols else None
        n = pf.metadata.num_rows
        ids = [str(v) for v in table.column(id_col).to_pylist()] if id_col else [f"{posixpath.basename(f)}#{r}" for r in range(n)]
        if bytes_col:
            uris = [f"parquet://{f}#{r}" for r in range(n)]
        else:
            uris = [str(v) for v in table.column(path_col).to_pylist()]
        items += [Item(i, u) for i, u in zip(ids, uris)]
    dup = len(items) - len({i.id for i in items})
    if dup:
        raise ValueError(f"{source}: {dup} duplicate ids; ids must be unique across the corpus")
    return sorted(items, key=lambda i: i.id)


def list_source(source: str, kind: str = "auto", storage_options: Optional[Mapping[str, Any]] = None) -> List[Item]:
    """Dispatch on ``kind`` ('folder', 'parquet' or 'auto': Parquet when the source ends in .parquet
    or holds Parquet files and no images)."""
    if kind == "auto":
        kind = "parquet" if source.rstrip("/").endswith(".parquet") else "folder"
        if kind == "folder" and not _is_url(source):
            p = Path(source).expanduser()
            if p.is_dir() and any(p.rglob("*.parquet")) and not any(
                f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file()
            ):
                kind = "parquet"
    if kind == "folder":
        return list_folder(source, storage_options)
    if kind == "parquet":
        return list_parquet(source, storage_options)
    raise ValueError(f"unknown source kind {kind!r} (folder, parquet, auto)")


class ParquetRowReader:
    """Reads embedded image bytes by ``parquet://file#row`` with a one-row-group cache."""

    def __init__(self, storage_options: Optional[Mapping[str, Any]] = None):
        self.storage_options = dict(storage_options or {})
        self._file: Optional[str] = None
        self._pf = None
        self._bytes_col: Optional[str] = None
        self._offsets: List[int] = []
        self._group: Tuple[int, Any] = (-1, None)

    def _open(self, f: str) -> None:
        import pyarrow.parquet as pq

        if self._file == f:
            return
        if _is_url(f):
            fs, path = _fs(f, self.storage_options)
            self._pf = pq.ParquetFile(fs.open(path, "rb"))
        else:
            self._pf = pq.ParquetFile(f)
        _, self._bytes_col, _ = parquet_columns(self._pf.schema_arrow)
        if self._bytes_col is None:
            raise ValueError(f"{f}: no image bytes column")
        offs, acc = [], 0
        for g in range(self._pf.num_row_groups):
            offs.append(acc)
            acc += self._pf.metadata.row_group(g).num_rows
        self._offsets, self._file, self._group = offs + [acc], f, (-1, None)

    def read(self, uri: str) -> bytes:
        import bisect

        f, row = uri[len("parquet://"):].rsplit("#", 1)
        row = int(row)
        self._open(f)
        g = bisect.bisect_right(self._offsets, row) - 1
        if g < 0 or row >= self._offsets[-1]:
            raise OSError(f"{uri}: row out of range")
        if self._group[0] != g:
            self._group = (g, self._pf.read_row_group(g, columns=[self._bytes_col]).column(0))
        value = self._group[1][row - self._offsets[g]].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        return value or b""


def fetch_bytes(uri: str, storage_options: Optional[Mapping[str, Any]] = None,
                parquet: Optional[ParquetRowReader] = None) -> bytes:
    """Bytes of an item's uri: a local path, an fsspec URL, or ``parquet://file#row``."""
    if uri.startswith("parquet://"):
        return (parquet or ParquetRowReader(storage_options)).read(uri)
    if _is_url(uri):
        fs, path = _fs(uri, storage_options)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise
        except Exception as exc:  # S3 errors surface with many types
            raise OSError(f"{uri}: {type(exc).__name__}: {exc}") from exc
    with open(uri.removeprefix("file://"), "rb") as fh:
        return fh.read()
