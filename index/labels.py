"""Label-map files and output names.

* :func:`output_name`: the relative output path of an input id (the id's path relative to the
  corpus root), made safe for any file system and object store: ``a/0001.jpg`` and
  ``b/0001.jpg`` stay apart (the folder is kept), ``0001.jpg`` and ``0001.png`` stay apart (the
  extension is kept), and nothing can escape the output root.
* :func:`encode_labels` / :func:`decode_labels`: label maps as PNG: an 8-bit palette PNG when
  every id is below 256 (viewable, colours = the VOC map), a 16-bit greyscale PNG beyond (a
  vocabulary of 1,000 concepts must not wrap). Ids are always the pixel values.
"""

from __future__ import annotations

import io
import re
from typing import Optional

import numpy as np

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _escape(part: str) -> str:
    out = _SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8", "surrogateescape")), part)
    if out in (".", ".."):
        return out.replace(".", "%2E")
    return out or "%"  # an empty component; "%" never appears unescaped otherwise


def output_name(item_id: str, suffix: str = ".png") -> str:
    """A safe relative output path for ``item_id`` (a ``/``-separated id), ending in ``suffix``.

    Each path component keeps ``[A-Za-z0-9._-]`` and percent-encodes every other byte, so the
    mapping is injective (distinct ids never share an output) and reversible; ``.``/``..``
    components and absolute ids cannot leave the output folder.
    """
    if not item_id:
        raise ValueError("empty item id")
    parts = str(item_id).split("/")
    return "/".join(_escape(p) for p in parts) + suffix


def encode_labels(labels: np.ndarray, palette: Optional[np.ndarray] = None) -> bytes:
    """(H, W) non-negative integer ids -> PNG bytes (8-bit palette when max < 256, else 16-bit)."""
    from PIL import Image

    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() > 65535):
        raise ValueError(f"label ids must lie in [0, 65535], got [{lab.min()}, {lab.max()}]")
    buf = io.BytesIO()
    if lab.size == 0 or lab.max() < 256:
        img = Image.fromarray(lab.astype(np.uint8), "P")
        if palette is None:
            from reco.visualize import palette as voc_palette

            palette = voc_palette(256)
        img.putpalette(np.asarray(palette, dtype=np.uint8)[:256].reshape(-1).tolist())
    else:
        img = Image.fromarray(lab.astype(np.uint16))  # mode I;16
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_labels(data: bytes) -> np.ndarray:
    """PNG bytes written by :func:`encode_labels` (or any single-channel PNG) -> (H, W) int64 ids."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.mode not in ("P", "L", "I;16", "I;16B", "I"):
        raise ValueError(f"a label PNG must be single-channel ids, got mode {img.mode}")
    return np.array(img).astype(np.int64)
