"""``reco build-index`` after its arguments are parsed: checks, then the index built in one process
(:func:`index.catalog.build_index_dir`) or by Ray tasks in parts (:mod:`cluster.index_build`)."""

from __future__ import annotations

import logging
from pathlib import Path

from reco.errors import ConfigError

logger = logging.getLogger(__name__)


def _check_args(args) -> None:
    """Validate everything that can be checked without building: raises ConfigError / FileNotFoundError."""
    from index.storage import is_url

    if not is_url(args.store):  # a URL store is checked through its manifest in main
        store = Path(args.store)
        if not store.exists():
            raise FileNotFoundError(f"--store {store}: no such directory (run `reco embed` to create a store)")
        if not store.is_dir():
            raise ConfigError(f"--store {store} is a file, not an embedding store directory")
    if args.index and not is_url(args.index) and Path(args.index).exists() and not Path(args.index).is_dir():
        raise ConfigError(f"--index {args.index} is a file, not a directory")


def build_index_job(args, storage: dict) -> int:
    """Build (or ``--update``) the index ``args`` of ``reco build-index`` describe; the exit code."""
    _check_args(args)

    from index.catalog import build_index_dir
    from index.faiss_index import choose_factory, validate_factory
    from index.index_files import read_text_queries
    from index.store import EmbeddingStore, StoreError

    store = EmbeddingStore(args.store, storage_options=storage)
    try:
        present = store.exists
    except OSError as exc:  # an object store that cannot be reached
        raise ConfigError(f"--store {args.store}: {exc}") from None
    if not present:
        raise ConfigError(f"--store {args.store} is not an embedding store (no manifest.json): run `reco embed` first")
    try:
        n, dim = len(store), store.dim
    except (StoreError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--store {args.store}: {exc}") from None
    if n == 0:
        raise ConfigError(f"--store {args.store} holds no embeddings: run `reco embed` first")
    budget = int(args.memory_budget_gb * 2**30)
    text = read_text_queries(args.text_queries, dim, storage) if args.text_queries else None
    if args.update and args.factory:
        raise ConfigError("--update keeps the factory of the build it updates: drop --factory")
    if args.update or args.layout or args.parts:
        return _build_in_parts(args, store, budget, storage, text)
    if args.factory:
        validate_factory(args.factory, dim)
    else:
        try:
            choose_factory(n, dim, budget)
        except ValueError as exc:
            raise ConfigError(f"--memory-budget-gb {args.memory_budget_gb}: {exc}") from None

    from index.storage import join

    out = args.index or join(args.store, "index")
    rep = build_index_dir(
        store,
        out,
        args.factory,
        budget,
        args.target_recall,
        allow_low_recall=args.allow_low_recall,
        num_queries=args.num_queries,
        train_size=args.train_size,
        storage_options=storage,
        text_queries=text,
        max_nprobe=args.max_nprobe,
    )
    logger.info(
        "index %s over %d vectors: recall@1 %.3f, recall@%d %.3f on %d evaluation queries (vs exact; search params "
        "%s tuned on %d other queries; target %.2f %s); batched search %.3f ms/query (%.0f queries/s); single-query "
        "latency %.2f ms median, %.2f ms p95 (%d searches); %.1f MB, built in %.1f s -> %s",
        rep.factory,
        rep.n,
        rep.recall_at_1,
        rep.k,
        rep.recall_at_10,
        rep.queries,
        rep.search_params or "{}",
        rep.tune_queries,
        rep.target_recall,
        "met" if rep.target_met else "NOT met",
        rep.batched_ms_per_query,
        rep.batched_qps,
        rep.single_query_ms,
        rep.single_query_p95_ms,
        rep.single_queries,
        rep.index_bytes / 2**20,
        rep.build_seconds,
        out,
    )
    from cluster.report import job_report, peak_memory, write_job_report

    write_job_report(
        job_report(
            "build-index",
            unit="vectors",
            config=vars(args),
            seen=n,
            processed=rep.n,
            seconds=rep.build_seconds,
            stages={"build (train, add, tune, evaluate)": (rep.build_seconds, rep.n)},
            memory={"driver (index build)": peak_memory()},
            extra={
                "factory": rep.factory,
                "recall_at_1": rep.recall_at_1,
                f"recall_at_{rep.k}": rep.recall_at_10,
                "target_met": rep.target_met,
                "index_bytes": rep.index_bytes,
            },
        ),
        out,
        storage,
    )
    return 0


def _build_in_parts(args, store, budget: int, storage, text=None) -> int:
    """``--parts`` / ``--update``: the index built (or updated) by Ray tasks in parts."""
    from dataclasses import replace

    from cluster.config import resolve_cluster_config
    from cluster.index_build import build_index_parts
    from cluster.runtime import init_ray
    from index.faiss_index import validate_factory
    from index.parts import check_partable
    from index.storage import join

    cluster = resolve_cluster_config(args.ray_config)
    cfg = cluster.index if not args.layout else replace(cluster.index, layout=args.layout)
    if args.factory:
        validate_factory(args.factory, store.dim)
        check_partable(args.factory, cfg.layout)
    out = args.index or join(args.store, "index")
    init_ray(cluster.ray)
    rep = build_index_parts(
        store,
        out,
        args.factory,
        budget,
        args.target_recall,
        args.allow_low_recall,
        args.num_queries,
        args.train_size,
        cfg=cfg,
        storage_options=storage,
        update=args.update,
        text_queries=text,
        job_config=vars(args),
        max_nprobe=args.max_nprobe,
    )
    logger.info(
        "index %s over %d vectors in parts (%s): recall@%d %.3f (params %s), %.1f MB, %.1f s -> %s",
        rep.factory,
        rep.n,
        cfg.layout,
        rep.k,
        rep.recall_at_10,
        rep.search_params or "{}",
        rep.index_bytes / 2**20,
        rep.build_seconds,
        out,
    )
    return 0
