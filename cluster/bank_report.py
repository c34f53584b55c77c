"""The archive browser of a bank (``reco show-bank``, ``reco build-bank --report``): one HTML page
to see why each concept works or fails: status, reason, seconds, archive size, mean seed score, and
per concept its archive thumbnails as the co-segmentation saw them (centre crops at the bank's image
size) with the seed token marked and, where the bank stored them, the score heat-map overlaid."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from reco.errors import ConfigError

THUMB = 112


def _heat(scores: np.ndarray, size: int) -> np.ndarray:
    """(h, w) scores -> (size, size, 3) uint8 colour map (blue = low, red = high), min-max scaled."""
    from PIL import Image

    s = scores.astype(np.float32)
    s = (s - s.min()) / max(float(s.max() - s.min()), 1e-6)
    up = np.asarray(Image.fromarray((s * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)) / 255.0
    rgb = np.stack(
        [
            np.clip(1.5 - abs(4 * up - 3), 0, 1),
            np.clip(1.5 - abs(4 * up - 2), 0, 1),
            np.clip(1.5 - abs(4 * up - 1), 0, 1),
        ],
        axis=-1,
    )
    return (rgb * 255).astype(np.uint8)


def thumbnail(image, image_size: int, grid: Sequence[int], seed: Optional[int], scores: Optional[np.ndarray] = None):
    """The archive image as co-segmented (centre crop), the heat-map blended in, the seed ringed."""
    from PIL import Image, ImageDraw

    from reco.image import resize_center_crop

    crop = resize_center_crop(image, image_size)  # (3, S, S) in [0, 1], exactly the builder's input
    img = Image.fromarray((crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize((THUMB, THUMB))
    if scores is not None and scores.size:
        img = Image.blend(img, Image.fromarray(_heat(scores, THUMB)), 0.45)
    if seed is not None and seed >= 0 and grid and grid[0] > 0:
        h, w = int(grid[0]), int(grid[1])
        cy, cx = (seed // w + 0.5) * THUMB / h, (seed % w + 0.5) * THUMB / w
        r = max(4, THUMB // (2 * max(h, w)) + 3)
        draw = ImageDraw.Draw(img)
        for width, colour in ((4, (0, 0, 0)), (2, (255, 255, 0))):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    return img


def write_report(
    bank_uri: str, out_dir: Optional[str] = None, max_images: int = 12, storage_options: Optional[Dict[str, Any]] = None
) -> Path:
    """Write the browser page for the bank at ``bank_uri`` (built by ``reco build-bank``)."""
    import io

    import pyarrow.parquet as pq

    from index.readers import read_image
    from index.storage import is_url, join, local_path, read_bytes

    rows: List[Dict[str, Any]] = pq.read_table(
        io.BytesIO(read_bytes(join(bank_uri, "concepts.parquet"), storage_options))
    ).to_pylist()
    build = json.loads(read_bytes(join(bank_uri, "build.json"), storage_options))
    heat = _heatmaps(bank_uri, storage_options)
    image_size = int(build.get("bank", {}).get("image_size", 224))
    if out_dir is None:
        if is_url(bank_uri):
            raise ConfigError("give --out (a local folder) for a bank in an object store")
        out_dir = str(local_path(bank_uri) / "report")
    out = Path(out_dir)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    sections, index = [], []
    for n, r in enumerate(rows):
        cid = f"c{n:05d}"
        seeds = list(r.get("seed_index") or [])
        scores = list(r.get("seed_scores") or [])
        figs = []
        maps = heat.get(f"{r['kind']}:{r['name']}")
        for i, uri in enumerate(list(r.get("archive") or [])[:max_images]):
            try:
                img = read_image(uri, storage_options)
            except Exception as exc:  # noqa: BLE001 - a page must not fail on one unreadable image
                figs.append(
                    f"<figure class='bad'><figcaption>{html.escape(Path(uri).name)}: "
                    f"{html.escape(str(exc))[:120]}</figcaption></figure>"
                )
                continue
            m = maps[i] if maps is not None and i < len(maps) else None
            t = thumbnail(img, image_size, r.get("grid") or [0, 0], seeds[i] if i < len(seeds) else None, m)
            name = f"thumbs/{cid}_{i:03d}.jpg"
            t.save(out / name, quality=85)
            cap = f"{html.escape(Path(uri).name)}" + (f" &middot; seed {scores[i]:.3f}" if i < len(scores) else "")
            figs.append(
                f"<figure><img src='{name}' loading='lazy' width='{THUMB}' height='{THUMB}'>"
                f"<figcaption>{cap}</figcaption></figure>"
            )
        mean = f"{np.mean(scores):.3f}" if scores else "-"
        status = html.escape(r["status"]) + (f": {html.escape(r['error'])}" if r.get("error") else "")
        flags = []
        if r.get("language_guidance"):
            flags.append("language guidance")
        if r.get("context_eliminated"):
            flags.append("context eliminated: " + ", ".join(r["context_eliminated"]))
        if r.get("reused_context_reference"):
            flags.append("reuses its context reference")
        sections.append(
            f"<section id='{cid}' data-name='{html.escape(r['name'].lower())}' class='{html.escape(r['status'])}'>"
            f"<h2>{html.escape(r['name'])} <small>({html.escape(r['kind'])})</small></h2>"
            f"<p>status <b>{status}</b> &middot; archive {len(r.get('archive') or [])}/{r.get('requested', '?')} "
            f"images ({html.escape(str(r.get('source', '')))}) &middot; mean seed score {mean} &middot; "
            f"{float(r.get('seconds') or 0):.2f} s{(' &middot; ' + html.escape('; '.join(flags))) if flags else ''}</p>"
            f"<div class='grid'>{''.join(figs)}</div></section>"
        )
        index.append(
            f"<li data-name='{html.escape(r['name'].lower())}' class='{html.escape(r['status'])}'>"
            f"<a href='#{cid}'>{html.escape(r['name'])}</a> <small>{html.escape(r['status'])} {mean}</small></li>"
        )
    ok = sum(1 for r in rows if r["status"] == "ok")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>concept bank {html.escape(bank_uri)}</title>
<style>body{{font-family:sans-serif;margin:1em 2em}} nav{{float:left;width:16em;max-height:92vh;overflow:auto;position:sticky;top:0}}
main{{margin-left:17em}} .grid{{display:flex;flex-wrap:wrap;gap:6px}} figure{{margin:0;width:{THUMB}px;font-size:10px}}
.failed h2,.failed a{{color:#b00}} li small{{color:#666}} section{{border-top:1px solid #ccc;padding:4px 0}}</style></head>
<body><nav><input id="q" placeholder="search concepts" autofocus><p>{ok} ok / {len(rows)} concepts
(config {html.escape(str(build.get("config_hash")))})</p><ul id="list">{"".join(index)}</ul></nav>
<main><h1>Concept bank {html.escape(bank_uri)}</h1>
<p>Thumbnails are the centre crops the co-segmentation saw; the ring marks each image's seed token, the colour
map (where stored) its co-segmentation score (blue low, red high). A concept whose seeds sit on background
(sky, road, grass) has a reference that will match background.</p>{"".join(sections)}</main>
<script>document.getElementById('q').addEventListener('input',e=>{{const q=e.target.value.toLowerCase();
document.querySelectorAll('[data-name]').forEach(el=>{{el.style.display=el.dataset.name.includes(q)?'':'none'}});}});</script>
</body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _heatmaps(bank_uri: str, storage_options) -> Dict[str, np.ndarray]:
    """{kind:name: (k, h, w) co-segmentation scores} from the bank's parts, where stored."""
    from index.storage import join, list_files, read_bytes
    from reco.bank import safetensors_metadata

    from .bank_parts import _HEADER, PARTS_DIR

    out: Dict[str, np.ndarray] = {}
    for part in list_files(join(bank_uri, PARTS_DIR), storage_options, suffix=".safetensors"):
        from safetensors.torch import load

        data = read_bytes(part, storage_options)
        rows = json.loads(safetensors_metadata(data)[_HEADER])
        tensors = load(data)
        for r in rows:
            key = f"{r['kind']}:{r['name']}"
            t = tensors.get(f"scores/{key}")
            if t is not None:
                out[key] = t.float().numpy()
    return out
