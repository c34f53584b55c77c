"""An IVF index built in parts (#17.2): one trained empty index, parts filled from store shards
with that quantiser, merged with FAISS's own machinery or kept as shards.

Layout under the index URI (local folder or fsspec URL)::

    INDEX/trained.faiss                  the trained, empty base index (OPQ/IVF/PQ), written once
    INDEX/build.json                     factory, dim, training sample, seed: what the parts share
    INDEX/parts/part-<name>.faiss        base codes of some whole store shards, ids = store rows
    INDEX/parts/part-<name>.refine.faiss (Refine(...) factories) their re-ranking codes, row order
    INDEX/index.faiss, index.json        the merged index (layout "merged") or only index.json

A part is named after the commit tokens of the shards it holds, so a rerun, or ``--update``
after new shards were committed, finds the parts it already has and builds only the missing
ones. Every part is added with ``add_with_ids`` (ids = store rows), so parts merge with
``merge_from`` (or :func:`faiss.contrib.ondisk.merge_ondisk` into on-disk inverted lists) and
are searched as shards (``IndexShards`` semantics: per-part top-k merged) without any id
translation. Everything FAISS writes goes through ``serialize_index`` bytes, and the files are
those of one :class:`index.output.ResumableOutput` (settings + config hash in ``build.json``, the
writer lock, parts created exactly once even by retried tasks, read back exactly once).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from reco.errors import ConfigError

from .faiss_factory import _faiss, new_index, split_refine, to_gpu
from .vectors import BLOCK_ROWS, VectorSource

logger = logging.getLogger(__name__)

TRAINED_FILE = "trained.faiss"
TRAINED_REFINE_FILE = "trained.refine.faiss"
BUILD_FILE = "build.json"
PARTS_DIR = "parts"


@dataclass(frozen=True)
class PartPlan:
    """Whole store shards (``shards``: their records as dicts) holding rows first_row..+rows."""

    name: str
    shards: Tuple[Dict[str, Any], ...]
    first_row: int
    rows: int

    @property
    def tokens(self) -> List[str]:
        return [f"{s['index']}.{s.get('token', '')}" for s in self.shards]


def plan_parts(shards: Sequence[Any], part_rows: int, first_row: int = 0) -> List[PartPlan]:
    """Consecutive whole shards grouped into parts of about ``part_rows`` rows (a shard is never split)."""
    if part_rows < 1:
        raise ConfigError(f"index.part_rows must be >= 1, got {part_rows}")
    plans, cur, rows, start = [], [], 0, first_row
    for s in shards:
        if not s.count:
            continue
        cur.append(s.as_dict())
        rows += s.count
        if rows >= part_rows:
            plans.append(_plan(cur, start, rows))
            start += rows
            cur, rows = [], 0
    if cur:
        plans.append(_plan(cur, start, rows))
    return plans


def _plan(shards: List[Dict[str, Any]], first_row: int, rows: int) -> PartPlan:
    key = ";".join(f"{s['index']}.{s.get('token', '')}.{s['count']}" for s in shards) + f"@{first_row}"
    name = f"part-{shards[0]['index']:05d}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return PartPlan(name, tuple(shards), first_row, rows)


def check_partable(factory: str, layout: str = "merged") -> None:
    """Parts need an IVF base (ids kept per inverted list, ``merge_from``); HNSW and Flat are refused.
    FAISS's fast-scan PQ (``PQmx4fs``) is built in parts kept as ``shards`` only: ``merge_ondisk``
    cannot write its blocked codes, and ``merge_from`` of its lists corrupted the heap at 7-8M rows
    (faiss 1.15.1; checked before any part is built)."""
    base, _ = split_refine(factory)
    if "IVF" not in base or "HNSW" in base.split("IVF")[0]:
        raise ConfigError(
            f"factory {factory!r} cannot be built in parts: parts need an IVF index "
            "(e.g. IVF4096,PQ64 or OPQ64,IVF4096,PQ64,Refine(SQfp16))"
        )
    if layout in ("ondisk", "merged") and is_fast_scan(factory):
        why = (
            "merge_ondisk cannot write its codes (blocks of 32)"
            if layout == "ondisk"
            else "merging fast-scan inverted lists corrupted the heap past ~7M rows with faiss 1.15 (reproduced)"
        )
        raise ConfigError(
            f"index.layout {layout} cannot hold the fast-scan PQ of {factory!r}: {why}; "
            "use layout shards (`--layout shards`), or PQm (8-bit codes)"
        )


def is_fast_scan(factory: str) -> bool:
    """Whether ``factory`` uses FAISS's SIMD fast-scan PQ (``PQmx4fs``: 4-bit codes kept in blocks)."""
    return re.search(r"PQ\d+x4fsr?(,|$)", split_refine(factory)[0]) is not None


