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
    rgb = palette(max(256, int(lab.max(initial=0)) + 1))[np.clip(lab, 0, None)]
    if ignore_index is not None:
        rgb[lab == ignore_index] = 255
    return Image.fromarray(rgb, "RGB")


def overlay(image: Image.Image, labels: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend the colourised labels over the image."""
    col = colorize(labels).resize(image.size, Image.Resampling.NEAREST)
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


def legend(class_names, ids=None, swatch: int = 14) -> Image.Image:
    """A colour legend: one row per class, its VOC-map colour beside its name.

    ``ids`` are the label ids of ``class_names`` (default 0..C-1)."""
    from PIL import ImageDraw

    ids = list(range(len(class_names))) if ids is None else list(ids)
    cmap = palette(max(256, max(ids, default=0) + 1))
    row = swatch + 4
    width = 12 + swatch + 8 * max((len(str(n)) for n in class_names), default=1) + 8
    img = Image.new("RGB", (width, max(1, row * len(class_names)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (i, name) in enumerate(zip(ids, class_names)):
        y = 2 + r * row
        draw.rectangle([4, y, 4 + swatch, y + swatch], fill=tuple(int(c) for c in cmap[i]), outline=(0, 0, 0))
        draw.text((10 + swatch, y + 1), str(name), fill=(0, 0, 0))
    return img


def legend_html(class_names, ids=None) -> str:
    """The same legend as HTML (for report pages)."""
    import html

    ids = list(range(len(class_names))) if ids is None else list(ids)
    cmap = palette(max(256, max(ids, default=0) + 1))
    items = "".join(
        f"<li><span style='display:inline-block;width:1em;height:1em;border:1px solid #000;"
        f"background:rgb({cmap[i][0]},{cmap[i][1]},{cmap[i][2]})'></span> {html.escape(str(n))}</li>"
        for i, n in zip(ids, class_names)
    )
    return f"<ul class='legend' style='list-style:none;columns:4'>{items}</ul>"
