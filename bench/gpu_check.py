"""One-shot GPU check of the CUDA code paths (run on a machine with a GPU; CI never does).

    python -m bench.gpu_check [--out DIR] [--smoke]

Sections (each one is independent: a failure is recorded and the next one runs):

1. **Correctness on CUDA**: a concept bank built on the GPU under bf16 autocast (what the bank
   actors do with ``gpus_per_actor: 1``) against the same bank built on the CPU in float32, the
   Segmenter's labels on the GPU (bf16) against the CPU's, and MaskCLIP dense features on the GPU
   (bf16) against the CPU's. Random-init encoders of the real architectures (DINOv2 ViT-S/14,
   CLIP ViT-B/16): the check is numerics and code paths, not quality.
2. **Throughput** (bf16): the CLIP ViT-B/16 image tower alone (the embedding job's model; eager
   and ``torch.compile``), DINOv2 ViT-S/14 dense features at 224 and 448 px, the co-segmentation
   of one concept (k = 50) on the GPU, and one DeepLabV3+ ResNet-101 training step (batch 8, 320
   crops, Adam) at output stride 8 and 16 - the figures ``bench/README.md`` estimated from FLOPs.
3. **The ReCo+ training loop on the GPU** (``cluster.train.run_local``: the same loop Ray Train
   runs in each worker, bf16 autocast, pinned loader) on a learnable toy pseudo-label set.

Writes ``OUT/gpu.json`` and ``OUT/gpu.md`` (default ``bench/results``). ``--smoke`` runs every
section tiny on whatever device there is (to check the script itself on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], dev: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _images(n: int, size: int, seed: int) -> list:
    """Synthetic photos: smooth colour fields with a few blobs (real pixels are not needed here)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.float32)
        img = np.kron(base, np.ones((size // 4, size // 4, 1), np.float32))
        yy, xx = np.mgrid[:size, :size]
        for _ in range(3):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 10, size // 4))]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)))
    return out


def correctness(dev: torch.device, smoke: bool) -> Dict[str, Any]:
    from reco import BankConfig, ConceptBank, ConceptBuilder, Segmenter, SegmenterConfig
    from reco.encoders import create_clip, create_dense_encoder

    torch.manual_seed(0)
    kw = dict(embed_dim=32, depth=2, num_heads=2) if smoke else {}
    dense_cpu = create_dense_encoder("dinov2_vits14", None, **kw).eval()
    dense_gpu = create_dense_encoder("dinov2_vits14", None, **kw).eval()
    dense_gpu.load_state_dict(dense_cpu.state_dict())
    dense_gpu = dense_gpu.to(dev)
    k = 3 if smoke else 8
    archives = {f"c{i}": _images(k, 160, 10 + i) for i in range(4)}
    # region seeds, several prototypes and the threshold calibration exercise every device path
    cfg = BankConfig(
        image_size=112 if smoke else 224, k=k, seed_tokens=5, prototypes=2, calibration="archive-threshold"
    )
    bank_cpu = ConceptBank.build(archives, ConceptBuilder(dense_cpu, None, cfg))
    assert ConceptBuilder(dense_gpu, None, cfg).compute_device.type == dev.type  # co-segmentation on the GPU
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        bank_gpu = ConceptBank.build(archives, ConceptBuilder(dense_gpu, None, cfg))
    cos = F.cosine_similarity(bank_cpu.references, bank_gpu.references.cpu(), dim=1)
    seeds_same = np.mean(
        [
            bank_cpu.metadata["concepts"][n]["seed_index"] == bank_gpu.metadata["concepts"][n]["seed_index"]
            for n in archives
        ]
    )
    imgs = _images(3, 200, 99)
    scfg = SegmenterConfig(image_size=112 if smoke else 320)
    seg_cpu = Segmenter(bank_cpu, dense_cpu, None, scfg)
    seg_gpu = Segmenter(bank_gpu, dense_gpu, None, scfg)
    agree = []
    for im in imgs:
        a = seg_cpu(im)[0]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            b = seg_gpu(im)[0]
        agree.append(float((np.asarray(a.labels) == np.asarray(b.labels)).mean()))
        assert b.scores.dtype == torch.float32, b.scores.dtype  # scores leave autocast in float32
    ckw = (
        dict(
            embed_dim=64,
            vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=16, head_width=32),
            text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
        )
        if smoke
        else {}
    )
    if smoke:
        clip_cpu = None
    else:
        torch.manual_seed(1)
        clip_cpu = create_clip("ViT-B-16", None, device="cpu", **ckw)
    dense_clip = None
    if clip_cpu is not None:
        torch.manual_seed(1)
        clip_gpu = create_clip("ViT-B-16", None, device=dev, **ckw)
        clip_gpu.load_state_dict(clip_cpu.state_dict())
        x = torch.stack(
            [torch.from_numpy(np.asarray(im.resize((224, 224)))).permute(2, 0, 1).float() / 255 for im in imgs]
        )
        with torch.no_grad():
            d_cpu = clip_cpu.dense(clip_cpu.normalize(x))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                d_gpu = clip_gpu.dense(clip_gpu.normalize(x.to(dev))).float().cpu()
        dense_clip = {
            "shape": list(d_cpu.shape),
            "token_cosine_min": float(F.cosine_similarity(d_cpu, d_gpu, dim=1).min()),
            "token_cosine_mean": float(F.cosine_similarity(d_cpu, d_gpu, dim=1).mean()),
        }
    return {
        "reference_cosine_min": float(cos.min()),
        "reference_cosine_mean": float(cos.mean()),
        "seed_index_identical_share": float(seeds_same),
        "label_agreement_per_image": agree,
        "dense_clip": dense_clip,
    }


def throughput(dev: torch.device, smoke: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for part in (_clip_tower, _dinov2, _coseg, _deeplab):
        try:
            part(dev, smoke, out)
        except Exception as exc:  # one failing measurement must not hide the others
            out[f"{part.__name__[1:]}_error"] = f"{type(exc).__name__}: {exc}"[:400]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _clip_tower(dev: torch.device, smoke: bool, out: Dict[str, Any]) -> None:
    from reco.encoders import create_clip

    bs = 8 if smoke else 256
    # CLIP ViT-B/16 image tower alone, pure bf16 weights (the embed actor's "auto" precision on CUDA)
    clip = create_clip("ViT-B-16", None, device=dev).model.visual.eval()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    clip = clip.to(dtype)
    x = torch.randn(bs, 3, 224, 224, device=dev, dtype=dtype)
    with torch.no_grad():
        s = _timed(lambda: clip(x), dev, reps=3 if smoke else 10)
        out["clip_vitb16_tower_eager_img_s"] = bs / s
        if not smoke:
            try:
                comp = torch.compile(clip)
                t0 = time.perf_counter()
                comp(x)
                _sync(dev)
                out["clip_vitb16_compile_seconds"] = time.perf_counter() - t0
                s = _timed(lambda: comp(x), dev, reps=10)
                out["clip_vitb16_tower_compiled_img_s"] = bs / s
            except Exception as exc:  # compile is an optimisation: record why it did not run
                out["clip_vitb16_compile_error"] = f"{type(exc).__name__}: {exc}"[:400]


def _dinov2(dev: torch.device, smoke: bool, out: Dict[str, Any]) -> None:
    """DINOv2 ViT-S/14 dense features (bank building and segmentation)."""
    from reco.encoders import create_dense_encoder

    kw = dict(embed_dim=32, depth=2, num_heads=2) if smoke else {}
    dense = create_dense_encoder("dinov2_vits14", None, **kw).eval().to(dev)
    for size in (224, 448):
        b = 4 if smoke else 64
        xi = torch.randn(b, 3, size, size, device=dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            s = _timed(lambda: dense(xi), dev, reps=3 if smoke else 10)
        out[f"dinov2_vits14_{size}px_img_s"] = b / s


def _coseg(dev: torch.device, smoke: bool, out: Dict[str, Any]) -> None:
    """Co-segmentation of one concept, k = 50 archive images (float32, blockwise)."""
    from reco.coseg import cosegment

    for grid, block in ((16, 4096), (32, 4096)):
        k = 5 if smoke else 50
        feats = torch.randn(k, 384, grid, grid, device=dev)
        s = _timed(lambda: cosegment(feats, None, block, True), dev, warmup=1, reps=3)
        out[f"coseg_k{k}_{grid}x{grid}_tokens_s"] = s


def _deeplab(dev: torch.device, smoke: bool, out: Dict[str, Any]) -> None:
    """DeepLabV3+ ResNet-101 training step, batch 8, 320 crops, Adam, bf16 autocast."""
    import segmentation_models_pytorch as smp

    for os_ in (8, 16):
        model = (
            smp.DeepLabV3Plus(
                encoder_name="resnet18" if smoke else "resnet101",
                encoder_weights=None,
                encoder_output_stride=os_,
                classes=21,
            )
            .to(dev)
            .train()
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=2e-4)
        crop = 64 if smoke else 320
        xb = torch.randn(8, 3, crop, crop, device=dev)
        yb = torch.randint(0, 21, (8, crop, crop), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, ignore_index=255)
            loss.backward()
            opt.step()

        s = _timed(step, dev, warmup=3, reps=3 if smoke else 20)
        out[f"deeplabv3plus_r101_os{os_}_ms_per_step"] = 1000 * s
        out[f"deeplabv3plus_r101_os{os_}_img_s"] = 8 / s
        if dev.type == "cuda":
            out[f"deeplabv3plus_r101_os{os_}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()


def _toy_labels(root: Path, n: int) -> Path:
    """A learnable pseudo-label set in the `reco pseudo-label` layout: the label of a pixel is
    the index of its largest colour channel."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.pseudo_label import COLUMNS
    from index.labels import encode_labels

    out, imgs = root / "labels_out", root / "images"
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        blocks = rng.integers(0, 255, (12, 12, 3)).astype(np.uint8)
        arr = np.kron(blocks, np.ones((32, 32, 1), np.uint8))
        iid = f"{i:04d}.png"
        for p in (imgs / iid, out / "labels" / iid):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(imgs / iid)
        (out / "labels" / iid).write_bytes(encode_labels(arr.argmax(-1)))
        rows.append(
            {
                "id": iid,
                "uri": str(imgs / iid),
                "status": "ok",
                "error": "",
                "label": f"labels/{iid}",
                "confidence": "",
                "overlay": "",
                "width": arr.shape[1],
                "height": arr.shape[0],
                "classes": "[0, 1, 2]",
                "shares": "[]",
                "mean_confidence": 1.0,
                "seconds": 0.0,
            }
        )
    (out / "manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({c: [r.get(c, "") for r in rows] for c in COLUMNS}), out / "manifest" / "part-00000-00000000.parquet"
    )
    (out / "pseudo_label.json").write_text(json.dumps({"classes": ["r", "g", "b"], "config_hash": "toy"}))
    return out


def training_loop(dev: torch.device, smoke: bool) -> Dict[str, Any]:
    from cluster.train import TrainConfig, run_local

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    labels = _toy_labels(tmp, 8 if smoke else 32)
    iters = 6 if smoke else 200
    cfg = TrainConfig(
        encoder="resnet18" if smoke else "resnet50",
        iterations=iters,
        batch_size=8,
        crop_size=64 if smoke else 320,
        base_size=96 if smoke else 384,
        checkpoint_every=iters,
        log_every=max(1, iters // 10),
        num_workers=1,
        loader_workers=0 if smoke else 6,
        use_gpu=dev.type == "cuda",
        lr_head=1e-3,
        lr_encoder=1e-3,
    )
    t0 = time.perf_counter()
    state = run_local(str(labels), str(tmp / "run"), cfg)
    wall = time.perf_counter() - t0
    hist = state.get("history", [])
    return {
        "iterations": iters,
        "wall_s": wall,
        "attempt": (state.get("attempts") or [{}])[-1],
        "loss_first": hist[0]["loss"] if hist else None,
        "loss_last": hist[-1]["loss"] if hist else None,
        "train_seconds": state.get("train_seconds"),
        "steps_per_s": iters / state["train_seconds"] if state.get("train_seconds") else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    p.add_argument("--sections", default="correctness,throughput,training")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke to check the script on a CPU")
    res: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "smoke": args.smoke,
    }
    fns = {"correctness": correctness, "throughput": throughput, "training": training_loop}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            res[name] = fns[name](dev, args.smoke)
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        res[name]["section_seconds"] = time.perf_counter() - t0
        print(name, json.dumps(res[name], default=str)[:1500], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=2, default=str))
    lines = [f"# GPU check ({res['device']}, torch {res['torch']}{', SMOKE' if args.smoke else ''})", ""]
    for name in fns:
        if name in res:
            lines += [f"## {name}", "", "| key | value |", "|---|---|"]
            for k, v in res[name].items():
                if k != "traceback":
                    v = f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else v
                    lines.append(f"| {k} | {v} |")
            lines.append("")
    (out / "gpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