#: Fast-scan codes are scanned in blocks of 32 per inverted list, and every shard visits every probed
#: list of every query: each visit costs about the scan of ~100 codes here. Below this many codes per
#: list a shard's search goes to visits, not codes. Measured with IVF2048,PQ256x4fs, nprobe 768, the
#: same 10M rows as 20 shards of 500k (~244 codes per list): 8.63 ms per query, 4 of 2.5M (~1,220):
#: 6.52 ms, 2 of 5M: 6.23 ms (0.13 ms per shard); at 1M, 20 parts of 50k (~24): 4.03 ms, one part 1.60 ms.
FAST_SCAN_MIN_CODES_PER_LIST = 1024


def small_fast_scan_parts(factory: str, layout: str, plans: Sequence[PartPlan]) -> Optional[str]:
    """A warning when ``plans`` keep fast-scan shards too small for their lists (None when fine):
    their searches would be several times slower than the same rows in fewer, larger parts."""
    m = re.search(r"IVF(\d+)", split_refine(factory)[0])
    if layout != "shards" or not is_fast_scan(factory) or m is None or not plans:
        return None
    nlist = int(m.group(1))
    size = max(p.rows for p in plans)  # index.part_rows, give or take a shard (the last part: the rest)
    if len(plans) == 1 or size / nlist >= FAST_SCAN_MIN_CODES_PER_LIST:
        return None  # (one shard has no visit to save)
    return (
        f"the {len(plans)} fast-scan parts hold {size / nlist:.0f} codes per inverted list on average at most "
        f"({size} rows over {nlist} lists), fewer than {FAST_SCAN_MIN_CODES_PER_LIST}: every part visits every "
        f"probed list, so many small shards search slower than the same rows in fewer, larger parts "
        f"(measured at 10M: 20 parts 8.6 ms per query, 4 parts 6.5 ms); raise index.part_rows to at least "
        f"{FAST_SCAN_MIN_CODES_PER_LIST * nlist}"
    )


def partable_factory(chosen: str, n: int) -> str:
    """``chosen`` (from :func:`index.faiss_factory.choose_factory`), or ``IVF{nlist},Flat`` where
    it chose the exact ``Flat`` (small corpora), which has no inverted lists to build in parts."""
    from .faiss_factory import _pow2

    if chosen == "Flat":
        return f"IVF{_pow2(4 * n**0.5)},Flat"
    return chosen


def to_bytes(index) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def from_bytes(data: bytes):
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def train_empty(
    source: VectorSource, factory: str, sample_rows: np.ndarray, gpu: bool = False
) -> Tuple[Any, Optional[Any]]:
    """(trained empty base index, trained empty refine index or None) from the given sample rows;
    ``gpu``: the base index (IVF k-means, PQ) is trained on GPU 0 and brought back."""
    base_f, refine_f = split_refine(factory)
    base = new_index(source.dim, base_f)
    # Refine(store) re-ranks from the store: no refine codes to train
    refine = new_index(source.dim, refine_f) if refine_f is not None and refine_f != "store" else None
    sample = source.take(np.sort(np.asarray(sample_rows, np.int64)))
    work, res = to_gpu(base, base_f) if gpu else (base, None)
    work.train(sample)
    if work is not base:
        base = _faiss().index_gpu_to_cpu(work)
        del work, res
    if refine is not None and not refine.is_trained:
        refine.train(sample)
    return base, refine


