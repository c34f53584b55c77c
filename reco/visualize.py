"""Colour overlays of label maps (pure: PIL/numpy in, PIL out)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, index 0 black."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(labels: np.ndarray, ignore_index: int | None = 255) -> Image.Image:
    """(H, W) integer labels -> RGB image in the VOC palette (ignore pixels white)."""
    lab = np.asarray(labels).astype(np.int64)
    rgb = palette()[np.clip(lab, 0, 255)]
    if ignore_index is not None:
        rgb[lab == ignore_index] = 255
    return Image.fromarray(rgb, "RGB")


def overlay(image: Image.Image, labels: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend the colourised labels over the image."""
    col = colorize(labels).resize(image.size, Image.NEAREST)
    return Image.blend(image.convert("RGB"), col, alpha)


def side_by_side(*panels: Image.Image) -> Image.Image:
    w = sum(p.width for p in panels)
    h = max(p.height for p in panels)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    return out
