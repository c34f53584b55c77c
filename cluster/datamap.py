"""One Ray Data actor-pool map for every job (embed, segment / pseudo-label, evaluate).

    ds = actor_pool_map(rows, SegmentUDF, actors, dict(bank_bytes=..., ...))   # lazy Dataset
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"): ...

Rows become input blocks of a whole number of batches (:func:`aligned_blocks`), so every actor
call gets a full batch except the very last one. Ray Data cuts batches inside each task's bundle
of blocks and hands the remainder over as a short batch: ``from_items(override_num_blocks=...)``
spread 1,000 rows over 31 blocks of 32 or 33 and gave the actor 31 batches of 32 and 8 batches of
ONE image, which cost 1.6x per image in the embedding benchmark (see :mod:`cluster.embed`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from .config import ActorConfig

#: at most this many input blocks (enough to spread the rows over a cluster's actors)
MAX_BLOCKS = 512


def aligned_blocks(rows: Sequence[Mapping[str, Any]], batch_size: int, max_blocks: int = MAX_BLOCKS) -> list:
    """Arrow tables of a whole number of batches each (the last one excepted), at most
    ``max_blocks`` of them."""
    import pyarrow as pa

    bs = max(int(batch_size), 1)
    per_block = bs * max(1, -(-len(rows) // (bs * max_blocks)))
    return [pa.Table.from_pylist(list(rows[i : i + per_block])) for i in range(0, len(rows), per_block)]


def aligned_dataset(rows: Sequence[Mapping[str, Any]], batch_size: int, max_blocks: int = MAX_BLOCKS):
    """A Ray Dataset of ``rows`` in batch-aligned blocks (see :func:`aligned_blocks`)."""
    import ray.data

    return ray.data.from_arrow(aligned_blocks(rows, batch_size, max_blocks))


def map_actors(
    ds,
    udf: type,
    actors: ActorConfig,
    constructor_kwargs: Optional[Dict[str, Any]] = None,
    fn_kwargs: Optional[Dict[str, Any]] = None,
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
    num_cpus: Optional[float] = None,
):
    """``ds.map_batches`` through a pool of ``udf`` actors (numpy batches of ``actors.batch_size``):
    ``actors.num_actors`` of them with ``actors``' CPUs and GPUs, or an autoscaling pool of
    ``min_size``..``max_size`` actors of ``num_cpus`` CPUs each (e.g. a CPU decode stage)."""
    import ray.data

    if max_size is not None:
        compute = ray.data.ActorPoolStrategy(min_size=min_size or 1, max_size=max_size)
        resources: Dict[str, Any] = {"num_cpus": num_cpus if num_cpus is not None else actors.cpus_per_actor}
    else:
        compute = ray.data.ActorPoolStrategy(size=actors.num_actors)
        resources = {
            "num_cpus": actors.cpus_per_actor if num_cpus is None else num_cpus,
            "num_gpus": actors.gpus_per_actor or None,
        }
    kw: Dict[str, Any] = {}
    if constructor_kwargs is not None:
        kw["fn_constructor_kwargs"] = constructor_kwargs
    if fn_kwargs is not None:
        kw["fn_kwargs"] = fn_kwargs
    return ds.map_batches(udf, batch_size=actors.batch_size, batch_format="numpy", compute=compute, **resources, **kw)


def actor_pool_map(
    rows: List[Dict[str, Any]], udf: type, actors: ActorConfig, constructor_kwargs: Optional[Dict[str, Any]] = None
):
    """The common case: ``rows`` in batch-aligned blocks mapped by a pool of ``actors.num_actors``
    ``udf`` actors (built with ``constructor_kwargs``); a lazy Ray Dataset."""
    return map_actors(aligned_dataset(rows, actors.batch_size), udf, actors, constructor_kwargs)
