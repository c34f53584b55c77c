"""Reading images from local folders or any fsspec URL (s3://, gs://, file://).

Bad files never crash a job: :func:`read_images` returns the decoded images and a
:class:`ReadReport` naming every input it could not use, classified by the one rule of
:func:`index.sources.classify_failure`: ``skipped`` (bad input: corrupt, not an image, broken
symlink, ... never usable) and ``failed`` (transient: I/O errors, timeouts, a file missing on this
node, after :func:`index.sources.fetch_bytes`' retries; worth trying again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from reco.image import decode_image

from .sources import BAD, RetryPolicy, classify_failure, fetch_bytes, list_folder

logger = logging.getLogger(__name__)


@dataclass
class ReadReport:
    """Counts of a read: ``ok`` decoded images, ``skipped`` {uri: reason} (bad input) and
    ``failed`` {uri: reason} (transient failures: a rerun may read them)."""

    ok: int = 0
    skipped: Dict[str, str] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)

    def skip(self, uri: str, reason: str) -> None:
        self.skipped[uri] = reason
        logger.warning("skipped %s: %s", uri, reason)

    def fail(self, uri: str, reason: str) -> None:
        self.failed[uri] = reason
        logger.warning("could not read %s (transient, retry later): %s", uri, reason)

    def record(self, uri: str, exc: BaseException) -> None:
        """Record a failure on ``uri`` as skipped or failed, by :func:`classify_failure`."""
        kind, reason = classify_failure(exc)
        (self.skip if kind == BAD else self.fail)(uri, reason)

    def as_dict(self) -> Dict[str, object]:
        return {
            "ok": self.ok,
            "skipped": len(self.skipped),
            "skipped_files": dict(self.skipped),
            "failed": len(self.failed),
            "failed_files": dict(self.failed),
        }


def list_images(root: str, storage_options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Sorted image uris under a local folder or fsspec URL (see :func:`index.sources.list_folder`).

    Files that are bad input already by their name (not valid UTF-8) are left out, with a warning."""
    uris = []
    for item in list_folder(root, storage_options):
        if item.problem:
            logger.warning("skipped %s: %s", item.uri, item.problem)
        else:
            uris.append(item.uri)
    return uris


def read_image(
    uri: str, storage_options: Optional[Mapping[str, Any]] = None, retry: Optional[RetryPolicy] = None
) -> Image.Image:
    """Decode one image. Raises :class:`reco.errors.ImageDecodeError` / :class:`reco.errors.BadInputError`
    (bad input) or :class:`reco.errors.TransientIOError` (after retries), each naming ``uri``."""
    return decode_image(fetch_bytes(uri, storage_options, retry=retry), source=uri)


def read_images(
    uris: Sequence[str],
    report: ReadReport | None = None,
    storage_options: Optional[Mapping[str, Any]] = None,
    retry: Optional[RetryPolicy] = None,
) -> Tuple[List[Image.Image], List[str], ReadReport]:
    """Decode many images, skipping bad inputs and counting transient failures apart."""
    report = report if report is not None else ReadReport()
    images, kept = [], []
    for uri in uris:
        try:
            images.append(read_image(uri, storage_options, retry))
            kept.append(uri)
            report.ok += 1
        except Exception as exc:  # noqa: BLE001 - classified: bad input vs transient
            report.record(uri, exc)
    return images, kept, report
