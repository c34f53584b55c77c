"""cluster/datamap.py: the one actor-pool map gives every actor call a full batch but the last."""

import numpy as np

from cluster.config import ActorConfig
from cluster.datamap import actor_pool_map


def test_actor_pool_map_cuts_no_ragged_batches(ray_local):
    import ray.data

    class BatchSizes:  # defined here: pickled by value for the Ray workers
        """Returns, for every row, the size of the batch it came in."""

        def __init__(self, tag: str):
            self.tag = tag

        def __call__(self, batch):
            n = len(batch["id"])
            return {"id": batch["id"], "n": np.full(n, n), "tag": np.full(n, self.tag, dtype=object)}

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    rows = [{"id": f"{i:04d}", "uri": f"u{i}", "overlay": i < 3} for i in range(203)]
    actors = ActorConfig(num_actors=2, cpus_per_actor=0.5, batch_size=8)
    out = actor_pool_map(rows, BatchSizes, actors, {"tag": "t"}).take_all()
    assert sorted(r["id"] for r in out) == [r["id"] for r in rows] and {r["tag"] for r in out} == {"t"}
    sizes = {}
    for r in out:
        sizes[int(r["n"])] = sizes.get(int(r["n"]), 0) + 1
    assert sizes == {8: 200, 3: 3}, sizes  # 25 full batches and the one short last batch
