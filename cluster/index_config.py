"""The ``index:`` section of ``configs/cluster.yaml``: how an index is built in parts and served."""

from __future__ import annotations

from dataclasses import dataclass

from reco.errors import ConfigError

LAYOUTS = ("merged", "ondisk", "shards")


@dataclass(frozen=True)
class IndexClusterConfig:
    """``part_rows``: store rows per index part (whole shards); ``workers``: part tasks in flight;
    ``cpus_per_task``: CPUs of a part task; ``train_cpus``: CPUs of the one quantiser-training task
    (k-means is parallel: give it a node's cores); FAISS runs as many threads as a task holds CPUs;
    ``gpus_per_task``: GPUs of the training and part tasks (> 0: k-means and adds on the GPU with
    faiss-gpu, e.g. 1 for training and 0.25 to share a GPU among 4 part tasks); ``layout``: ``merged`` (merge_from into one
    index in RAM), ``ondisk`` (merge_ondisk into memory-mapped inverted lists) or ``shards`` (parts
    kept, served by ``serve_actors`` Ray actors)."""

    part_rows: int = 1_000_000
    workers: int = 2
    cpus_per_task: float = 1.0
    train_cpus: float = 1.0
    gpus_per_task: float = 0.0
    layout: str = "merged"
    serve_actors: int = 2

    def __post_init__(self) -> None:
        if self.part_rows < 1:
            raise ConfigError(f"index.part_rows must be >= 1, got {self.part_rows}")
        if self.workers < 1 or self.serve_actors < 1:
            raise ConfigError("index.workers and index.serve_actors must be >= 1")
        if self.cpus_per_task <= 0 or self.train_cpus <= 0:
            raise ConfigError(
                f"index.cpus_per_task and index.train_cpus must be > 0, got {self.cpus_per_task}, {self.train_cpus}"
            )
        if self.gpus_per_task < 0:
            raise ConfigError(f"index.gpus_per_task must be >= 0, got {self.gpus_per_task}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"index.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
