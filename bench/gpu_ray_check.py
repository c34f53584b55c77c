"""The Ray code paths on a GPU machine (run there; CI never does).

    python -m bench.gpu_ray_check [--out DIR]

1. ``reco train`` on Ray Train with ``use_gpu``: ScalingConfig(use_gpu=True), the NCCL backend,
   DDP through ``prepare_model`` (one GPU here, so world size 1), bf16 autocast, checkpoints,
   export; the exported model reloads and predicts.
2. The bank job with a GPU actor (``gpus_per_actor: 1``): the actor encodes and co-segments on
   its GPU under bf16 autocast; compared with the same bank built in this process on the CPU.
3. The embedding job with a GPU CLIP actor (pure bf16 weights): images/s inside the actor and
   through the whole pipeline.
Random-init encoders of the real architectures: code paths and speed, not quality.
Writes ``OUT/gpu_ray.json`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F

from bench.gpu_check import _images, _toy_labels

ROOT = Path(__file__).resolve().parents[1]
#: --cpu-dry-run: the same code on this CPU, tiny, to check the script before a GPU run
DRY = {"on": False}


def _gpu() -> float:
    return 0.0 if DRY["on"] else 1.0


def train_on_ray(tmp: Path) -> Dict[str, Any]:
    from cluster.train import TrainConfig, execute_training, plan_training
    from index.outputs import load_segmodel

    labels = _toy_labels(tmp / "toy", 32)
    dry = DRY["on"]
    cfg = TrainConfig(
        encoder="resnet18" if dry else "resnet50",
        iterations=4 if dry else 120,
        batch_size=8,
        crop_size=64 if dry else 320,
        base_size=96 if dry else 384,
        checkpoint_every=2 if dry else 60,
        log_every=2 if dry else 20,
        num_workers=1,
        use_gpu=not dry,
        loader_workers=0 if dry else 6,
        cpus_per_worker=1 if dry else 8,
        lr_head=1e-3,
        lr_encoder=1e-3,
    )
    t0 = time.perf_counter()
    res = execute_training(plan_training(str(labels), str(tmp / "runs"), "gpu", cfg))
    wall = time.perf_counter() - t0
    rep = res.report
    model = load_segmodel(res.run_uri, device="cpu" if DRY["on"] else "cuda")
    lab, names = model.predict(_images(1, 200, 5)[0])
    return {
        "wall_s": wall,
        "attempts": rep["attempts"],
        "steps": rep["steps"],
        "throughput": rep["throughput"],
        "loss_first": rep["history"][0]["loss"],
        "loss_last": rep["history"][-1]["loss"],
        "checkpoints": [c["name"] for c in rep["checkpoints"]],
        "predict_shape": list(lab.shape),
        "classes": list(names),
    }


def bank_on_gpu_actor(tmp: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file

    from cluster.bank_job import ConceptTask, run_build_bank
    from cluster.config import ActorConfig
    from cluster.models import EncoderSpec
    from reco import BankConfig, ConceptBank, ConceptBuilder
    from reco.encoders import create_dense_encoder

    torch.manual_seed(0)
    kw = dict(embed_dim=32, depth=2, num_heads=2) if DRY["on"] else {}
    dense = create_dense_encoder("dinov2_vits14", None, **kw).eval()
    wpath = tmp / "dinov2_random.safetensors"
    save_file({k: v.contiguous() for k, v in dense.model.state_dict().items()}, str(wpath))
    tasks, archives = [], {}
    for i in range(6):
        d = tmp / "ex" / f"c{i}"
        d.mkdir(parents=True)
        ims = _images(8, 200, 30 + i)
        for j, im in enumerate(ims):
            im.save(d / f"{j}.png")
        tasks.append(ConceptTask(f"c{i}", tuple(str(d / f"{j}.png") for j in range(len(ims)))))
        archives[f"c{i}"] = ims
    cfg = BankConfig(image_size=224, k=8)
    t0 = time.perf_counter()
    bank, rep = run_build_bank(
        tasks,
        EncoderSpec("dinov2_vits14", str(wpath), dense_kwargs=kw),
        cfg,
        str(tmp / "bank"),
        ActorConfig(num_actors=1, cpus_per_actor=1 if DRY["on"] else 4, gpus_per_actor=_gpu()),
    )
    wall = time.perf_counter() - t0
    local = ConceptBank.build(
        archives, ConceptBuilder(create_dense_encoder("dinov2_vits14", str(wpath), **kw), None, cfg)
    )
    cos = F.cosine_similarity(bank.references, local.references, dim=1)
    return {
        "wall_s": wall,
        "built": rep.built,
        "reference_cosine_min_vs_cpu": float(cos.min()),
        "build_order": bank.metadata.get("build_order"),
        "actor_peak_rss_mb": rep.actor_peak_rss_mb,
    }


def embed_on_gpu_actor(tmp: Path, n: int = 2000) -> Dict[str, Any]:
    n = 16 if DRY["on"] else n
    from cluster.config import ActorConfig
    from cluster.embed import run_embed
    from cluster.models import EncoderSpec
    from index.sources import list_folder
    from index.store import EmbeddingStore

    src = tmp / "corpus"
    src.mkdir()
    base = _images(50, 256, 77)
    for i in range(n):
        base[i % len(base)].save(src / f"{i:05d}.jpg", quality=90)
    items = list_folder(str(src))
    store = EmbeddingStore(tmp / "store")
    t0 = time.perf_counter()
    rep = run_embed(
        items,
        store,
        EncoderSpec(clip_model="ViT-B-16", clip_weights=None),
        ActorConfig(
            num_actors=1,
            cpus_per_actor=1 if DRY["on"] else 2,
            gpus_per_actor=_gpu(),
            batch_size=8 if DRY["on"] else 256,
        ),
        1000,
        None,
        1.0,
    )
    wall = time.perf_counter() - t0
    d = rep.as_dict()
    return {
        "wall_s": wall,
        "images": n,
        "embedded": d["embedded"],
        "images_per_second": d["images_per_second"],
        "steady_images_per_second": d.get("steady_images_per_second"),
        "model_seconds_per_image": d.get("model_seconds_per_image"),
        "decode_seconds_per_image": d.get("decode_seconds_per_image"),
        "batch_sizes": d.get("batch_sizes"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--sections", default="train,bank,embed")
    p.add_argument("--cpu-dry-run", action="store_true")
    args = p.parse_args()
    DRY["on"] = args.cpu_dry_run
    from cluster.config import RayRuntimeConfig
    from cluster.runtime import init_ray

    if DRY["on"]:
        init_ray(RayRuntimeConfig(num_cpus=2, object_store_memory_mb=512))
    else:
        init_ray(RayRuntimeConfig(num_cpus=14, num_gpus=1, object_store_memory_mb=8192))
    res: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "dry_run": DRY["on"],
    }
    fns = {"train": train_on_ray, "bank": bank_on_gpu_actor, "embed": embed_on_gpu_actor}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            res[name] = fns[name](Path(tempfile.mkdtemp(prefix=f"gpu_ray_{name}_")))
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        res[name]["section_seconds"] = time.perf_counter() - t0
        print(name, json.dumps(res[name], default=str)[:3000], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_ray.json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
