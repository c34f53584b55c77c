"""A contact sheet of search hits: thumbnails with rank and score, one PNG (``reco search --contact-sheet``)."""

from __future__ import annotations

from pathlib import Path


def write_contact_sheet(paths_scores, out: Path, thumb: int = 160, cols: int = 5, storage_options=None) -> Path:
    """Thumbnails of ``(uri, score)`` hits, ``cols`` per row, saved to the local image file ``out``; an image
    that cannot be read is marked in its cell instead of failing the sheet."""
    from PIL import Image, ImageDraw

    from index.sources import fetch_bytes
    from reco.image import decode_image

    rows = (len(paths_scores) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (uri, score) in enumerate(paths_scores):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + 16)
        try:
            im = decode_image(fetch_bytes(uri, storage_options), uri)
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except Exception as exc:  # a missing image must not lose the rest of the sheet
            draw.text((x + 4, y + 4), f"unreadable: {type(exc).__name__}", fill="red")
        draw.text((x + 4, y + thumb + 2), f"#{i + 1} {score:.3f}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
