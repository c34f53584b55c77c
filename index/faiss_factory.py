"""FAISS factory strings: the automatic choice by corpus size and memory budget, the memory
estimate it is compared with, and validation (see :mod:`index.faiss_index` for the rationale)."""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Optional, Tuple

from reco.errors import ConfigError

logger = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss  # faiss-cpu or faiss-gpu, never both
    except ImportError as exc:  # pragma: no cover - faiss-cpu is pinned
        raise ImportError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on GPU hosts)") from exc
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _pow2(x: float) -> int:
    return 1 << max(4, int(round(math.log2(max(x, 16)))))


# -- factory strings -------------------------------------------------------------------------

_REFINE_RE = re.compile(r"^(?P<base>.+?),(?:(?P<rflat>RFlat)|Refine\((?P<inner>.+)\))$")


def split_refine(factory: str) -> Tuple[str, Optional[str]]:
    """``"OPQ64,IVF4096,PQ64,Refine(SQfp16)"`` -> ``("OPQ64,IVF4096,PQ64", "SQfp16")``; ``RFlat`` -> ``"Flat"``."""
    m = _REFINE_RE.match(factory.strip())
    if not m:
        return factory.strip(), None
    return m.group("base"), ("Flat" if m.group("rflat") else m.group("inner").strip())


def new_index(dim: int, factory: str):
    """``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`` without polysemous training.

    For a ``PQm`` token FAISS's factory turns on polysemous training (a simulated-annealing
    reordering of every PQ codebook, ``"PQmnp"`` turns it off): it only serves Hamming-threshold
    search (``polysemous_ht``), which nothing here uses, and it made training ``IVF64,PQ32`` on
    20k x 512 take 46 s instead of 2 s on one core. The codes and ADC distances are the same
    without it."""
    faiss = _faiss()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(index)
    while inner is not None:
        if hasattr(inner, "do_polysemous_training"):
            inner.do_polysemous_training = False
        nested = getattr(inner, "index", None) if isinstance(inner, faiss.IndexPreTransform) else None
        inner = faiss.downcast_index(nested) if nested is not None else None
    return index


def to_gpu(index, factory: str) -> Tuple[Any, Any]:
    """``(copy of index on GPU 0, its StandardGpuResources)`` for training and adding, or
    ``(index, None)`` when the factory has no GPU implementation (HNSW) or FAISS cannot clone it
    (logged). Bring the result back with ``faiss.index_gpu_to_cpu``."""
    if "HNSW" in factory:
        return index, None
    faiss = _faiss()
    try:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), res
    except Exception as exc:  # e.g. a transform FAISS cannot clone to the GPU
        logger.warning("cannot move %s to the GPU (%s): building on the CPU", factory, exc)
        return index, None


def validate_factory(factory: str, dim: int) -> None:
    """Raise :class:`ConfigError` if ``factory`` is not a FAISS factory string FAISS accepts for ``dim``."""
    faiss = _faiss()
    base, refine = split_refine(factory)
    for part in (base, refine):
        if part is None or part == "store":  # Refine(store): re-ranked from the store (index.rerank)
            continue
        try:
            faiss.index_factory(dim, part, faiss.METRIC_INNER_PRODUCT)
        except Exception as exc:  # FAISS raises RuntimeError with a C++ message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"invalid FAISS factory string {factory!r} for dim {dim}: {first}") from None


def _code_bytes(token: str, d: int) -> Optional[float]:
    """Bytes per vector of a storage token (Flat, PQm[xb], PQmx4fs (SIMD fast-scan), SQ8, SQfp16, ...) on d
    dims (fast-scan lists are padded to blocks of 32 codes: at most 31 codes per list, not counted)."""
    if token == "Flat":
        return 4.0 * d
    if token == "store":  # Refine(store): re-ranking vectors stay in the store, not in RAM
        return 0.0
    m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:np|fsr?)?", token)
    if m:
        return int(m.group(1)) * int(m.group(2) or 8) / 8.0
    sq = {"SQ8": 1.0, "SQ6": 0.75, "SQ4": 0.5, "SQfp16": 2.0, "SQbf16": 2.0, "SQ8_direct": 1.0}
    if token in sq:
        return sq[token] * d
    return None


