"""A FAISS index built by Ray tasks in parts (#17.2) and updated with new store shards (#17.6).

1. One task (``index.train_cpus`` CPUs) trains the empty index (OPQ/IVF/PQ, and refine codes) on
   a random sample of store rows; the driver writes it once (``trained.faiss``) under the index URI.
2. Part tasks (``index.workers`` in flight, ``index.cpus_per_task`` each) fill copies of that
   trained index from whole store shards (``index.part_rows`` rows a part, ids = store rows) and
   create their part exactly once (:meth:`index.output.Parts.create`: a retried task, or a rerun
   after a crash, never writes a part twice and redoes only the missing ones).
3. The driver then merges the parts in order (``index.layout``): ``merged`` (``merge_from``, one
   index in RAM), ``ondisk`` (:func:`faiss.contrib.ondisk.merge_ondisk` into ``index.ivfdata``,
   inverted lists memory-mapped; local index folders), or ``shards`` (kept; searched by
   :mod:`cluster.index_serve`). Search parameters are tuned and recall reported as for the
   one-process build (:func:`index.faiss_index.evaluate_index`).

``update=True`` adds the shards committed since the build as new parts with the same trained
quantiser; an index whose indexed shards were removed or replaced in the store must be rebuilt.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from index import parts as P
from index.faiss_factory import choose_factory
from index.faiss_index import (
    INDEX_FILE,
    META_FILE,
    IndexReport,
    evaluate_index,
    save_index,
    store_refined,
)
from index.output import ResumableOutput
from index.report import JobReport
from index.store import EmbeddingStore, ShardRecord
from index.vectors import VectorSource
from reco.errors import ConfigError

from . import faults
from .index_config import IndexClusterConfig
from .report import job_report, peak_memory, reset_peak_memory

logger = logging.getLogger(__name__)

IVFDATA_FILE = "index.ivfdata"


def _store_root(store: EmbeddingStore) -> str:
    return store.root if store.is_url else str(Path(store.root).resolve())


def _open_store(root: str, storage_options: Dict[str, Any]) -> EmbeddingStore:
    return EmbeddingStore(root, storage_options=storage_options)


def _shard(d: Dict[str, Any]) -> ShardRecord:
    return ShardRecord(int(d["index"]), int(d["count"]), int(d.get("skipped", 0)), str(d.get("token", "")))


def _faiss_threads(cpus: float) -> None:
    """As many FAISS (OpenMP) threads as the task holds CPUs: a reused Ray worker keeps the thread
    count of the first task it ran otherwise."""
    from index.faiss_factory import _faiss

    _faiss().omp_set_num_threads(max(1, int(cpus)))


def _train_task(
    root: str,
    storage_options: Dict[str, Any],
    shards: List[Dict[str, Any]],
    factory: str,
    sample_rows: np.ndarray,
    cpus: float = 1.0,
    gpu: bool = False,
) -> Tuple[bytes, Optional[bytes], float, int]:
    t = time.perf_counter()
    reset_peak_memory()  # a reused worker: this task's peak, not the worker's lifetime one
    _faiss_threads(cpus)
    store = _open_store(root, storage_options)
    source = VectorSource.from_store(store, [_shard(s) for s in shards])
    base, refine = P.train_empty(source, factory, sample_rows, gpu=gpu)
    trained = P.to_bytes(base), (P.to_bytes(refine) if refine is not None else None)
    return trained[0], trained[1], time.perf_counter() - t, peak_memory()["rss"]


def _part_task(
    root: str,
    storage_options: Dict[str, Any],
    plan: P.PartPlan,
    trained: bytes,
    trained_refine: Optional[bytes],
    parts,
    cpus: float = 1.0,
    gpu: bool = False,
) -> Dict[str, Any]:
    """Fill one part and create its file(s) exactly once (``parts``: :class:`index.output.Parts`)."""
    t = time.perf_counter()
    reset_peak_memory()  # Ray reuses workers: the peak below is this part's (see index.report)
    _faiss_threads(cpus)
    faults.fire("index.part", plan.name)
    store = _open_store(root, storage_options)
    source = VectorSource.from_store(store, [_shard(s) for s in plan.shards])
    base, refine = P.fill_part(trained, trained_refine, source, plan.first_row, gpu=gpu)
    assert base.ntotal == plan.rows, (plan.name, base.ntotal, plan.rows)
    data = P.to_bytes(base)
    written = True
    if refine is not None:  # the refine codes first: a part whose base file exists is complete
        parts.create(plan.name + ".refine", P.to_bytes(refine))
    written = parts.create(plan.name, data)
    return {
        "name": plan.name,
        "rows": plan.rows,
        "bytes": len(data),
        "written": written,
        "seconds": time.perf_counter() - t,
        # this task's high-water mark: set by part_rows (one part in RAM), not by the corpus
        "peak_rss": peak_memory()["rss"],
    }


def _covered(factory: str, dim: int, train_size: int, seed: int, root: str, part_rows: int) -> Dict[str, Any]:
    return {
        "factory": factory,
        "dim": dim,
        "train_size": train_size,
        "seed": seed,
        "store": root,
        "part_rows": part_rows,
    }


def _indexed_shards(meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [s for p in meta.get("parts", []) for s in p["shards"]]


def check_update(store_shards: Sequence[ShardRecord], meta: Dict[str, Any]) -> List[ShardRecord]:
    """The store shards the index lacks; :class:`ConfigError` (one line) when an indexed shard was
    removed or replaced in the store (its rows would be stale: rebuild)."""
    current = {(s.index, s.token): s for s in store_shards}
    gone = [
        f"{d['index']:05d}.{d.get('token', '')}"
        for d in _indexed_shards(meta)
        if (int(d["index"]), str(d.get("token", ""))) not in current
    ]
    if gone:
        raise ConfigError(
            f"the store's indexed shards {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''} were "
            "removed or replaced since the index was built: rebuild it (reco build-index without --update)"
        )
    have = {(int(d["index"]), str(d.get("token", ""))) for d in _indexed_shards(meta)}
    return [s for s in store_shards if (s.index, s.token) not in have and s.count]


def _read_meta(uri: str, storage_options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    from index import storage

    try:
        return json.loads(storage.read_bytes(storage.join(uri, META_FILE), storage_options))
    except FileNotFoundError:
        return None


def build_index_parts(
    store: EmbeddingStore,
    out: str,
    factory: Optional[str] = None,
    memory_budget_bytes: int = 8 << 30,
    target_recall: float = 0.95,
    allow_low_recall: bool = False,
    num_queries: int = 1000,
    train_size: Optional[int] = None,
    seed: int = 0,
    cfg: IndexClusterConfig = IndexClusterConfig(),
    storage_options: Optional[Dict[str, Any]] = None,
    update: bool = False,
    text_queries: Optional[np.ndarray] = None,
    job_config: Optional[Dict[str, Any]] = None,
    max_nprobe: Optional[int] = None,
) -> IndexReport:
    """Build (or ``update``) the index at ``out`` from ``store`` with Ray tasks; returns the report
    also written to ``index.json``; the uniform job report (config ``job_config``) is written
    beside it (``job_report.json``). Ray must be initialised."""
    import ray

    from index.catalog import write_rows_table
    from index.faiss_index import default_train_size

    so = dict(storage_options or {})
    t0 = time.perf_counter()
    shards = [s for s in store.shards]
    n, dim, root = sum(s.count for s in shards), store.dim, _store_root(store)
    if n == 0:
        raise ValueError(f"{root} holds no embeddings: run `reco embed` first")
    old = _read_meta(out, so) if update else None
    if update:
        if old is None or "parts" not in old:
            raise ConfigError(
                f"--update: {out} holds no index built in parts: build it first (reco build-index --parts)"
            )
        new = check_update(shards, old)
        cov = {k: old["build"][k] for k in ("factory", "dim", "train_size", "seed", "store", "part_rows")}
        if cov["store"] != root:
            raise ConfigError(f"--update: {out} indexes the store {cov['store']}, not {root}")
        factory, ts, part_rows = cov["factory"], cov["train_size"], cov["part_rows"]
        plans = [P.PartPlan(**{**p, "shards": tuple(p["shards"])}) for p in old["parts"]]
        n_old = sum(p.rows for p in plans)
        plans += P.plan_parts(new, part_rows, first_row=n_old)
        logger.info("--update: %d new shard(s), %d new rows, over %d indexed rows", len(new), n - n_old, n_old)
        if not new:
            logger.info("--update: the index already holds every committed shard of %s", root)
    else:
        factory = factory or P.partable_factory(choose_factory(n, dim, memory_budget_bytes), n)
        ts = int(min(n, train_size or default_train_size(n, factory)))
        part_rows = cfg.part_rows
        cov = _covered(factory, dim, ts, seed, root, part_rows)
        plans = P.plan_parts(shards, part_rows)
    layout = cfg.layout if not update else old.get("layout", cfg.layout)  # --update keeps the index's layout
    P.check_partable(factory, layout)
    small = P.small_fast_scan_parts(factory, layout, plans)
    if small:
        logger.warning("%s", small)
    output = ResumableOutput(
        out,
        job="build-index",
        settings_file=P.BUILD_FILE,
        parts_dir=P.PARTS_DIR,
        part_suffix=".faiss",
        storage_options=so,
    )
    with output.open(cov, overwrite=not update, describe=f"factory {factory}"):
        same = output.previous is not None and output.previous.get("config_hash") == output.settings["config_hash"]
        trained_uri, refine_uri = output.join(P.TRAINED_FILE), output.join(P.TRAINED_REFINE_FILE)
        from index import storage

        if same and storage.exists(trained_uri, so):  # the quantiser of this configuration: reuse it
            trained = storage.read_bytes(trained_uri, so)
            trained_refine = storage.read_bytes(refine_uri, so) if storage.exists(refine_uri, so) else None
            train_s, train_rss = 0.0, 0
        else:
            if update:
                raise ConfigError(f"--update: {out} lost its trained quantiser ({P.TRAINED_FILE}): rebuild it")
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=ts, replace=False)) if ts < n else np.arange(n)
            gpu = cfg.gpus_per_task > 0
            # max_calls=1: the worker that held the training sample exits, so part workers' peaks are theirs
            task = ray.remote(num_cpus=cfg.train_cpus, num_gpus=cfg.gpus_per_task, max_retries=3, max_calls=1)(
                _train_task
            )
            trained, trained_refine, train_s, train_rss = ray.get(
                task.remote(root, so, [s.as_dict() for s in shards], factory, sample, cfg.train_cpus, gpu)
            )
            if trained_refine is not None:
                output.write_file(P.TRAINED_REFINE_FILE, trained_refine)
            output.write_file(P.TRAINED_FILE, trained)
        t_parts = time.perf_counter()
        done = _run_parts(plans, output, root, so, trained, trained_refine, cfg)
        parts_s = time.perf_counter() - t_parts
        source = VectorSource.from_store(store, [s for p in plans for s in map(_shard, p.shards)])
        assert source.n == sum(p.rows for p in plans)
        index = _assemble(layout, output, plans, trained, trained_refine, so)
        build_s = time.perf_counter() - t0
        index, rep = evaluate_index(
            index,
            source,
            factory,
            build_s=build_s,
            train_size=ts,
            target_recall=target_recall,
            num_queries=num_queries,
            allow_low_recall=allow_low_recall,
            rng=np.random.default_rng(seed + 1),
            search_index=store_refined(index, factory, source),
            text_queries=text_queries,
            max_nprobe=max_nprobe,
        )
        rows_uri = write_rows_table(store, [s for p in plans for s in map(_shard, p.shards)], out, so)
        extra = {
            "store": root,
            "model": store.manifest()["model"],
            "store_total": source.n,
            "layout": layout,
            "build": cov,
            "parts": [asdict(p) for p in plans],
            "quantizer": P.TRAINED_FILE,
            "build_stages": {
                "train_s": train_s,
                "parts_s": parts_s,
                "parts_written": sum(d["written"] for d in done),
                "parts_reused": sum(not d["written"] for d in done),
                "workers": cfg.workers,
                "train_peak_rss": train_rss,
                "part_peak_rss": max((d["peak_rss"] for d in done if "peak_rss" in d), default=0),
            },
            "files": rows_uri,
        }
        if layout == "merged":
            save_index(index, rep, out, extra, so)
        else:
            _save_meta_only(index, rep, out, extra, so, write_index=layout == "ondisk")
        output.write_report(_job_report(rep, extra, done, job_config))
    logger.info(
        "index in %d parts (%s layout): %d rows, %d parts written now, %d kept from before",
        len(plans),
        layout,
        source.n,
        extra["build_stages"]["parts_written"],
        extra["build_stages"]["parts_reused"],
    )
    return rep


def _job_report(
    rep: IndexReport, extra: Dict[str, Any], done: List[Dict[str, Any]], config: Optional[Dict[str, Any]]
) -> JobReport:
    """The uniform report of a build in parts: vectors indexed, parts written now or kept, stages."""
    stages = extra["build_stages"]
    written = sum(d["rows"] for d in done if d["written"])
    return job_report(
        "build-index",
        unit="vectors",
        config=config,
        seen=rep.n,
        processed=written,
        already_done=rep.n - written,
        seconds=rep.build_seconds,
        stages={
            "train quantiser": stages["train_s"],
            "fill parts (Ray tasks)": (stages["parts_s"], written),
            "build (train, parts, merge, tune, evaluate)": (rep.build_seconds, rep.n),
        },
        memory={
            "driver (index build)": peak_memory(),
            "quantiser training task": {"rss": stages["train_peak_rss"]},
            "part task (largest)": {"rss": stages["part_peak_rss"]},
        },
        extra={
            "factory": rep.factory,
            "layout": extra["layout"],
            "parts": len(extra["parts"]),
            "parts_written": stages["parts_written"],
            "parts_reused": stages["parts_reused"],
            f"recall_at_{rep.k}": rep.recall_at_10,
            "target_met": rep.target_met,
            "index_bytes": rep.index_bytes,
        },
    )


def _run_parts(
    plans: Sequence[P.PartPlan],
    output: ResumableOutput,
    root: str,
    so: Dict[str, Any],
    trained: bytes,
    trained_refine: Optional[bytes],
    cfg: IndexClusterConfig,
) -> List[Dict[str, Any]]:
    """Every part's file present: the missing ones made by Ray tasks, ``cfg.workers`` in flight."""
    import ray

    have = {u.rsplit("/", 1)[-1] for u in output.parts.list()}
    todo = [p for p in plans if f"part-{p.name}.faiss" not in have]
    done = [{"name": p.name, "rows": p.rows, "written": False} for p in plans if p not in todo]
    if not todo:
        return done
    task = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=3)(_part_task)
    gpu = cfg.gpus_per_task > 0
    tref, rref = ray.put(trained), (ray.put(trained_refine) if trained_refine is not None else None)
    pending, queue = [], list(todo)
    while queue or pending:
        while queue and len(pending) < cfg.workers:
            pending.append(task.remote(root, so, queue.pop(0), tref, rref, output.parts, cfg.cpus_per_task, gpu))
        ready, pending = ray.wait(pending, num_returns=1)
        for r in ray.get(ready):
            done.append(r)
            logger.info(
                "part %s: %d rows in %.1f s%s",
                r["name"],
                r["rows"],
                r["seconds"],
                "" if r["written"] else " (already written by an earlier attempt)",
            )
        output.lock.verify()  # a build whose lock was taken over stops here
    return done


