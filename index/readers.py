"""Reading images from local folders or any fsspec URL (s3://, gs://, file://).

Bad files never crash a job: :func:`read_images` returns the decoded images and a
:class:`ReadReport` counting every skipped file with its reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from reco.errors import ImageDecodeError
from reco.image import decode_image

from .sources import fetch_bytes, list_folder

logger = logging.getLogger(__name__)



@dataclass
class ReadReport:
    """Counts of a read: ``ok`` decoded images, ``skipped`` {uri: reason}."""

    ok: int = 0
    skipped: Dict[str, str] = field(default_factory=dict)

    def skip(self, uri: str, reason: str) -> None:
        self.skipped[uri] = reason
        logger.warning("skipped %s: %s", uri, reason)

    def as_dict(self) -> Dict[str, object]:
        return {"ok": self.ok, "skipped": len(self.skipped), "skipped_files": dict(self.skipped)}


def list_images(root: str, storage_options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Sorted image uris under a local folder or fsspec URL (see :func:`index.sources.list_folder`)."""
    return [item.uri for item in list_folder(root, storage_options)]


def read_image(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Image.Image:
    """Decode one image; raises :class:`ImageDecodeError` or ``OSError`` naming ``uri``."""
    try:
        data = fetch_bytes(uri, storage_options)
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