def estimate_index_bytes(factory: str, n: int, dim: int) -> int:
    """Memory (≈ serialized size) of ``factory`` holding ``n`` vectors of ``dim``.

    Understands the strings :func:`choose_factory` produces and the common building blocks
    (OPQ/PCA, IVF with flat or HNSW coarse quantiser, HNSW, Flat, PQ, SQ, RFlat/Refine(...)).
    Raises ``ValueError`` for anything else.
    """
    base, refine = split_refine(factory)
    total = 0.0
    d = dim
    stored = hnsw = False
    for tok in [t.strip() for t in base.split(",") if t.strip()]:
        m = re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", tok)
        if m:
            out = int(m.group(2) or d)
            total += 4.0 * d * out
            d = out
            continue
        m = re.fullmatch(r"PCAR?(\d+)", tok)
        if m:
            out = int(m.group(1))
            total += 4.0 * d * out + 4.0 * d
            d = out
            continue
        if tok == "L2norm":
            continue
        m = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", tok)
        if m:
            nlist = int(m.group(1))
            total += 4.0 * nlist * d + 8.0 * n  # centroids + one 8-byte id per vector
            if m.group(2):
                total += nlist * (2 * int(m.group(2)) * 4 * 1.1 + 8)
            continue
        m = re.fullmatch(r"HNSW(\d+)(?:_(\w+))?", tok)
        if m:  # level-0 links (2M int32) + upper levels and level table; storage follows
            total += n * (2 * int(m.group(1)) * 4 * 1.05 + 12)
            hnsw = True
            if m.group(2) is None:
                continue
            tok = m.group(2)
        per = _code_bytes(tok, d)
        if per is None:
            raise ValueError(f"cannot estimate the memory of factory component {tok!r} in {factory!r}")
        total += per * n
        pq = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:np|fsr?)?", tok)
        if pq:
            total += 4.0 * (1 << int(pq.group(2) or 8)) * d  # codebooks
        stored = True
    if hnsw and not stored:  # "HNSW32" alone stores flat vectors
        total += 4.0 * d * n
        stored = True
    if not stored:
        raise ValueError(f"factory {factory!r} stores no vectors")
    if refine is not None:
        per = _code_bytes(refine, dim)
        if per is None:
            raise ValueError(f"cannot estimate the memory of refine index {refine!r}")
        total += per * n
    return int(total)


def choose_factory(
    n: int, dim: int, memory_budget_bytes: int = 8 << 30, flat_max: int = 100_000, store_rerank: bool = True
) -> str:
    """A FAISS factory string for ``n`` vectors of ``dim`` whose estimated memory fits the budget.

    When not even 8-bit re-ranking codes fit beside the PQ codes, ``...,PQm,Refine(store)`` keeps
    only the PQ codes in RAM and re-ranks from the store's float16 files (:mod:`index.rerank`),
    unless ``store_rerank`` is False."""
    if n <= 0:
        raise ValueError("cannot index an empty corpus")
    if n <= flat_max and estimate_index_bytes("Flat", n, dim) <= memory_budget_bytes:
        return "Flat"
    nlist = _pow2(4 * math.sqrt(n))
    ivf_flat = f"IVF{nlist},Flat"
    if estimate_index_bytes(ivf_flat, n, dim) <= memory_budget_bytes:
        return ivf_flat
    coarse = f"IVF{nlist}_HNSW32" if n >= 10_000_000 else f"IVF{nlist}"
    ms = [m for m in (64, 48, 32, 16, 8) if m <= dim and dim % m == 0]
    # a good first stage (m >= 32) matters more than fp16 vs 8-bit re-ranking codes
    order = [(r, m) for r in ("SQfp16", "SQ8") for m in ms if m >= 32] + [
        (r, m) for r in ("SQfp16", "SQ8") for m in ms if m < 32
    ]
    for refine, m in order:
        f = f"OPQ{m},{coarse},PQ{m},Refine({refine})"
        if estimate_index_bytes(f, n, dim) <= memory_budget_bytes:
            return f
    if store_rerank:
        for m in [m for m in ms if m >= 32] + [m for m in ms if m < 32]:
            f = f"OPQ{m},{coarse},PQ{m},Refine(store)"
            if estimate_index_bytes(f, n, dim) <= memory_budget_bytes:
                return f
    smallest = f"OPQ{ms[-1]},{coarse},PQ{ms[-1]},Refine(SQ8)" if ms else f"{coarse},Refine(SQ8)"
    need = estimate_index_bytes(smallest, n, dim) if ms else n * (dim + 8)
    raise ValueError(
        f"{n} vectors of dim {dim} do not fit {memory_budget_bytes / 2**30:.1f} GiB with re-ranking codes: "
        f"the smallest index that can reach a recall target ({smallest}) needs {need / 2**30:.1f} GiB; "
        "raise the memory budget or pass an explicit factory (with allow_low_recall if it may miss the target)"
    )
