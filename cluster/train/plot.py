"""The loss / learning-rate curve of a run as a PNG (PIL: matplotlib is not a dependency)."""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence, Tuple


def render_curve(history: Sequence[Mapping[str, Any]], title: str = "training") -> bytes:
    """PNG bytes: loss over steps (top) and both learning rates over steps (bottom, log scale)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, gap, ph = 900, 640, 80, 20, 40, 60, 240
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((L, 12), title, fill="black", font=font)
    steps = [float(h["step"]) for h in history]
    panels = [
        (
            "loss (mean over the log window, all workers)",
            [("loss", [h["loss"] for h in history], (31, 119, 180))],
            False,
        ),
        (
            "learning rate (log scale)",
            [
                ("head", [h["lr_head"] for h in history], (214, 39, 40)),
                ("encoder", [h["lr_encoder"] for h in history], (44, 160, 44)),
            ],
            True,
        ),
    ]
    for i, (label, series, logy) in enumerate(panels):
        top = T + i * (ph + gap)
        box = (L, top, W - R, top + ph)
        draw.rectangle(box, outline="black")
        draw.text((L, top - 14), label, fill="black", font=font)
        if not steps:
            draw.text((L + 10, top + 10), "no steps logged", fill="black", font=font)
            continue

        def tf(v: float) -> float:
            return math.log10(v) if logy else v

        vals = [tf(v) for _, ys, _ in series for v in ys if v == v and (v > 0 or not logy)]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        x0, x1 = min(steps), max(steps)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1

        def px(s: float, v: float) -> Tuple[float, float]:
            return (L + (s - x0) / (x1 - x0) * (W - R - L), top + ph - (tf(v) - lo) / (hi - lo) * ph)

        for k in range(5):
            yv = lo + (hi - lo) * k / 4
            yy = top + ph - ph * k / 4
            draw.line((L - 4, yy, L, yy), fill="black")
            draw.text((4, yy - 6), f"{(10**yv if logy else yv):.3g}", fill="black", font=font)
            xv = round(x0 + (x1 - x0) * k / 4)  # integer steps, drawn where they are
            xx = px(xv, hi if not logy else 10**hi)[0]
            draw.line((xx, top + ph, xx, top + ph + 4), fill="black")
            draw.text((xx - 12, top + ph + 6), f"{xv:d}", fill="black", font=font)
        for j, (name, ys, colour) in enumerate(series):
            pts = [px(s, v) for s, v in zip(steps, ys) if v == v and (v > 0 or not logy)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            elif pts:
                draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
            draw.text((W - R - 120, top + 6 + 12 * j), name, fill=colour, font=font)
        draw.text(((L + W - R) // 2 - 10, top + ph + 20), "step", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
