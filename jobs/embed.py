"""``reco embed SOURCE --store DIR``: CLIP-embed a corpus into a sharded store (resumable)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

import yaml

from cluster.config import load_cluster_config
from cluster.models import EncoderSpec
from reco.config import to_dict
from reco.errors import ConfigError

logger = logging.getLogger(__name__)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-config", default="ray_config.yaml", help="Ray settings (missing file: defaults)")
    p.add_argument("--storage-options", default="{}",
                   help='JSON fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000", "key": "..", "secret": ".."}\'')


def parse_storage_options(text: str) -> dict:
    try:
        opts = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from exc
    if not isinstance(opts, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco embed", description=__doc__)
    p.add_argument("source", help="image folder, fsspec URL (s3://bucket/prefix) or Parquet file/folder")
    p.add_argument("--store", required=True, help="embedding store directory (created or resumed)")
    p.add_argument("--kind", default="auto", choices=("auto", "folder", "parquet"))
    p.add_argument("--clip-model", required=True, help="open_clip model name or local-dir:PATH")
    p.add_argument("--clip-weights", help="local checkpoint file or open_clip pretrained tag")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="CLIP weights precision (auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs)")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--device-decode", action="store_true",
                   help="decode JPEGs inside the embedding actors on their device (nvJPEG on GPUs)")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per decode task")
    add_cluster_args(p)
    args = p.parse_args(argv)

    from cluster.embed import run_embed
    from cluster.runtime import init_ray
    from index.sources import list_source
    from index.store import EmbeddingStore

    storage = parse_storage_options(args.storage_options)
    cfg_path = Path(args.ray_config)
    cluster = load_cluster_config(cfg_path if cfg_path.is_file() else None)
    encoders = EncoderSpec(clip_model=args.clip_model, clip_weights=args.clip_weights, clip_precision=args.precision)
    items = list_source(args.source, args.kind, storage)
    if not items:
        raise FileNotFoundError(f"{args.source} holds no images")
    logger.info("%d images listed in %s", len(items), args.source)
    init_ray(cluster.ray)
    store = EmbeddingStore(args.store)
    report = run_embed(items, store, encoders, cluster.embed, args.shard_size, storage, args.decode_cpus,
                       device_decode=args.device_decode)
    out = Path(args.store)
    (out / "embed_report.json").write_text(json.dumps(report.as_dict(), indent=2))
    (out / "embed_config.yaml").write_text(yaml.safe_dump(
        {"args": vars(args), "encoders": to_dict(encoders), "cluster": to_dict(cluster)}, sort_keys=False))
    logger.info("embedded %d, skipped %d (reasons in %s), %d already in the store; %d shards committed; "
                "%.1f img/s; store now holds %d", report.embedded, len(report.skipped), out / "skipped",
                report.already_done, len(report.shards_committed), report.images_per_second, len(store))
    return 0
