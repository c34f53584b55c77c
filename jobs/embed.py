"""``reco embed SOURCE --store DIR``: CLIP-embed a corpus into a sharded store (resumable).

Arguments, the store and the model are checked before Ray starts (a mistake is one line, exit 2).
Exit status: 0 when every listed input is embedded or skipped as bad input; 3 when some inputs
failed transiently (I/O errors, timeouts, files missing on a node, after retries): they are not
committed, a WARNING names them, and rerunning the same command retries them. Another job
writing the same store is refused (exit 2, naming it).
"""

from __future__ import annotations

import logging
from typing import List, Optional

from .common import JobParser, add_cluster_args, parse_storage_options, positive_float, positive_int

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco embed", __doc__)
    p.add_argument("source", help="image folder, fsspec URL (s3://bucket/prefix) or Parquet file/folder")
    p.add_argument(
        "--store",
        required=True,
        help="embedding store directory or fsspec URL such as s3://bucket/store (created or resumed)",
    )
    p.add_argument("--kind", default="auto", choices=("auto", "folder", "parquet"))
    p.add_argument("--clip-model", required=True, help="open_clip model name or local-dir:PATH")
    p.add_argument("--clip-weights", help="local checkpoint file or open_clip pretrained tag")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="CLIP weights precision (auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs)",
    )
    p.add_argument("--shard-size", type=positive_int, default=10_000)
    p.add_argument(
        "--device-decode",
        action="store_true",
        help="decode JPEGs inside the embedding actors on their device (nvJPEG on GPUs)",
    )
    p.add_argument("--decode-cpus", type=positive_float, default=0.5, help="CPUs per decode task")
    add_cluster_args(p)
    args = p.parse_args(argv)

    from cluster.config import cluster_config_path, resolve_cluster_config
    from cluster.drivers import embed_job
    from cluster.models import EncoderSpec

    storage = parse_storage_options(args.storage_options)
    cluster = resolve_cluster_config(args.ray_config)
    logger.info("Ray settings: %s", cluster_config_path(args.ray_config) or "built-in defaults")
    encoders = EncoderSpec(clip_model=args.clip_model, clip_weights=args.clip_weights, clip_precision=args.precision)
    return embed_job(
        args.source,
        args.store,
        args.kind,
        encoders,
        cluster,
        args.shard_size,
        storage,
        args.decode_cpus,
        args.device_decode,
        vars(args),
    )
