"""``reco embed SOURCE --store DIR``: CLIP-embed a corpus into a sharded store (resumable).

Arguments, the store and the model are checked before Ray starts (a mistake is one line, exit 2).
Exit status: 0 when every listed input is embedded or skipped as bad input; 1 when more than
``jobs.max_failed_fraction`` of them were bad input (the report says failed); 3 when some inputs
failed transiently (I/O errors, timeouts, files missing on a node, after retries): they are not
committed, a WARNING names them, and rerunning the same command retries them. Another job
writing the same store is refused (exit 2, naming it).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

import yaml

from cluster.config import cluster_config_path, redact, resolve_cluster_config
from cluster.models import EncoderSpec
from cluster.report import write_job_report
from reco.config import to_dict
from reco.errors import ConfigError

logger = logging.getLogger(__name__)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-config", default=None,
                   help="per-stage Ray settings YAML (default: the repository's configs/cluster.yaml if present, "
                        "else built-in defaults); a file named here must exist. Not ray_config.yaml: that one is "
                        "the cluster-launcher config for `ray up`")
    p.add_argument("--storage-options", default="{}",
                   help='JSON fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; credentials come '
                        'from the environment / AWS chain (keys given here are redacted from every written config)')


def parse_storage_options(text: str) -> dict:
    try:
        opts = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from exc
    if not isinstance(opts, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return opts


#: exit status when some inputs failed transiently and a rerun should retry them
EXIT_RERUN = 3


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder, fsspec URL (s3://bucket/prefix) or Parquet file/folder")
    p.add_argument("--store", required=True,
                   help="embedding store directory or fsspec URL such as s3://bucket/store (created or resumed)")
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

    from cluster import runtime
    from cluster.embed import clip_dims, model_identity, run_embed
    from index.sources import RetryPolicy, list_source
    from index.store import EmbeddingStore

    # everything a user can get wrong is checked here, before Ray starts
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.decode_cpus <= 0:
        raise ConfigError(f"--decode-cpus must be > 0, got {args.decode_cpus}")
    storage = parse_storage_options(args.storage_options)
    cfg_path = cluster_config_path(args.ray_config)
    cluster = resolve_cluster_config(args.ray_config)
    logger.info("Ray settings: %s", cfg_path or "built-in defaults")
    retry = RetryPolicy.from_env()
    encoders = EncoderSpec(clip_model=args.clip_model, clip_weights=args.clip_weights, clip_precision=args.precision)
    _, dim = clip_dims(encoders)
    store = EmbeddingStore(args.store, storage_options=storage)
    store.check_location()
    store.check_compatible(model_identity(encoders), dim)
    with store.writer(job="embed"):  # a second job on this store is refused here, before listing and Ray
        items = list_source(args.source, args.kind, storage)
        if not items:
            raise FileNotFoundError(f"{args.source} holds no images")
        logger.info("%d images listed in %s", len(items), args.source)
        runtime.init_ray(cluster.ray)
        report = run_embed(items, store, encoders, cluster.embed, args.shard_size, storage, args.decode_cpus,
                           device_decode=args.device_decode, retry=retry)
        out = store.root  # a Path, or the store's URL
        report.report.configure(vars(args), cluster.jobs.max_failed_fraction)
        _write_text(out, "embed_report.json", json.dumps(report.as_dict(), indent=2), storage)
        write_job_report(report.report, str(out), storage)
        _write_text(out, "embed_config.yaml", yaml.safe_dump(redact(
            {"args": vars(args), "encoders": to_dict(encoders), "cluster": to_dict(cluster)}), sort_keys=False),
            storage)
    logger.info("embedded %d, skipped %d (reasons in %s), failed transiently %d, %d already in the store; "
                "%d shards committed; %.1f img/s; store now holds %d", report.embedded, len(report.skipped),
                _join(out, "skipped"), len(report.failed_transient), report.already_done,
                len(report.shards_committed), report.images_per_second, len(store))
    if report.failed_transient:
        logger.warning("%d input(s) failed transiently and were NOT committed (see failed_transient in %s): "
                       "rerun the same command to retry them", len(report.failed_transient),
                       _join(out, "embed_report.json"))
    return report.report.exit_code


def _join(root, name: str):
    return root / name if isinstance(root, Path) else f"{root}/{name}"


def _write_text(root, name: str, text: str, storage: dict) -> None:
    """A side file of the store (report, config): written in place locally, one PUT on an object store."""
    if isinstance(root, Path):
        (root / name).write_text(text)
        return
    from index.storage import write_bytes

    write_bytes(_join(root, name), text.encode(), storage)
