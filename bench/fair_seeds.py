"""Where do the seeds land? The default bank's first concepts on the fair crop archives (all of
camvid-train), each seed token mapped back to its crop window's ground truth (for diagnosis only:
the bank never sees masks).

    PYTHONPATH=$PWD .venv/bin/python -m bench.fair_seeds [--order-config default|ownership]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace

from bench.fair_cv import CLASSES, Cache, build
from reco.config import BankConfig
from reco.protocols import make_archives


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--names", default="sky,building,pole,road")
    p.add_argument("--order", default="archive-size")
    a = p.parse_args()
    cache = Cache()
    ids, masks = cache.ids["train"], cache.masks["train"]
    sel = make_archives("crops", ids, masks, CLASSES)
    names = a.names.split(",")
    feats = cache.archives("crops", range(len(ids)))
    bank = build(replace(BankConfig(), context_order=a.order), {n: feats[n] for n in names})
    out = {"build_order": bank.metadata["build_order"]}
    for n in names:
        seeds = bank.metadata["concepts"][n]["seed_index"]
        labels = Counter()
        for e, s in zip(sel[n], seeds):
            x0, y0, x1, y1 = e.box
            window = masks[e.index][y0:y1, x0:x1]
            r, c = divmod(int(s), 16)  # 16x16 tokens of the 224 px centre crop of the (square) window
            cy = int((r + 0.5) * window.shape[0] / 16)
            cx = int((c + 0.5) * window.shape[1] / 16)
            v = int(window[cy, cx])
            labels[CLASSES[v] if v < len(CLASSES) else "void"] += 1
        out[n] = dict(labels.most_common())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
