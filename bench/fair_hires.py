# PYTHONPATH=$PWD .venv/bin/python bench/fair_hires.py SIZE  (after: python -m bench.fair_cache --size SIZE --splits val --skip-archives)
"""The CV-chosen configuration (reco-paper) on camvid-val with inference features at a larger
shorter side (val only: no CV at this resolution in time)."""

import json
import sys
import time

import torch

from bench.fair_cv import Cache, build, confusion_of, miou, row

size = int(sys.argv[1])
c = Cache()
feats = torch.load(f"/tmp/quality-cache/frames-val-{size}.pt")
bank_cfg, seg = row("paper")
bank = build(bank_cfg, c.archives("crops", range(len(c.ids["train"]))))
t0 = time.perf_counter()
m = miou(confusion_of(bank, seg, feats["feats"], c.masks["val"]))
print(
    json.dumps(
        {
            "size": size,
            "val": m[:2],
            "iou": m[2],
            "encoder_s_per_img": feats["seconds_per_image"],
            "score_s_per_img": (time.perf_counter() - t0) / 101,
        }
    )
)