def fill_part(
    trained: bytes,
    trained_refine: Optional[bytes],
    source: VectorSource,
    first_row: int,
    block_rows: int = BLOCK_ROWS,
    gpu: bool = False,
) -> Tuple[Any, Optional[Any]]:
    """The trained empty index(es) with every row of ``source`` added (ids = first_row + row);
    ``gpu``: the base index's adds (coarse assignment, encoding) run on GPU 0."""
    base = from_bytes(trained)
    refine = from_bytes(trained_refine) if trained_refine else None
    work, res = to_gpu(base, "IVF part") if gpu else (base, None)  # parts are never HNSW (check_partable)
    for off, blk in source.blocks(block_rows):
        work.add_with_ids(blk, np.arange(first_row + off, first_row + off + len(blk), dtype=np.int64))
        if refine is not None:
            refine.add(blk)
    if work is not base:
        base = _faiss().index_gpu_to_cpu(work)
        del work, res
    return base, refine


def merge_parts(trained: bytes, trained_refine: Optional[bytes], parts: Iterable[Tuple[bytes, Optional[bytes]]]):
    """One index from the parts, in part order (``merge_from``: ids kept; refine codes appended).
    ``parts`` may be a lazy iterable: one part's bytes are then held beside the merged index at a time."""
    faiss = _faiss()
    base = from_bytes(trained)
    refine = from_bytes(trained_refine) if trained_refine else None
    for b, r in parts:
        p = from_bytes(b)
        base.merge_from(p, 0)
        del p
        if refine is not None:
            assert r is not None, "a part of a refined index lacks its refine codes"
            refine.merge_from(from_bytes(r), 0)
    if refine is None:
        return base
    return faiss.IndexRefine(base, refine)


def _shared_quantizer(parts: Sequence[Any]):
    """The coarse quantizer of IVF parts that all hold the same one (parts of one trained index),
    else None."""
    faiss = _faiss()
    # a wrapper (an OPQ pre-transform) changes the queries before the lists: not shared then
    if not all(isinstance(faiss.downcast_index(p), faiss.IndexIVF) for p in parts):
        return None
    ivfs = [faiss.extract_index_ivf(p) for p in parts]
    first, nlist = ivfs[0], ivfs[0].nlist
    try:
        centroids = first.quantizer.reconstruct_n(0, nlist)
        for ivf in ivfs[1:]:
            if ivf.nlist != nlist or not np.array_equal(ivf.quantizer.reconstruct_n(0, nlist), centroids):
                return None
    except RuntimeError:  # a quantizer that cannot give its centroids back: searched per part
        return None
    return first.quantizer


def as_shards(parts: Sequence[Any]):
    """The parts searched as one index (``IndexShards``: each part's top-k merged; ids are store
    rows already, so no offsets). IVF parts sharing one coarse quantizer (the parts build) are
    searched as ``IndexShardsIVF``: the lists to probe are found once per query, not once per part.
    The parts stay referenced by the returned object."""
    faiss = _faiss()
    quantizer = _shared_quantizer(parts) if len(parts) > 1 else None
    if quantizer is None:
        sh = faiss.IndexShards(parts[0].d, False, False)
    else:
        sh = faiss.IndexShardsIVF(quantizer, faiss.extract_index_ivf(parts[0]).nlist, False, False)
        sh.metric_type = parts[0].metric_type
        faiss.add_to_referenced_objects(sh, quantizer)
    for p in parts:
        sh.add_shard(p)  # (faiss's wrapper keeps p referenced by sh)
    return sh


def merge_ondisk(trained_path: str, part_paths: Sequence[str], ivfdata_path: str):
    """The parts' inverted lists merged into ``ivfdata_path`` (:func:`faiss.contrib.ondisk.merge_ondisk`);
    the returned index keeps its lists on disk (memory-mapped), so it need not fit in RAM."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    faiss = _faiss()
    index = faiss.read_index(trained_path)
    _merge(index, list(part_paths), ivfdata_path)
    return index


def plan_dicts(plans: Sequence[PartPlan]) -> List[Dict[str, Any]]:
    return [asdict(p) for p in plans]
