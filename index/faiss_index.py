"""FAISS index over an embedding store: automatic choice, streaming build, recall report, save/load.

Choice by corpus size and memory budget (inner product on L2-normalised vectors = cosine). The
budget is compared with :func:`estimate_index_bytes`, which counts every stored part of the
index: vectors or codes, 8-byte ids of inverted lists, centroids, OPQ matrix, PQ codebooks and
the re-ranking (refine) codes.

* ``Flat`` (exact) while n <= ``flat_max`` and the raw vectors fit the budget;
* ``IVF{nlist},Flat`` (nlist ~ 4 sqrt(n)) while the raw vectors fit: measured on 1M clustered
  512-d vectors at recall@10 0.990 (nprobe 4) with 0.7 ms per single query, 1969 MB
  (``bench/results/index.md``); ``HNSW32,Flat`` is a good override when build time on many cores
  is cheap;
* ``OPQ{m},IVF{nlist},PQ{m},Refine(SQfp16)`` when only compressed codes fit
  (``IVF{nlist}_HNSW32`` coarse quantiser from 10M on), else ``...,Refine(SQ8)``. PQ codes alone
  cap recall far below any useful target (0.215 recall@10 for ``OPQ64,IVF4096,PQ64`` on the 1M
  benchmark even at nprobe = nlist), so the PQ stage only proposes ``k * k_factor`` candidates
  which are re-ranked with exact inner products against a second copy of the vectors. That copy
  is kept as float16 (``SQfp16``: 2 bytes/dim) rather than float32 (``RFlat``: 4 bytes/dim)
  because the store itself holds float16 embeddings, so fp16 re-ranking is lossless with respect
  to the data at half the memory of ``RFlat``; when even that does not fit, 8-bit scalar codes
  (``SQ8``, 1 byte/dim, near-exact) are used. Measured on the 1M benchmark:
  ``OPQ64,IVF4096,PQ64,Refine(SQfp16)`` (1.5 GiB budget) recall@10 0.987 at nprobe 4 and k_factor
  64, 1.0 ms per single query, 1055 MB; ``...,Refine(SQ8)`` (1 GiB) recall@10 0.955 (8-bit
  re-ranking caps recall close to the default 0.95 target), 566 MB. Corpora for which neither
  fits are refused with a message naming the memory needed (pass an explicit factory to
  override).

Any FAISS factory string can be given instead; a trailing ``,RFlat`` or ``,Refine(...)`` is
built as a :class:`faiss.IndexRefine` around the base index.

Build (:func:`build_index_from_source`): the corpus is read through a :class:`VectorSource`, one
chunk (store shard) at a time. Training uses a random sample of rows (only those rows are read
from the float16 shard files, default ``max(100k, 50 nlist)`` rows); vectors are then added
block by block (float16 -> float32 per block of ``BLOCK_ROWS`` rows, fewer for PQ codes whose
encoding tables FAISS allocates per call, see ``ADD_TEMP_BYTES``), so the build's memory is the
index plus the training sample plus one block, independent of the corpus size (measured in
``bench/results/index.md``: 373 MB peak for a 108 MB index over 200k vectors, 486 MB for 213 MB
over 400k; loading the store as float32 first took 920 MB and 1720 MB).

Search parameters (IVF ``nprobe`` / HNSW ``efSearch``, and the refine ``k_factor``) are tuned on
one random sample of corpus rows until recall@10 against exact search reaches the target; recall
is then reported on a second, disjoint sample (each query's own row is excluded from both the
exact and the approximate results). Exact ground truth is computed by streaming the corpus in
blocks and merging per-block top-k lists. A missed target raises :class:`LowRecallError`, unless
``allow_low_recall=True``, in which case it is logged as a WARNING and the report says
``target_met: false``. Every build records recall@1/@10, batched throughput (ms/query and
queries/s of one batched call), single-query latency (median and p95 of one-at-a-time searches),
index size and build time in ``index.json``.

faiss-gpu is used for training/adding/search of the IVF/Flat base index when GPUs are visible
(``faiss.get_num_gpus()``); the refine codes and HNSW stay on the CPU (FAISS has no GPU HNSW).
Search parameters of GPU indexes are set on the GPU object itself (``GpuIndexIVF*.nprobe``, or
``faiss.GpuParameterSpace``): the CPU ``ParameterSpace`` rejects GPU indexes.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reco.errors import ConfigError, ReCoError

from .faiss_factory import (  # noqa: F401  (re-exported: the public API of this module)
    _faiss,
    _pow2,
    choose_factory,
    estimate_index_bytes,
    gpu_count,
    new_index,
    split_refine,
    to_gpu,
    validate_factory,
)
from .rerank import STORE
from .retriever import Retriever, SearchResult
from .vectors import BLOCK_ROWS, VectorSource, exact_topk  # noqa: F401

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"

#: bound of FAISS's temporary buffers per add call: PQ encoding may build (rows x M x 2^nbits) float
#: distance tables (1 GiB for 32768 rows of PQ32), so PQ indexes are added in smaller blocks
ADD_TEMP_BYTES = 64 << 20
#: ``k_factor`` values tried for re-ranking indexes (k * k_factor candidates are re-ranked)
K_FACTORS = (1, 2, 4, 8, 16, 32, 64)
#: FAISS GPU IVF indexes accept nprobe up to this
GPU_MAX_NPROBE = 2048


class LowRecallError(ReCoError):
    """The index did not reach the requested recall with any search parameters tried."""

    def __init__(self, message: str, report: Optional["IndexReport"] = None):
        super().__init__(message)
        self.report = report


# -- report ----------------------------------------------------------------------------------


@dataclass
class IndexReport:
    factory: str
    n: int
    dim: int
    build_seconds: float
    index_bytes: int
    recall_at_1: float  # on the evaluation queries (disjoint from the tuning queries)
    recall_at_10: float  # recall@k with k = min(10, n - 1), see ``k``
    batched_ms_per_query: float  # one batched search call over the evaluation queries, per query
    batched_qps: float  # the same call, in queries per second
    single_query_ms: float  # median latency of one-query searches
    single_query_p95_ms: float
    queries: int  # evaluation queries
    tune_queries: int = 0  # queries the search parameters were tuned on (0: nothing to tune)
    recall_at_10_tune: float = float("nan")
    single_queries: int = 0  # one-query searches timed
    search_params: Dict[str, int] = field(default_factory=dict)
    target_recall: float = 0.95
    target_met: bool = True
    k: int = 10
    train_size: int = 0
    gpu: bool = False
    rerank_bytes_per_query: float = 0.0  # Refine(store): float16 bytes read from the store per query
    tuned_on: str = "image (corpus-row) queries"  # or "text-like queries" (what ReCo sends)
    k50: int = 50  # min(50, n - 1)
    recall_image_at_50: float = float("nan")
    text_queries: int = 0  # text-like evaluation queries (disjoint from the tuning half)
    recall_text_at_10: float = float("nan")
    recall_text_at_50: float = float("nan")

    @property
    def ms_per_query(self) -> float:
        """Batched ms/query (the name of the field before single-query latency was reported)."""
        return self.batched_ms_per_query


def recall_per_query(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """(Q,) |found[q, :k] ∩ truth[q, :k]| / k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth)]
    return np.asarray(hits, np.float64) / k


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k over queries."""
    return float(recall_per_query(found, truth, k).mean())


# -- search parameters -----------------------------------------------------------------------


def _is_gpu_index(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def _set_search_param(index, name: str, value: float) -> None:
    """Set ``nprobe`` / ``efSearch`` / ``k_factor`` on ``index`` or the sub-index it applies to.

    Walks IndexRefine (``k_factor`` is its own, others go to the base) and IndexPreTransform
    (OPQ); GPU indexes get the attribute directly (``GpuIndexIVF*.nprobe``) or through
    ``faiss.GpuParameterSpace``, never through the CPU ``ParameterSpace`` which rejects them.
    """
    faiss = _faiss()
    if hasattr(index, "set_search_param"):  # index.rerank.StoreRefine
        index.set_search_param(name, value)
        return
    if _is_gpu_index(index):
        if hasattr(index, name):
            setattr(index, name, int(value))
            return
        if hasattr(faiss, "GpuParameterSpace"):
            faiss.GpuParameterSpace().set_index_parameter(index, name, float(value))
            return
        raise ValueError(f"cannot set {name} on {type(index).__name__}")
    if isinstance(index, faiss.Index):
        index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        if name == "k_factor":
            index.k_factor = float(value)
        else:
            _set_search_param(index.base_index, name, value)
        return
    if name == "k_factor":
        raise ValueError(f"k_factor applies to re-ranking indexes only, not {type(index).__name__}")
    if isinstance(index, faiss.IndexPreTransform):
        _set_search_param(index.index, name, value)
        return
    if name == "nprobe" and isinstance(index, faiss.IndexShardsIVF):
        # its coarse search asks for nprobe lists uncapped, its shards read nlist of them: cap it here
        value = min(float(value), float(index.nlist))
    faiss.ParameterSpace().set_index_parameter(index, name, float(value))


def _search_param_name(factory: str) -> Optional[str]:
    base, _ = split_refine(factory)
    if "IVF" in base:
        return "nprobe"
    if "HNSW" in base:
        return "efSearch"
    return None


def _nlist(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 1


def _strip(row: np.ndarray, self_row: int, k: int) -> np.ndarray:
    r = [int(v) for v in row if v != self_row and v >= 0][:k]
    return np.array(r + [-1] * (k - len(r)), dtype=np.int64)


def _found(index, queries: np.ndarray, q_rows: np.ndarray, k: int) -> Tuple[np.ndarray, float]:
    """(top-k rows, seconds) of one batched search of ``queries`` (corpus rows ``q_rows``, self excluded)."""
    t = time.perf_counter()
    _, found = index.search(queries, k + 1)
    sec = time.perf_counter() - t
    return np.stack([_strip(f, qi, k) for f, qi in zip(found, q_rows)]), sec


def _evaluate(index, queries: np.ndarray, q_rows: np.ndarray, truth: np.ndarray, k: int) -> Tuple[float, float, float]:
    """(recall@1, recall@k, seconds) of one batched search of ``queries`` (corpus rows ``q_rows``, self excluded)."""
    found, sec = _found(index, queries, q_rows, k)
    return recall_at(found, truth, 1), recall_at(found, truth, k), sec


def index_params(params: Dict[str, Any], factory: str) -> Dict[str, Any]:
    """The search parameters that belong on the FAISS index itself (Refine(store)'s k_factor is
    the store re-ranker's, :mod:`index.rerank`)."""
    if split_refine(factory)[1] == STORE:
        return {k: v for k, v in params.items() if k != "k_factor"}
    return dict(params)


def store_refined(index, factory: str, rows):
    """``index`` wrapped in a :class:`index.rerank.StoreRefine` over ``rows`` for a Refine(store) factory."""
    if split_refine(factory)[1] != STORE:
        return index
    from .rerank import StoreRefine

    return StoreRefine(index, rows)


def _apply_params(index, params: Dict[str, int]) -> None:
    for name, value in params.items():
        _set_search_param(index, name, value)


# -- build -----------------------------------------------------------------------------------


def _add_block_rows(factory: str) -> int:
    """Rows per add call: BLOCK_ROWS, fewer for PQ codes so FAISS's encoding tables stay within ADD_TEMP_BYTES."""
    widest = max((int(m) * (1 << int(nb or 8)) for m, nb in re.findall(r"PQ(\d+)(?:x(\d+))?", factory)), default=0)
    if not widest:
        return BLOCK_ROWS
    return int(max(256, min(BLOCK_ROWS, ADD_TEMP_BYTES // (4 * widest))))


def default_train_size(n: int, factory: str) -> int:
    """Training sample: max(100k, 50 nlist) rows (FAISS wants >= 39 per IVF centroid), at most n."""
    return int(min(n, max(100_000, 50 * _nlist(factory))))


def _query_split(n: int, n_tune: int, n_eval: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Two disjoint random samples of corpus rows: (tuning rows, evaluation rows)."""
    n_tune, n_eval = max(0, n_tune), max(1, n_eval)
    if n_tune + n_eval > n:  # small corpus: split what there is
        n_tune = (n * n_tune) // (n_tune + n_eval)
        n_eval = n - n_tune
    rows = rng.choice(n, size=n_tune + n_eval, replace=False)
    return rows[:n_tune], rows[n_tune:]


def build_index_from_source(
    source: VectorSource,
    factory: Optional[str] = None,
    memory_budget_bytes: int = 8 << 30,
    target_recall: float = 0.95,
    num_queries: int = 1000,
    train_size: Optional[int] = None,
    use_gpu: Optional[bool] = None,
    seed: int = 0,
    allow_low_recall: bool = False,
    tune_queries: Optional[int] = None,
    single_queries: int = 100,
    text_queries: Optional[np.ndarray] = None,
    max_nprobe: Optional[int] = None,
) -> Tuple[Any, IndexReport]:
    """Build an inner-product index over the L2-normalised vectors of ``source`` and report its quality.

    See the module docstring for the streaming build, the tuning / evaluation query split and
    what a missed recall target does. ``num_queries`` evaluation queries and ``tune_queries``
    (default: as many) tuning queries are disjoint random corpus rows.
    """
    faiss = _faiss()
    if not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")
    n, dim = source.n, source.dim
    if n <= 0:
        raise ValueError("cannot index an empty corpus")
    factory = factory or choose_factory(n, dim, memory_budget_bytes)
    base_factory, refine_factory = split_refine(factory)
    use_gpu = (gpu_count() > 0) if use_gpu is None else use_gpu
    rng = np.random.default_rng(seed)

    t0 = time.perf_counter()
    base = new_index(dim, base_factory)
    in_ram = refine_factory is not None and refine_factory != STORE  # Refine(store): re-ranked from the store
    refine = new_index(dim, refine_factory) if refine_factory is not None and in_ram else None
    work, gpu_res = to_gpu(base, base_factory) if use_gpu else (base, None)
    ts = 0
    if not work.is_trained or (refine is not None and not refine.is_trained):
        ts = min(n, train_size or default_train_size(n, factory))
        sample_rows = np.sort(rng.choice(n, size=ts, replace=False)) if ts < n else np.arange(n)
        sample = source.take(sample_rows)
        if not work.is_trained:
            work.train(sample)
        if refine is not None and not refine.is_trained:
            refine.train(sample)
        del sample
    for _, blk in source.blocks(_add_block_rows(factory)):
        work.add(blk)
        if refine is not None:
            refine.add(blk)
    if work is not base:
        base = faiss.index_gpu_to_cpu(work)
    index = faiss.IndexRefine(base, refine) if refine is not None else base
    search_index = (faiss.IndexRefine(work, refine) if refine is not None else work) if work is not base else index
    search_index = store_refined(search_index, factory, source)
    build_s = time.perf_counter() - t0

    index, rep = evaluate_index(
        index,
        source,
        factory,
        build_s,
        ts,
        target_recall,
        num_queries,
        tune_queries,
        single_queries,
        allow_low_recall,
        rng,
        search_index=search_index,
        gpu=work is not base,
        text_queries=text_queries,
        max_nprobe=max_nprobe,
    )
    del gpu_res
    return index, rep


def evaluate_index(
    index,
    source: VectorSource,
    factory: str,
    build_s: float,
    train_size: int,
    target_recall: float = 0.95,
    num_queries: int = 1000,
    tune_queries: Optional[int] = None,
    single_queries: int = 100,
    allow_low_recall: bool = False,
    rng: Optional[np.random.Generator] = None,
    search_index=None,
    gpu: bool = False,
    text_queries: Optional[np.ndarray] = None,
    max_nprobe: Optional[int] = None,
) -> Tuple[Any, IndexReport]:
    """Tune the search parameters of a built ``index`` over ``source`` on one sample of corpus rows
    and report recall, throughput and latency on another (see the module docstring); raises
    :class:`LowRecallError` on a missed target unless ``allow_low_recall``. ``search_index`` (a GPU
    copy) is searched when given; the tuned parameters are set on ``index``.

    ``text_queries`` (T, E): the queries ReCo sends (prompt-ensembled CLIP text embeddings, or a
    synthetic stand-in with the modality gap): the parameters are then tuned on half of them and
    recall@10/@50 is reported on the other half as well as on image (corpus-row) queries; the
    target applies to the lower of the text-like recall@10 and recall@50 (ReCo's archives are
    top-50 lists), on the tuning half and on the held-out half."""
    rng = rng if rng is not None else np.random.default_rng(0)
    search_index = index if search_index is None else search_index
    n, dim, ts = source.n, source.dim, train_size
    _, refine = split_refine(factory)
    # queries: disjoint tuning / evaluation samples of corpus rows; exact truth by streaming
    k = min(10, n - 1) if n > 1 else 1
    k50 = max(k, min(50, n - 1))
    param = _search_param_name(factory)
    has_params = param is not None or refine is not None
    text = None if text_queries is None else np.ascontiguousarray(np.atleast_2d(text_queries), np.float32)
    if text is not None and text.shape[1] != dim:
        raise ConfigError(f"text queries have dimension {text.shape[1]}, the corpus {dim}")
    n_tune = (num_queries if tune_queries is None else tune_queries) if has_params and text is None else 0
    tune_rows, eval_rows = _query_split(n, n_tune, num_queries, rng)
    all_rows = np.concatenate([tune_rows, eval_rows])
    all_q = source.take(all_rows)
    # each query's own row is excluded from both result lists (not with a single vector: nothing else to find)
    self_rows = all_rows if n > 1 else np.full_like(all_rows, -1)
    _, all_truth = exact_topk(source, all_q, k50, exclude_rows=self_rows)
    nt = len(tune_rows)
    tq, tt, eq, et = all_q[:nt], all_truth[:nt, :k], all_q[nt:], all_truth[nt:]
    tune_self, eval_self = self_rows[:nt], self_rows[nt:]
    if text is not None:  # half the text-like queries tune, the other half evaluate
        perm = rng.permutation(len(text))
        half = max(1, len(text) // 2) if len(text) > 1 else 1
        _, text_truth = exact_topk(source, text, k50)
        t_tune, t_eval = perm[:half], (perm[half:] if len(text) > 1 else perm)
        # tuned on recall@10 and @50 at once (a bank's archive is a top-50 list)
        tq, tt, tune_self = text[t_tune], text_truth[t_tune], np.full(len(t_tune), -1, np.int64)
        nt = len(t_tune)

    params: Dict[str, int] = {}
    r10_tune = float("nan")
    if has_params and nt:
        from .tuning import tune

        params, r10_tune = tune(
            search_index,
            factory,
            tq,
            tune_self,
            tt,
            k,
            target_recall,
            gpu,
            ks=(k, k50) if text is not None else (),
            max_nprobe=max_nprobe,
        )
        _apply_params(search_index, params)
    if hasattr(search_index, "bytes_read"):  # re-rank I/O of the evaluation queries only
        search_index.bytes_read, search_index.queries = 0, 0
    r1, r10, sec = _evaluate(search_index, eq, eval_self, et[:, :k], k)
    rerank_io = float(getattr(search_index, "bytes_per_query", 0.0))
    recall_image_at_50 = _evaluate(search_index, eq, eval_self, et, k50)[1]
    text_figures: Dict[str, Any] = {}  # the text-like fields of IndexReport, when text queries are given
    target_recall_seen = r10
    if text is not None:
        none = np.full(len(t_eval), -1, np.int64)
        text_figures = dict(
            text_queries=len(t_eval),
            recall_text_at_10=_evaluate(search_index, text[t_eval], none, text_truth[t_eval, :k], k)[1],
            recall_text_at_50=_evaluate(search_index, text[t_eval], none, text_truth[t_eval], k50)[1],
        )
        target_recall_seen = min(text_figures["recall_text_at_10"], text_figures["recall_text_at_50"])
    lat = []
    m = min(single_queries, len(eq))
    for i in range(m):
        t = time.perf_counter()
        search_index.search(eq[i : i + 1], k + 1)
        lat.append(time.perf_counter() - t)
    _apply_params(index, index_params(params, factory))
    lat_ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    rep = IndexReport(
        factory=factory,
        n=n,
        dim=dim,
        build_seconds=build_s,
        index_bytes=_index_bytes(index),
        recall_at_1=r1,
        recall_at_10=r10,
        batched_ms_per_query=sec * 1000 / len(eq),
        batched_qps=len(eq) / sec if sec > 0 else float("inf"),
        single_query_ms=float(np.median(lat_ms)),
        single_query_p95_ms=float(np.percentile(lat_ms, 95)),
        queries=len(eq),
        tune_queries=nt,
        recall_at_10_tune=r10_tune,
        single_queries=m,
        search_params=params,
        target_recall=float(target_recall),
        target_met=bool(target_recall_seen >= target_recall),
        k=k,
        train_size=ts,
        gpu=gpu,
        rerank_bytes_per_query=rerank_io,
        recall_image_at_50=recall_image_at_50,
        k50=k50,
        tuned_on="text-like queries" if text is not None else "image (corpus-row) queries",
        **text_figures,
    )
    summary = (
        f"index {factory}: n={n} recall@1 {r1:.3f} recall@{k} {r10:.3f} on {len(eq)} evaluation queries "
        f"(params {params or 'exact'} tuned on {nt} other {rep.tuned_on}, tuning recall@{k} {r10_tune:.3f}); "
        + (
            f"text-like recall@{k} {rep.recall_text_at_10:.3f} @{k50} {rep.recall_text_at_50:.3f} on "
            f"{rep.text_queries} held-out text-like queries; "
            if text is not None
            else ""
        )
        + f"batched {rep.batched_ms_per_query:.3f} ms/query ({rep.batched_qps:.0f} queries/s), single query "
        f"{rep.single_query_ms:.2f} ms median; built in {build_s:.1f}s, {rep.index_bytes / 2**20:.1f} MB"
    )
    if not rep.target_met:
        msg = (
            f"{summary}: {'text-like recall@10/@50' if text is not None else f'recall@{k}'} "
            f"{target_recall_seen:.3f} is below the target {target_recall:.3f} with every search setting "
            f"tried. Use a larger memory budget or another factory, lower the target, or pass "
            f"allow_low_recall=True (`--allow-low-recall`) to keep this index"
        )
        if not allow_low_recall:
            raise LowRecallError(msg, rep)
        logger.warning("%s", msg)
    else:
        logger.info("%s", summary)
    return index, rep


def build_index(embeddings: np.ndarray, factory: Optional[str] = None, **options: Any) -> Tuple[Any, IndexReport]:
    """:func:`build_index_from_source` over an in-memory (N, E) array (no float32 copy if it is one);
    ``options`` are that function's keyword options."""
    return build_index_from_source(VectorSource.from_array(embeddings), factory, **options)


def _index_bytes(index) -> int:
    """Serialized size, counted through a callback writer (no copy of the index in memory)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexShards):  # not serialisable as one: the sum of its parts
        return sum(_index_bytes(faiss.downcast_index(index.at(i))) for i in range(index.count()))
    total = [0]

    def count(b: bytes) -> int:
        total[0] += len(b)
        return len(b)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return int(total[0])


class FaissRetriever(Retriever):
    """FAISS-backed :class:`Retriever`; row r of the index is ``ids[r]``."""

    def __init__(self, index, ids: Sequence[str]):
        if index.ntotal != len(ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index = index
        self.ids = list(ids)

    def search(self, queries: np.ndarray, k: int) -> List[SearchResult]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.ids))
        scores, rows = self.index.search(q, k)
        out = []
        for s, r in zip(scores, rows):
            keep = r >= 0
            out.append(SearchResult([self.ids[i] for i in r[keep]], s[keep], r[keep]))
        return out


# save / load live in index.index_files, which imports this module: re-exported lazily (PEP 562), so
# either module may be imported first
_FROM_INDEX_FILES = ("IndexFileError", "fetch_index_file", "load_index", "save_index")


def __getattr__(name: str) -> Any:
    if name in _FROM_INDEX_FILES:
        from . import index_files

        return getattr(index_files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
