"""Reading images from local folders or any fsspec URL (s3://, gs://, file://).

Bad files never crash a job: :func:`read_images` returns the decoded images and a
:class:`ReadReport` counting every skipped file with its reason.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image

from reco.errors import ImageDecodeError
from reco.image import decode_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ReadReport:
    """Counts of a read: ``ok`` decoded images, ``skipped`` {uri: reason}."""

    ok: int = 0
    skipped: Dict[str, str] = field(default_factory=dict)

    def skip(self, uri: str, reason: str) -> None:
        self.skipped[uri] = reason
        logger.warning("skipped %s: %s", uri, reason)

    def reasons(self) -> Dict[str, int]:
        return dict(Counter(r.split(":")[0] for r in self.skipped.values()))

    def as_dict(self) -> Dict[str, object]:
        return {"ok": self.ok, "skipped": len(self.skipped), "skipped_files": dict(self.skipped)}


def _is_url(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def list_images(root: str, recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Sorted image files under a local folder or fsspec URL. Raises if ``root`` does not exist."""
    exts = tuple(e.lower() for e in extensions)
    if _is_url(root):
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        if not fs.exists(path):
            raise FileNotFoundError(f"{root} does not exist")
        files = fs.find(path) if recursive else fs.ls(path, detail=False)
        proto = root.split("://", 1)[0]
        return sorted(f"{proto}://{f}" for f in files if f.lower().endswith(exts))
    p = Path(root.removeprefix("file://")).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"image folder {p} does not exist")
    it = p.rglob("*") if recursive else p.iterdir()
    return sorted(str(f) for f in it if f.is_file() and f.suffix.lower() in exts)


def read_bytes(uri: str) -> bytes:
    """Bytes of a local path or fsspec URL."""
    if _is_url(uri):
        import fsspec

        with fsspec.open(uri, "rb") as f:
            return f.read()
    with open(uri.removeprefix("file://"), "rb") as f:
        return f.read()


def read_image(uri: str) -> Image.Image:
    """Decode one image; raises :class:`ImageDecodeError` or ``OSError`` naming ``uri``."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise OSError(f"{uri}: cannot read ({exc})") from exc
    return decode_image(data, source=uri)


def read_images(uris: Sequence[str], report: ReadReport | None = None) -> Tuple[List[Image.Image], List[str], ReadReport]:
    """Decode many images, skipping (and counting) unreadable ones."""
    report = report if report is not None else ReadReport()
    images, kept = [], []
    for uri in uris:
        try:
            images.append(read_image(uri))
            kept.append(uri)
            report.ok += 1
        except ImageDecodeError as exc:
            report.skip(uri, f"decode: {exc}")
        except OSError as exc:
            report.skip(uri, f"io: {exc}")
    return images, kept, report


def relative_name(uri: str, root: str) -> str:
    return os.path.relpath(uri, root) if not _is_url(uri) else uri