def _part_bytes(output: ResumableOutput, plans: Sequence[P.PartPlan], refine: bool, so) -> Iterator[Optional[bytes]]:
    """Each part's file (or its refine codes), read lazily in part order (None when ``refine`` is
    asked of an index without refine codes)."""
    from index import storage

    for p in plans:
        name = f"part-{p.name}{'.refine' if refine else ''}.faiss"
        yield storage.read_bytes(storage.join(output.parts.uri, name), so)


def _assemble(layout: str, output: ResumableOutput, plans, trained: bytes, trained_refine: Optional[bytes], so):
    """The searchable index of the parts: merged in RAM, merged on disk, or an IndexShards of them."""
    from index import storage

    if layout == "ondisk":
        if storage.is_url(output.uri):
            raise ConfigError("index.layout ondisk needs a local (or shared file system) index folder, not a URL")
        if trained_refine is not None:
            raise ConfigError("index.layout ondisk keeps only inverted lists: use a factory without Refine(...)")
        paths = [storage.join(output.parts.uri, f"part-{p.name}.faiss") for p in plans]
        ivf = output.join(IVFDATA_FILE)
        Path(ivf).unlink(missing_ok=True)
        return P.merge_ondisk(output.join(P.TRAINED_FILE), paths, ivf)
    bases = _part_bytes(output, plans, False, so)
    refines = _part_bytes(output, plans, True, so) if trained_refine is not None else iter([None] * len(plans))
    if layout == "merged":  # one part at a time beside the merged index, not every part's bytes at once
        return P.merge_parts(trained, trained_refine, zip(bases, refines))
    if trained_refine is not None:
        raise ConfigError(
            "index.layout shards serves PQ codes only: use a factory without Refine(...) "
            "(re-rank from the store) or layout merged"
        )
    return P.as_shards([P.from_bytes(b) for b in bases])


def _save_meta_only(
    index, rep: IndexReport, out: str, extra: Dict[str, Any], so: Dict[str, Any], write_index: bool
) -> None:
    """index.json (and for ``ondisk``, index.faiss pointing at index.ivfdata) of an unmerged layout."""
    from index import storage
    from index.faiss_factory import _faiss

    if write_index:
        _faiss().write_index(index, storage.join(out, INDEX_FILE))
    meta = {"report": asdict(rep), **extra}
    storage.write_bytes(storage.join(out, META_FILE), json.dumps(meta, indent=2).encode(), so)
